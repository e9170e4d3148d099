"""The print formats, STL and 3MF: +Z up, millimetres, the largest side at the print size, centred in
x and y, resting on z = 0, closed; 3MF declares millimetres and carries the colours. Checked on files
read back (trimesh's STL and 3MF readers; the 3MF's XML itself)."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile

import numpy as np
import pytest
import trimesh

from triplane_turbo.export import encode_mesh, export_mesh
from triplane_turbo.frames import DISPLAY_TO_PRINT, to_display_frame, to_print_frame
from triplane_turbo.printing import sample_texture
from triplane_turbo.texturing.bake import UVTexture

from .mesh_samples import asymmetric_mesh, assert_same_vertex_set

CORE = "{http://schemas.microsoft.com/3dmanufacturing/core/2015/02}"
MATERIAL = "{http://schemas.microsoft.com/3dmanufacturing/material/2015/02}"


@pytest.fixture(scope="module")
def mesh() -> trimesh.Trimesh:
    return asymmetric_mesh()


def read_model(path) -> ET.Element:
    """The root element of a 3MF's model part (found through the package's relationships)."""
    with zipfile.ZipFile(path) as package:
        rels = ET.fromstring(package.read("_rels/.rels"))
        (target,) = [r.get("Target") for r in rels if r.get("Type").endswith("/3dmodel")]
        return ET.fromstring(package.read(target.lstrip("/")))


def corner_colors(model: ET.Element) -> tuple[np.ndarray, np.ndarray]:
    """([F, 3] vertex indices, [F, 3, 3] RGB of each corner) from a 3MF's colorgroup and triangles."""
    (group,) = model.iter(f"{MATERIAL}colorgroup")
    palette = np.array([[int(c.get("color")[i:i + 2], 16) for i in (1, 3, 5)] for c in group], np.uint8)
    triangles = list(model.iter(f"{CORE}triangle"))
    assert {t.get("pid") for t in triangles} == {group.get("id")}
    faces = np.array([[int(t.get(k)) for k in ("v1", "v2", "v3")] for t in triangles])
    corners = np.array([[int(t.get(k)) for k in ("p1", "p2", "p3")] for t in triangles])
    return faces, palette[corners]


def assert_on_the_plate(vertices: np.ndarray, print_size: float) -> None:
    low, high = vertices.min(0), vertices.max(0)
    assert low[2] == 0.0  # exactly on the plate
    np.testing.assert_allclose((low[:2] + high[:2]) / 2, 0.0, atol=1e-4)  # centred in x and y (mm)
    np.testing.assert_allclose((high - low).max(), print_size, rtol=1e-6)


def test_the_print_frame_turns_display_up_to_z_and_the_front_to_minus_y(mesh):
    assert np.isclose(np.linalg.det(DISPLAY_TO_PRINT), 1.0)  # a rotation: winding (outward normals) kept
    np.testing.assert_array_equal(DISPLAY_TO_PRINT @ [0, 1, 0], [0, 0, 1])  # display up -> print up
    np.testing.assert_array_equal(DISPLAY_TO_PRINT @ [0, 0, 1], [0, -1, 0])  # display front -> print -Y
    model = np.asarray(mesh.vertices)
    printed = to_print_frame(to_display_frame(model), 80.0)
    # the blob's top (model +z, display +Y) is the print's top; its nose (model +x, display +Z) the
    # front (-Y); its widest side (model y, display x) stays along x
    assert printed[np.argmax(model[:, 2]), 2] == printed[:, 2].max()
    assert printed[np.argmax(model[:, 0]), 1] == printed[:, 1].min()
    assert printed[np.argmax(model[:, 1]), 0] == printed[:, 0].max()
    assert_on_the_plate(printed, 80.0)
    # one uniform scale: print = s · R · (display - centre) + t
    display = to_display_frame(model)
    scale = 80.0 / np.ptp(display, axis=0).max()
    centred = display - (display.min(0) + display.max(0)) / 2
    expected = centred @ DISPLAY_TO_PRINT.T * scale
    np.testing.assert_allclose(printed - expected, np.broadcast_to(printed[0] - expected[0], printed.shape),
                               atol=1e-9)


@pytest.mark.parametrize("print_size", [100.0, 37.5])
def test_stl_is_the_print_frame_mesh_closed_and_on_the_plate(mesh, tmp_path, print_size):
    path = export_mesh(mesh, tmp_path / "blob.stl", print_size=print_size)
    loaded = trimesh.load(path, process=True)  # STL repeats corners; merging restores the shared vertices
    assert len(loaded.vertices) == len(mesh.vertices) and len(loaded.faces) == len(mesh.faces)
    assert loaded.is_watertight and loaded.is_winding_consistent and loaded.volume > 0
    expected = to_print_frame(to_display_frame(mesh.vertices), print_size)
    assert_same_vertex_set(loaded.vertices, expected, atol=1e-6 * print_size)  # float32 in the file
    assert_on_the_plate(np.asarray(loaded.vertices), print_size)
    # a volume scaled by the cube of the scale: the same solid, not a mirrored or squashed one
    scale = print_size / np.ptp(to_display_frame(mesh.vertices), axis=0).max()
    np.testing.assert_allclose(loaded.volume, mesh.volume * scale ** 3, rtol=1e-5)


