"""Every kind of GLB the library writes passes the Khronos glTF validator with nothing to report:
no errors, warnings, infos or hints.

The validator is the npm package ``gltf-validator`` (the official one, compiled from Dart to JS),
run by ``tests/gltf_validate.mjs`` under Node; the session installs it into tests/.node on first use
(tests/node_packages.py, the version pinned in tests/package.json).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import trimesh

from triplane_turbo.export import export_mesh
from triplane_turbo.isosurface import simplify
from triplane_turbo.texturing.bake import bake_texture, vertex_colors

TESTS = Path(__file__).parent
pytestmark = pytest.mark.usefixtures("node_packages")  # installed on first use, or skipped saying how


def validate(path: Path) -> dict:
    """The validator's JSON report on one file."""
    out = subprocess.run(["node", str(TESTS / "gltf_validate.mjs"), str(path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def assert_clean(report: dict) -> None:
    issues = report["issues"]
    messages = [(m["code"], m.get("pointer"), m["message"]) for m in issues["messages"]]
    counts = (issues["numErrors"], issues["numWarnings"], issues["numInfos"], issues["numHints"])
    assert counts == (0, 0, 0, 0), messages


@pytest.fixture(scope="module")
def chair(tiny_pipe):
    """The tiny model's marching-cubes mesh as the app makes it (R = 128, not simplified, slivers and all)."""
    out = tiny_pipe("a wooden chair", seed=3, mesh_resolution=128, texture="vertex")
    return tiny_pipe.fields, out.triplane, out.meshes[0]


def test_a_vertex_coloured_glb_is_clean(chair, tmp_path):
    fields, triplane, mesh = chair
    coloured = mesh.copy()
    coloured.visual.vertex_colors = vertex_colors(fields, triplane, mesh.vertices)
    report = validate(export_mesh(coloured, tmp_path / "coloured.glb"))
    assert_clean(report)
    info = report["info"]
    assert info["totalVertexCount"] == len(mesh.vertices) and info["totalTriangleCount"] == len(mesh.faces)


def test_a_plain_glb_is_clean(tmp_path):
    sphere = trimesh.creation.icosphere(subdivisions=2)
    plain = trimesh.Trimesh(sphere.vertices, sphere.faces, process=False)
    assert_clean(validate(export_mesh(plain, tmp_path / "plain.glb")))


@pytest.mark.parametrize("unwrap", ["fast", "xatlas"])
@pytest.mark.parametrize("normal_map", [False, True])
def test_textured_glbs_are_clean(chair, tmp_path, unwrap, normal_map):
    fields, triplane, mesh = chair
    if unwrap == "xatlas":  # its seconds on the full mesh would buy nothing more here
        mesh = simplify(mesh, 5000)
    texture = bake_texture(fields, triplane, mesh, 128, normal_map=normal_map, unwrap=unwrap)
    report = validate(export_mesh(mesh, tmp_path / "textured.glb", texture=texture))
    assert_clean(report)  # with a normal map: no MESH_PRIMITIVE_GENERATED_TANGENT_SPACE, the file has tangents
    info = report["info"]
    assert info["materialCount"] == 1 and info["hasTextures"] and info["totalVertexCount"] == len(texture.uv)
    assert len(info["resources"]) == 1 + 1 + normal_map  # the binary buffer and each embedded image


def test_a_glb_with_32_bit_indices_is_clean(tmp_path):
    mesh = trimesh.creation.icosphere(subdivisions=7)  # 163842 vertices
    mesh.visual.vertex_colors = np.tile([200, 120, 40, 255], (len(mesh.vertices), 1)).astype(np.uint8)
    assert_clean(validate(export_mesh(mesh, tmp_path / "big.glb")))


@pytest.mark.parametrize("normal_map", [False, True])
def test_placed_glbs_are_clean(chair, tmp_path, normal_map):
    """--origin bottom --scale 0.01 (a pivot at the base, centimetre-sized): moved and scaled positions
    and their min/max, with the tangents the normal map was baked against."""
    fields, triplane, mesh = chair
    texture = bake_texture(fields, triplane, mesh, 64, normal_map=normal_map) if normal_map else None
    if texture is None:
        mesh = mesh.copy()
        mesh.visual.vertex_colors = vertex_colors(fields, triplane, mesh.vertices)
    path = export_mesh(mesh, tmp_path / "placed.glb", texture=texture, origin="bottom", scale=0.01)
    assert_clean(validate(path))
    (geometry,) = trimesh.load_scene(path).geometry.values()
    assert abs(geometry.bounds[0, 1]) < 1e-9 and np.ptp(geometry.vertices, axis=0).max() < 0.0105
