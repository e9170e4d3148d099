"""triplane_turbo.texturing.tangents: the MikkTSpace port, against hand-worked frames and against the reference.

The reference is the WebAssembly build of MikkTSpace that three.js and glTF-Transform use (npm
``mikktspace``, installed under tests/.node on first use: tests/node_packages.py);
``tests/fixtures/mikktspace_reference.npz`` holds its answer for a small mesh with every case the port handles (mirrored charts, degenerate
triangles, vertices split into several frames), so that the comparison runs without Node too.
Regenerate it with ``python -m tests.test_tangents`` (needs node and the package).
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import trimesh

from triplane_turbo.texturing.tangents import mikktspace, split_by_corner

TESTS = Path(__file__).parent
SCRIPT = TESTS / "mikktspace_reference.mjs"
FIXTURE = TESTS / "fixtures" / "mikktspace_reference.npz"


needs_reference = pytest.mark.usefixtures("node_packages")  # installed on first use, or skipped saying how


def reference_mikktspace(positions, normals, uv, faces) -> np.ndarray:
    """[F, 3, 4] tangents per corner from the npm package (unindexed corners in, as it requires)."""
    faces = np.asarray(faces)
    corners = np.concatenate([np.asarray(positions, np.float32)[faces].reshape(-1, 3),
                              np.asarray(normals, np.float32)[faces].reshape(-1, 3),
                              np.asarray(uv, np.float32)[faces].reshape(-1, 2)], axis=1)
    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "in.bin", Path(folder) / "out.bin"
        count = len(corners)
        source.write_bytes(np.uint32(count).tobytes() + corners[:, :3].tobytes() + corners[:, 3:6].tobytes()
                           + corners[:, 6:].tobytes())
        subprocess.run(["node", str(SCRIPT), str(source), str(target)], check=True, timeout=120)
        return np.fromfile(target, np.float32).reshape(len(faces), 3, 4)


def angles(a, b) -> np.ndarray:
    """Degrees between tangent directions [..., 3]."""
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return np.degrees(np.arccos(np.clip((a * b).sum(-1), -1, 1)))


# -------------------------------------------------------------------------------------------------
# Hand-worked frames
# -------------------------------------------------------------------------------------------------
SQUARE = np.array([[0.0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]])
SQUARE_FACES = np.array([[0, 1, 2], [0, 2, 3]])
UP = np.tile([0.0, 0, 1], (4, 1))


@pytest.mark.parametrize("uv, tangent, sign", [
    (SQUARE[:, :2], [1, 0, 0], 1.0),  # u along +x, v along +y: a right-handed frame
    (1 - SQUARE[:, :2], [-1, 0, 0], 1.0),  # turned half a turn: still right-handed
    (np.stack([1 - SQUARE[:, 0], SQUARE[:, 1]], 1), [-1, 0, 0], -1.0),  # u mirrored: left-handed
    (np.stack([SQUARE[:, 0], 1 - SQUARE[:, 1]], 1), [1, 0, 0], -1.0),  # v mirrored (glTF's v down)
    (SQUARE[:, [1, 0]], [0, 1, 0], -1.0),  # u along +y, v along +x: mirrored
    (np.stack([SQUARE[:, 1], 1 - SQUARE[:, 0]], 1), [0, 1, 0], 1.0),  # a quarter turn
])
def test_a_flat_square_gets_the_direction_of_increasing_u(uv, tangent, sign):
    frames = mikktspace(SQUARE, UP, uv * 0.5 + 0.25, SQUARE_FACES)
    np.testing.assert_allclose(frames[..., :3], np.broadcast_to(tangent, (2, 3, 3)), atol=1e-6)
    assert (frames[..., 3] == sign).all()
    # the bitangent w (N x T) points along increasing v
    v_direction = np.cross(UP[0], tangent) * sign
    p, t = SQUARE[SQUARE_FACES[0]], uv[SQUARE_FACES[0]]
    d1, d2, e1, e2 = t[1] - t[0], t[2] - t[0], p[1] - p[0], p[2] - p[0]
    dp_dv = (e2 * d1[0] - e1 * d2[0]) / (d1[0] * d2[1] - d1[1] * d2[0])
    assert np.dot(v_direction, dp_dv) > 0


def test_a_vertex_averages_its_triangles_by_angle_and_projects_on_its_normal():
    """Two right-angled corners at the origin whose u directions are +x and the diagonal: the shared
    vertices take the angle-weighted mean, 22.5°; the others keep their own triangle's."""
    positions = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [-1, 0, 0]])
    uv = np.array([[0.0, 0], [1, 0], [0, 1], [-1, 1]]) * 0.25 + 0.5
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    tilted = np.array([0.0, 0.3, 1.0]) / np.linalg.norm([0.0, 0.3, 1.0])  # a normal off the plane at vertex 0
    normals = np.array([tilted, [0, 0, 1], [0, 0, 1], [0, 0, 1]])
    frames = mikktspace(positions, normals, uv, faces)
    half = np.radians(22.5)
    np.testing.assert_allclose(frames[0, 2, :3], [np.cos(half), np.sin(half), 0], atol=1e-6)  # vertex 2 in face 0
    np.testing.assert_allclose(frames[1, 1, :3], frames[0, 2, :3], atol=1e-7)  # the same vertex in face 1
    np.testing.assert_allclose(frames[0, 1, :3], [1, 0, 0], atol=1e-6)  # vertex 1: face 0 alone
    np.testing.assert_allclose(frames[1, 2, :3], [np.sqrt(0.5), np.sqrt(0.5), 0], atol=1e-6)  # vertex 3: face 1
    # at vertex 0 both directions and the corner angles are measured in the plane across its normal
    def project(v):
        v = np.asarray(v, float) - np.dot(v, tilted) * tilted
        return v / np.linalg.norm(v)

    def corner_angle(a, b):
        return np.arccos(np.clip(np.dot(project(a), project(b)), -1, 1))

    expected = (corner_angle([1, 0, 0], [0, 1, 0]) * project([1, 0, 0])
                + corner_angle([0, 1, 0], [-1, 0, 0]) * project([1, 1, 0]))
    np.testing.assert_allclose(frames[0, 0, :3], expected / np.linalg.norm(expected), atol=1e-6)
    assert np.abs(np.dot(frames[0, 0, :3], tilted)) < 1e-6 and (frames[..., 3] == 1).all()


