"""Tests of triplane_turbo.export: orientation, colours, GLB material, atomic writes."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import trimesh

from triplane_turbo import export as export_module
from triplane_turbo.export import FORMATS, export_mesh, linear_vertex_colors
from triplane_turbo.frames import to_display_frame, to_print_frame

from .mesh_samples import assert_same_vertex_set


@pytest.fixture
def mesh() -> trimesh.Trimesh:
    """An off-centre ellipsoid (distinct extents per axis, so axis mix-ups show) with colours."""
    sphere = trimesh.creation.icosphere(subdivisions=2)
    vertices = sphere.vertices * [1.0, 0.7, 0.4] + [0.3, -0.2, 0.1]
    rng = np.random.default_rng(0)
    colors = rng.integers(0, 256, (len(vertices), 4), dtype=np.uint8)
    colors[:, 3] = rng.integers(1, 256, len(vertices))  # alpha varies too
    out = trimesh.Trimesh(vertices, sphere.faces, vertex_colors=colors, process=False)
    assert out.volume > 0
    return out


def glb_json(path) -> dict:
    """Parses the JSON chunk of a GLB: 12-byte header, then chunk length, type, data."""
    data = path.read_bytes()
    magic, version, length = struct.unpack("<4sII", data[:12])
    assert magic == b"glTF" and version == 2 and length == len(data)
    chunk_length, chunk_type = struct.unpack("<I4s", data[12:20])
    assert chunk_type == b"JSON"
    return json.loads(data[20 : 20 + chunk_length])


_COMPONENTS = {5120: np.int8, 5121: np.uint8, 5122: np.int16, 5123: np.uint16, 5125: np.uint32, 5126: np.float32}
_WIDTHS = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}


def glb_accessors(path) -> dict[str, np.ndarray]:
    """The primitive's vertex attributes (and "indices") of a one-mesh GLB, read straight from its
    binary chunk: {name: [count, width] array} (normalised integers left as stored)."""
    data = path.read_bytes()
    tree = glb_json(path)
    json_length = struct.unpack("<I", data[12:16])[0]
    binary = data[20 + json_length + 8:]
    (primitive,) = tree["meshes"][0]["primitives"]
    out = {}
    for name, index in {**primitive["attributes"], "indices": primitive["indices"]}.items():
        accessor = tree["accessors"][index]
        view = tree["bufferViews"][accessor["bufferView"]]
        dtype, width = np.dtype(_COMPONENTS[accessor["componentType"]]), _WIDTHS[accessor["type"]]
        start = view.get("byteOffset", 0) + accessor.get("byteOffset", 0)
        out[name] = np.frombuffer(binary, dtype, accessor["count"] * width, start).reshape(accessor["count"], width)
    return out


def reloaded_colors(path, file_format: str) -> np.ndarray:
    """[V, 4] uint8 colours read back from a written file."""
    if file_format == "glb":
        # With a material, trimesh loads COLOR_0 into visual.vertex_attributes["color"], and
        # force="mesh" drops it while flattening the scene, so read the scene's geometry.
        scene = trimesh.load_scene(path, process=False)
        (geometry,) = scene.geometry.values()
        return np.asarray(geometry.visual.vertex_attributes["color"])
    loaded = trimesh.load(path, force="mesh", process=False)
    assert loaded.visual.kind == "vertex"
    return np.asarray(loaded.visual.vertex_colors)


def test_to_display_frame_is_the_cyclic_permutation():
    points = np.array([[1.0, 2.0, 3.0], [-4.0, 5.0, -6.0]])
    np.testing.assert_array_equal(to_display_frame(points), [[2.0, 3.0, 1.0], [5.0, -6.0, -4.0]])
    # A proper rotation: the permutation matrix has determinant +1, so winding is kept.
    assert np.isclose(np.linalg.det(to_display_frame(np.eye(3))), 1.0)
    with pytest.raises(ValueError, match=r"\[V, 3\]"):
        to_display_frame(np.zeros((4, 2)))


@pytest.mark.parametrize("file_format", ["glb", "obj", "ply"])
def test_round_trip_keeps_vertices_faces_and_colours(mesh, tmp_path, file_format):
    path = export_mesh(mesh, tmp_path / f"mesh.{file_format}")
    assert path == tmp_path / f"mesh.{file_format}" and path.is_file()

    loaded = trimesh.load(path, force="mesh", process=False)
    assert len(loaded.vertices) == len(mesh.vertices)
    np.testing.assert_allclose(loaded.vertices, to_display_frame(mesh.vertices), atol=1e-6)
    np.testing.assert_array_equal(loaded.faces, mesh.faces)
    np.testing.assert_allclose(loaded.volume, mesh.volume, rtol=1e-5)  # still outward

    colors = reloaded_colors(path, file_format)
    expected = np.asarray(mesh.visual.vertex_colors)
    if file_format == "obj":
        # OBJ's "v x y z r g b" lines carry no alpha.
        np.testing.assert_array_equal(colors[:, :3], expected[:, :3])
    elif file_format == "glb":
        # glTF's COLOR_0 is linear light: the sRGB values are converted (alpha is not a colour)
        np.testing.assert_array_equal(colors, linear_vertex_colors(expected))
        assert np.array_equal(colors[:, 3], expected[:, 3]) and (colors[:, :3] <= expected[:, :3]).all()
    else:
        np.testing.assert_array_equal(colors, expected)

    # +Y up: the model's highest point (largest z) is the display's highest (largest y).
    assert np.argmax(loaded.vertices[:, 1]) == np.argmax(mesh.vertices[:, 2])
    assert os.listdir(tmp_path) == [path.name]  # no .mtl, texture or leftover temp file


def test_stl_holds_the_same_geometry_in_the_print_frame(mesh, tmp_path):
    """STL comes in the print frame (tests/test_printing.py checks the frame itself)."""
    path = export_mesh(mesh, tmp_path / "mesh.stl")
    # STL stores each triangle's corners separately; merging restores the shared vertices.
    loaded = trimesh.load(path, force="mesh", process=True)
    assert len(loaded.vertices) == len(mesh.vertices)
    assert len(loaded.faces) == len(mesh.faces)
    assert_same_vertex_set(loaded.vertices, to_print_frame(to_display_frame(mesh.vertices)), atol=1e-4)
    scale = 100.0 / np.ptp(to_display_frame(mesh.vertices), axis=0).max()
    np.testing.assert_allclose(loaded.volume, mesh.volume * scale**3, rtol=1e-5)


def test_glb_material_is_not_metallic_and_has_vertex_colours(mesh, tmp_path):
    tree = glb_json(export_mesh(mesh, tmp_path / "mesh.glb"))
    (material,) = tree["materials"]
    pbr = material["pbrMetallicRoughness"]
    assert pbr["metallicFactor"] == 0.0
    assert pbr["roughnessFactor"] == pytest.approx(0.9)
    assert pbr["baseColorFactor"] == [1.0, 1.0, 1.0, 1.0]
    assert material.get("doubleSided", False) is False

    (primitive,) = tree["meshes"][0]["primitives"]
    assert primitive["material"] == 0 and primitive["mode"] == 4  # triangles
    color = tree["accessors"][primitive["attributes"]["COLOR_0"]]
    assert color["type"] == "VEC4" and color["componentType"] == 5121  # RGBA bytes
    assert color["normalized"] is True and color["count"] == len(mesh.vertices)


def test_glb_carries_smooth_vertex_normals(mesh, tmp_path):
    """Without NORMAL viewers shade every triangle flat; with the mesh's smooth normals (display
    frame, unit length) the vertex-coloured GLB shades like the surface."""
    path = export_mesh(mesh, tmp_path / "mesh.glb")
    attributes = glb_accessors(path)
    normals = attributes["NORMAL"].astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(normals, to_display_frame(mesh.vertex_normals), atol=1e-6)
    # outward: along the vertex's direction from the ellipsoid's centre
    centre = to_display_frame(np.array([[0.3, -0.2, 0.1]]))
    assert ((attributes["POSITION"] - centre) * normals).sum(1).min() > 0
    np.testing.assert_array_equal(attributes["indices"].reshape(-1, 3), mesh.faces)


def test_glb_buffer_views_have_targets_and_tight_aligned_accessors(mesh, tmp_path):
    tree = glb_json(export_mesh(mesh, tmp_path / "mesh.glb"))
    (primitive,) = tree["meshes"][0]["primitives"]
    views = tree["bufferViews"]
    for index in primitive["attributes"].values():
        assert views[tree["accessors"][index]["bufferView"]]["target"] == 34962  # ARRAY_BUFFER
    indices = tree["accessors"][primitive["indices"]]
    assert views[indices["bufferView"]]["target"] == 34963 and indices["componentType"] == 5123  # 16-bit: few vertices
    assert all(view["byteOffset"] % 4 == 0 and "byteStride" not in view for view in views)
    position = tree["accessors"][primitive["attributes"]["POSITION"]]
    display = to_display_frame(mesh.vertices).astype(np.float32)
    assert position["min"] == display.min(0).tolist() and position["max"] == display.max(0).tolist()
    assert tree["buffers"] == [{"byteLength": sum(-(-view["byteLength"] // 4) * 4 for view in views)}]


def test_glb_with_many_vertices_uses_32_bit_indices(tmp_path):
    grid = trimesh.creation.icosphere(subdivisions=7)  # 163842 vertices
    tree = glb_json(export_mesh(grid, tmp_path / "big.glb"))
    indices = tree["accessors"][tree["meshes"][0]["primitives"][0]["indices"]]
    assert indices["componentType"] == 5125
    np.testing.assert_array_equal(glb_accessors(tmp_path / "big.glb")["indices"].reshape(-1, 3), grid.faces)


def test_png_textures_decode_to_the_image():
    import io

    from PIL import Image

    from triplane_turbo.export import png_bytes

    for shape in [(1, 1, 3), (7, 5, 3), (64, 48, 3)]:
        image = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(image)))), image)
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        png_bytes(np.zeros((4, 4, 4), np.uint8))


def test_uncoloured_mesh_gets_the_material_and_normals_but_no_colours(mesh, tmp_path):
    plain = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    tree = glb_json(export_mesh(plain, tmp_path / "plain.glb"))
    assert tree["materials"][0]["pbrMetallicRoughness"]["metallicFactor"] == 0.0
    assert set(tree["meshes"][0]["primitives"][0]["attributes"]) == {"POSITION", "NORMAL"}


def test_explicit_format_overrides_the_suffix(mesh, tmp_path):
    path = export_mesh(mesh, tmp_path / "mesh.bin", file_format="PLY")
    assert path.read_bytes().startswith(b"ply\nformat binary_little_endian")
    loaded = trimesh.load(path, file_type="ply", process=False)
    np.testing.assert_allclose(loaded.vertices, to_display_frame(mesh.vertices), atol=1e-6)


def test_input_mesh_is_not_modified(mesh, tmp_path):
    vertices = mesh.vertices.copy()
    faces = mesh.faces.copy()
    colors = mesh.visual.vertex_colors.copy()
    for file_format in FORMATS:
        export_mesh(mesh, tmp_path / f"mesh.{file_format}")
    np.testing.assert_array_equal(mesh.vertices, vertices)
    np.testing.assert_array_equal(mesh.faces, faces)
    np.testing.assert_array_equal(mesh.visual.vertex_colors, colors)
    assert mesh.visual.kind == "vertex"


def test_unknown_format_and_empty_mesh_raise(mesh, tmp_path):
    with pytest.raises(ValueError, match="allowed: glb, obj, ply, stl, usdz, 3mf"):
        export_mesh(mesh, tmp_path / "mesh.fbx")
    with pytest.raises(ValueError, match="allowed"):
        export_mesh(mesh, tmp_path / "mesh")  # no suffix, no format
    empty = trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), np.int64))
    with pytest.raises(ValueError, match="cannot export an empty mesh"):
        export_mesh(empty, tmp_path / "mesh.glb")
    assert os.listdir(tmp_path) == []


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(mesh, tmp_path, monkeypatch):
    path = tmp_path / "mesh.ply"
    path.write_bytes(b"previous")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(export_module.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        export_mesh(mesh, path)
    assert path.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["mesh.ply"]

    monkeypatch.undo()
    export_mesh(mesh, path)  # a successful write replaces the old file
    assert path.read_bytes().startswith(b"ply\n")
    assert os.listdir(tmp_path) == ["mesh.ply"]


def test_color_0_is_linear_light(tmp_path):
    """sRGB 188 is 50 % linear light; 0 and 255 stay; a V-shaped mistake (linear -> sRGB) would give 225."""
    grey = trimesh.creation.icosphere(subdivisions=1)
    grey.visual.vertex_colors = np.tile([188, 0, 255, 255], (len(grey.vertices), 1)).astype(np.uint8)
    colors = reloaded_colors(export_mesh(grey, tmp_path / "grey.glb"), "glb")
    assert (colors == [128, 0, 255, 255]).all()