def test_3mf_declares_millimetres_and_holds_the_print_frame_mesh_with_its_colours(mesh, tmp_path):
    path = export_mesh(mesh, tmp_path / "blob.3mf", print_size=60.0)
    model = read_model(path)
    assert model.get("unit") == "millimeter"
    (scene,) = [trimesh.load_scene(path)]
    assert scene.units == "millimeter"
    (loaded,) = scene.geometry.values()
    expected = to_print_frame(to_display_frame(mesh.vertices), 60.0)
    np.testing.assert_allclose(loaded.vertices, expected, atol=1e-5)  # written with 6 decimals (mm)
    np.testing.assert_array_equal(loaded.faces, mesh.faces)
    assert loaded.is_watertight and loaded.is_winding_consistent and loaded.volume > 0
    assert_on_the_plate(np.asarray(loaded.vertices), 60.0)
    faces, colors = corner_colors(model)
    np.testing.assert_array_equal(faces, mesh.faces)
    np.testing.assert_array_equal(colors, np.asarray(mesh.visual.vertex_colors)[mesh.faces][..., :3])
    assert encode_mesh(mesh, "3mf", "blob", print_size=60.0)["blob.3mf"] == path.read_bytes()  # no clock in it


#: Reads a 3MF with lib3mf, the 3MF Consortium's library, in a process of its own (its calls set the
#: process's C locale to "C"): the unit, the counts, and the reader's warnings.
LIB3MF_READ = """
import json, sys, lib3mf
wrapper = lib3mf.get_wrapper()
model = wrapper.CreateModel()
reader = model.QueryReader("3mf")
reader.SetStrictModeActive(True)
reader.ReadFromFile(sys.argv[1])
meshes = model.GetMeshObjects()
meshes.MoveNext()
mesh = meshes.GetCurrentMeshObject()
groups = model.GetColorGroups()
colors = [groups.GetCurrentColorGroup().GetCount() for _ in iter(groups.MoveNext, False)]
warnings = [reader.GetWarning(i)[1] for i in range(reader.GetWarningCount())]
print(json.dumps({"millimetres": model.GetUnit() == lib3mf.ModelUnit.MilliMeter, "vertices": mesh.GetVertexCount(),
                  "triangles": mesh.GetTriangleCount(), "colors": colors, "warnings": warnings}))
"""


def test_the_3mf_consortiums_reader_reads_it_strictly_without_warnings(mesh, tmp_path):
    pytest.importorskip("lib3mf", reason="pip install lib3mf (in requirements-dev.txt)")
    path = export_mesh(mesh, tmp_path / "blob.3mf")
    out = subprocess.run([sys.executable, "-c", LIB3MF_READ, str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report == {"millimetres": True, "vertices": len(mesh.vertices), "triangles": len(mesh.faces),
                      "colors": [len(mesh.vertices)], "warnings": []}


def test_a_textured_3mf_samples_the_texture_at_each_corner(mesh, tmp_path):
    plain = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    rng = np.random.default_rng(1)
    # a texture of four flat quadrants, each UV vertex in one of them (away from the edges)
    image = np.zeros((64, 64, 3), np.uint8)
    quadrants = {(0, 0): (200, 30, 30), (0, 1): (30, 200, 30), (1, 0): (30, 30, 200), (1, 1): (220, 220, 20)}
    for (row, col), rgb in quadrants.items():
        image[row * 32:(row + 1) * 32, col * 32:(col + 1) * 32] = rgb
    uv = (rng.integers(0, 2, (len(plain.vertices), 2)) * 0.5 + rng.uniform(0.1, 0.4, (len(plain.vertices), 2)))
    texture = UVTexture(np.arange(len(plain.vertices)), np.asarray(plain.faces), uv.astype(np.float32), image)
    path = export_mesh(plain, tmp_path / "textured.3mf", texture=texture)
    _, colors = corner_colors(read_model(path))
    # v up: v < 0.5 is the image's bottom half
    expected = np.array([quadrants[(int(v < 0.5), int(u >= 0.5))] for u, v in uv], np.uint8)[plain.faces]
    np.testing.assert_array_equal(colors, expected)
    np.testing.assert_array_equal(sample_texture(image, uv.astype(np.float32))[plain.faces], expected)


def test_an_uncoloured_3mf_has_no_colour_group(tmp_path):
    plain = asymmetric_mesh(colored=False)
    model = read_model(export_mesh(plain, tmp_path / "plain.3mf"))
    assert list(model.iter(f"{MATERIAL}colorgroup")) == [] and len(list(model.iter(f"{CORE}triangle"))) == 1280


@pytest.fixture(scope="module")
def simplified(tiny_pipe):
    """The tiny model's mesh simplified (``--faces``), with vertex colours."""
    out = tiny_pipe("a wooden chair", seed=3, mesh_resolution=48, texture="vertex", target_faces=600)
    return out.meshes[0]


@pytest.mark.parametrize("file_format", ["stl", "3mf"])
def test_the_simplified_model_output_prints_closed(simplified, tmp_path, file_format):
    assert len(simplified.faces) <= 700
    path = export_mesh(simplified, tmp_path / f"chair.{file_format}")
    loaded = trimesh.load(path, force="mesh", process=file_format == "stl")
    assert loaded.is_watertight and loaded.is_winding_consistent and loaded.volume > 0
    assert len(loaded.faces) == len(simplified.faces)
    assert_on_the_plate(np.asarray(loaded.vertices), 100.0)