def test_a_fold_in_uv_splits_the_vertex_and_degenerate_triangles_borrow_a_frame():
    """A square whose second triangle is mirrored in UV: at the two shared vertices the corners of
    the two triangles get different frames (two groups), which split_by_corner turns into extra
    vertices. A degenerate triangle (two corners at one point) copies the frame of the first healthy
    corner at its vertex."""
    positions = np.array([[0.0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [1, 0, 0]])
    uv = np.array([[0.1, 0.1], [0.9, 0.1], [0.9, 0.9], [0.9, 0.1], [0.9, 0.1]])
    faces = np.array([[0, 1, 2], [0, 2, 3], [1, 4, 2]])
    frames = mikktspace(positions, np.tile([0.0, 0, 1], (5, 1)), uv, faces)
    np.testing.assert_allclose(frames[0, :, :3], np.tile([1, 0, 0], (3, 1)), atol=1e-6)
    assert (frames[0, :, 3] == 1).all() and (frames[1, :, 3] == -1).all()  # the second is mirrored
    assert not np.allclose(frames[0, 0], frames[1, 0])  # vertex 0 has a frame per triangle
    np.testing.assert_array_equal(frames[2, 0], frames[0, 1])  # degenerate: vertex 1's frame from face 0
    np.testing.assert_array_equal(frames[2, 2], frames[0, 2])  # vertex 2: the first healthy corner
    extra, split_faces, values = split_by_corner(faces, frames)
    assert sorted(extra.tolist()) == [0, 2] and len(values) == 7
    np.testing.assert_array_equal(values[split_faces], frames)  # every corner keeps its frame
    np.testing.assert_array_equal(np.concatenate([np.arange(5), extra])[split_faces], faces)


def test_split_by_corner_keeps_agreeing_vertices():
    faces = np.array([[0, 1, 2], [2, 1, 3]])
    values = np.ones((2, 3, 4))
    extra, split_faces, per_vertex = split_by_corner(faces, values)
    assert len(extra) == 0 and np.array_equal(split_faces, faces) and per_vertex.shape == (4, 4)


def test_empty_input():
    assert mikktspace(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros((0, 2)), np.zeros((0, 3), int)).shape == (0, 3, 4)


# -------------------------------------------------------------------------------------------------
# Against the reference implementation
# -------------------------------------------------------------------------------------------------
def fixture_mesh():
    """A bumpy sphere (320 faces) with a box-projected atlas in which every other chart is mirrored
    and a few triangles are degenerate (two corners at one point, or no texture area)."""
    from triplane_turbo.texturing.uv import box_unwrap

    sphere = trimesh.creation.icosphere(subdivisions=2)
    rng = np.random.default_rng(0)
    positions = sphere.vertices * (1 + 0.05 * rng.standard_normal((len(sphere.vertices), 1)))
    faces = np.asarray(sphere.faces)
    vmapping, uv_faces, uv = box_unwrap(positions, faces, 64)
    mesh = trimesh.Trimesh(positions, faces, process=False)
    normals = mesh.vertex_normals[vmapping]
    positions = positions[vmapping]
    uv = uv.astype(np.float64)
    import scipy.sparse
    from scipy.sparse.csgraph import connected_components

    rows = np.repeat(np.arange(len(uv_faces)), 3)
    graph = scipy.sparse.coo_matrix((np.ones(rows.size), (rows, uv_faces.ravel())), shape=(len(uv_faces), len(uv)))
    _, chart = connected_components((graph.T @ graph), directed=False)  # per UV vertex
    mirrored = chart % 2 == 1
    uv[mirrored, 0] = 1 - uv[mirrored, 0]
    uv_faces = uv_faces.copy()
    uv_faces[5, 1] = uv_faces[5, 0]  # a triangle with two corners at one vertex
    uv[uv_faces[9]] = uv[uv_faces[9, 0]]  # and some with no texture area (face 9 and its neighbours)
    return positions, normals, uv, uv_faces


def write_fixture() -> None:
    positions, normals, uv, faces = fixture_mesh()
    tangents = reference_mikktspace(positions, normals, uv, faces)
    np.savez_compressed(FIXTURE, positions=positions.astype(np.float32), normals=normals.astype(np.float32),
                        uv=uv.astype(np.float32), faces=faces.astype(np.int32), tangents=tangents)


def check_against(reference, positions, normals, uv, faces):
    ours = mikktspace(positions, normals, uv, faces)
    assert np.array_equal(ours[..., 3], reference[..., 3])  # the handedness of every corner
    valid = np.linalg.norm(reference[..., :3], axis=-1) > 0.5
    assert np.array_equal(valid, np.linalg.norm(ours[..., :3], axis=-1) > 0.5)
    # float32 in the reference, float64 here: measured about 0.03° apart at most
    assert angles(ours[..., :3][valid], reference[..., :3][valid]).max() < 0.1
    return ours


def test_the_port_matches_the_recorded_reference():
    data = np.load(FIXTURE)
    ours = check_against(data["tangents"], data["positions"], data["normals"], data["uv"], data["faces"])
    assert (ours[..., 3] == -1).sum() > 100 and (ours[..., 3] == 1).sum() > 100  # both handednesses met


@needs_reference
@pytest.mark.parametrize("method", ["fast", "xatlas"])
def test_the_port_matches_the_reference_on_a_marching_cubes_mesh(tiny_pipe, method):
    from triplane_turbo.isosurface import simplify
    from triplane_turbo.texturing.bake import unwrap

    out = tiny_pipe("a wooden chair", seed=3, mesh_resolution=96, texture="vertex")
    mesh = simplify(out.meshes[0], 8000)
    vmapping, faces, uv = unwrap(mesh.vertices, mesh.faces, 256, method=method)
    normals = mesh.vertex_normals[vmapping]
    reference = reference_mikktspace(mesh.vertices[vmapping], normals, uv, faces)
    check_against(reference, mesh.vertices[vmapping], normals, uv, faces)


if __name__ == "__main__":
    from tests.node_packages import ensure

    if (reason := ensure()) is not None:
        raise SystemExit(reason)
    write_fixture()
    print(f"wrote {FIXTURE}")
