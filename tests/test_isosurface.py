"""Tests of triplane_turbo.isosurface against analytic SDFs, hand-computed DiffMC positions and PyMCubes."""

from __future__ import annotations

import mcubes
import numpy as np
import pytest
import torch
import trimesh

from triplane_turbo.isosurface import (
    CUBE_CORNERS,
    EDGE_AXES,
    EDGE_STARTS,
    EmptySurfaceWarning,
    case_table,
    extract_surface,
    marching_cubes,
    remove_floaters,
    simplify,
)

R = 40
AXIS = 2.0 * np.arange(R) / (R - 1) - 1.0  # DiffMC's grid axis: index i -> 2 i / (R - 1) - 1
H = 2.0 / (R - 1)  # cell size in world units
X, Y, Z = np.meshgrid(AXIS, AXIS, AXIS, indexing="ij")


def sphere_sdf(radius: float = 0.5, center=(0.0, 0.0, 0.0)) -> np.ndarray:
    """[R, R, R] float32 signed distance to a sphere, negative inside."""
    cx, cy, cz = center
    return (np.sqrt((X - cx) ** 2 + (Y - cy) ** 2 + (Z - cz) ** 2) - radius).astype(np.float32)


def to_world(index: np.ndarray) -> np.ndarray:
    """Grid index (possibly fractional, possibly in the pad) -> world coordinate, default bbox."""
    return 2.0 * np.asarray(index, dtype=np.float64) / (R - 1) - 1.0


def nearest_distance(vertices: np.ndarray, point: np.ndarray) -> float:
    return float(np.linalg.norm(vertices - point, axis=1).min())


def test_sphere_vertices_on_surface_and_faces_outward():
    radius = 0.5
    verts, faces = marching_cubes(sphere_sdf(radius))
    assert verts.dtype == np.float32 and verts.shape[1] == 3
    assert faces.dtype == np.int64 and faces.shape[1] == 3 and len(faces) > 1000

    # A vertex v is the zero of the linear interpolant L of f = |p| - r along its edge, so
    # | |v| - r | = |f(v) - L(v)| <= h^2 / 8 * max f'' on the edge. The Hessian of |p| has
    # eigenvalues 0, 1/|p|, 1/|p|, and points on a crossing edge have |p| >= r - 1.5 h
    # (endpoints within h of the sphere, every point within h/2 of an endpoint).
    bound = H**2 / (8.0 * (radius - 1.5 * H))
    error = np.abs(np.linalg.norm(verts.astype(np.float64), axis=1) - radius)
    assert error.max() < bound + 1e-6  # + float32 rounding of the stored vertices
    assert error.max() > 0.0  # the bound is meaningful: vertices are not trivially exact

    mesh = trimesh.Trimesh(verts, faces, process=False)
    assert mesh.is_watertight
    exact = 4.0 / 3.0 * np.pi * radius**3
    assert mesh.volume > 0  # outward winding
    assert abs(mesh.volume - exact) / exact < 0.02
    # Every triangle faces away from the centre.
    dots = np.einsum("ij,ij->i", mesh.face_normals, mesh.triangles_center)
    assert (dots > 0).all()


def test_isovalue_selects_level_set():
    verts, _ = marching_cubes(sphere_sdf(0.5), isovalue=0.2)  # the level set |p| = 0.7
    np.testing.assert_allclose(np.linalg.norm(verts, axis=1), 0.7, atol=3e-3)


def test_uniform_deformation_shifts_every_vertex():
    sdf = sphere_sdf(0.5, center=(0.1, -0.05, 0.0))
    d = np.array([0.3, -0.2, 0.1], dtype=np.float32)
    deformation = np.broadcast_to(d, (R, R, R, 3))
    base_v, base_f = marching_cubes(sdf)
    moved_v, moved_f = marching_cubes(sdf, deformation)
    np.testing.assert_array_equal(moved_f, base_f)
    # Pad vertices (none here: the sphere is inside) would interpolate towards zero offsets.
    np.testing.assert_allclose(moved_v - base_v, np.broadcast_to(H * d, base_v.shape), atol=1e-6)


def test_nonuniform_deformation_is_interpolated_along_the_edge():
    """An offset alternating in x, d(i) = w (-1)^i, blends to w (-1)^a (1 - 2t) on an x-edge."""
    sdf = sphere_sdf(0.6, center=(0.05, 0.0, 0.0))
    wx, wy = 0.4, -0.25
    sign = ((-1.0) ** np.arange(R))[:, None, None]
    deformation = np.zeros((R, R, R, 3), np.float32)
    deformation[..., 0] = wx * sign
    deformation[..., 1] = wy * sign
    verts, _ = marching_cubes(sdf, deformation)

    sdf64 = sdf.astype(np.float64)
    checked = 0
    for j, k in [(R // 2, R // 2), (R // 2 + 3, R // 2 - 2), (R // 3, R // 2)]:
        line = sdf64[:, j, k]
        for a in np.nonzero(np.sign(line[:-1]) != np.sign(line[1:]))[0]:
            # Hand formula on the x-edge (a, j, k) -> (a + 1, j, k), independent of PyMCubes:
            # (p_a + d_a) + t ((p_b + d_b) - (p_a + d_a)).
            t = (0.0 - line[a]) / (line[a + 1] - line[a])
            d_a = np.array([wx, wy, 0.0]) * (-1.0) ** a
            d_b = -d_a
            p_a = np.array([a, j, k], dtype=np.float64)
            p_b = p_a + [1, 0, 0]
            expected = to_world((p_a + d_a) + t * ((p_b + d_b) - (p_a + d_a)))
            assert nearest_distance(verts, expected) < 1e-5
            # The blend matters: using either endpoint's offset alone lands elsewhere.
            assert np.linalg.norm(to_world(p_a + t * (p_b - p_a) + d_a) - expected) > 1e-3
            assert np.linalg.norm(to_world(p_a + t * (p_b - p_a) + d_b) - expected) > 1e-3
            checked += 1
    assert checked == 6

    # Vertices on y-edges sit at integer x, where the offset is that column's, unblended.
    a, k = R // 2, R // 2
    line = sdf64[a, :, k]
    b = np.nonzero(np.sign(line[:-1]) != np.sign(line[1:]))[0][0]
    t = -line[b] / (line[b + 1] - line[b])
    expected = to_world(np.array([a + wx * (-1.0) ** a, b + t + wy * (-1.0) ** a, k]))
    assert nearest_distance(verts, expected) < 1e-5


def test_custom_bbox_maps_grid_index_space():
    sdf = sphere_sdf(0.5)
    bbox = np.array([[0.0, -2.0, 1.0], [2.0, 2.0, 7.0]])
    unit_v, unit_f = marching_cubes(sdf)
    box_v, box_f = marching_cubes(sdf, bbox=bbox)
    np.testing.assert_array_equal(box_f, unit_f)
    expected = bbox[0] + (unit_v.astype(np.float64) + 1.0) / 2.0 * (bbox[1] - bbox[0])
    np.testing.assert_allclose(box_v, expected, atol=1e-5)


@pytest.mark.parametrize("isovalue", [0.0, 0.25])
def test_border_touching_surface_is_closed_by_the_padding(isovalue):
    # Inside is the slab x < 0.3, which touches five faces of the box.
    sdf = (X - 0.3 + isovalue).astype(np.float32)
    verts, faces = marching_cubes(sdf, isovalue=isovalue)
    mesh = trimesh.Trimesh(verts, faces, process=False)
    assert mesh.is_watertight
    assert mesh.volume > 1.3 * 2.0 * 2.0  # the slab plus a little pad bulge
    assert mesh.volume < 1.3 * 2.0 * 2.0 * (1 + 3 * H)

    v = verts.astype(np.float64)
    lo, hi = to_world(-1.0), to_world(R)  # the pad planes, one cell outside the box
    assert v.min() >= lo - 1e-6 and v.max() <= hi + 1e-6
    # The cap at the y = -1 side: between pad (value iso + 1) at index -1 and the border grid
    # point (value s) at index 0, so t = (iso - (iso + 1)) / (s - (iso + 1)) = 1 / (1 + iso - s).
    cap = v[v[:, 1] < -1.0 - 1e-6]
    assert len(cap) > 10
    s = cap[:, 0] - 0.3 + isovalue  # x of a cap vertex is a grid coordinate, so s is exact
    np.testing.assert_allclose(cap[:, 1], to_world(-1.0 + 1.0 / (1.0 + isovalue - s)), atol=1e-6)
    # The plane itself is exact for a linear SDF.
    inner = v[(np.abs(v[:, 1]) < 0.9) & (np.abs(v[:, 2]) < 0.9) & (v[:, 0] > 0)]
    np.testing.assert_allclose(inner[:, 0], 0.3, atol=1e-6)


def test_padding_deformation_is_zero():
    """On a cap edge the pad corner (index -1) has no offset, the border corner has d."""
    sdf = (X - 0.3).astype(np.float32)
    d = np.array([0.0, 0.3, 0.0], dtype=np.float32)
    verts, _ = marching_cubes(sdf, np.broadcast_to(d, (R, R, R, 3)))
    v = verts.astype(np.float64)
    # The cap at y = -1: x and z are grid coordinates (x offset is 0), y is blended.
    cap = v[v[:, 1] < -1.0 - 1e-6]
    assert len(cap) > 10
    t = 1.0 / (1.0 - (cap[:, 0] - 0.3))
    # (a + d_a) + t ((b + d_b) - (a + d_a)) with a = -1, d_a = 0, b = 0, d_b = 0.3.
    np.testing.assert_allclose(cap[:, 1], to_world(-1.0 + t * (1.0 + 0.3)), atol=1e-6)


@pytest.mark.parametrize("value, other", [(0.7, 1.4), (-0.7, -1.4), (0.0, 0.0), (0.5, 0.0), (-0.5, 0.0)])
def test_no_zero_crossing_gives_empty_arrays_and_a_warning(value, other):
    sdf = np.full((R, R, R), value, dtype=np.float32)
    sdf[3, 4, 5] = other  # not constant, still one sign (touching the level is not crossing it)
    with pytest.warns(EmptySurfaceWarning, match="no zero crossing"):
        verts, faces = marching_cubes(sdf)
    assert verts.shape == (0, 3) and verts.dtype == np.float32
    assert faces.shape == (0, 3) and faces.dtype == np.int64


def test_torch_input_equals_numpy_input():
    sdf = sphere_sdf(0.45, center=(0.1, 0.0, -0.1))
    deformation = np.random.default_rng(0).uniform(-0.4, 0.4, (R, R, R, 3)).astype(np.float32)
    np_v, np_f = marching_cubes(sdf, deformation)
    t_v, t_f = marching_cubes(torch.from_numpy(sdf).double(), torch.from_numpy(deformation))
    np.testing.assert_array_equal(t_f, np_f)
    np.testing.assert_array_equal(t_v, np_v)
    assert len(np_v) > 100


@pytest.mark.parametrize(
    "sdf_shape, deformation_shape, bbox, message",
    [
        ((R, R), None, None, "sdf must be a cubic grid"),
        ((R, R, R + 1), None, None, "sdf must be a cubic grid"),
        ((R, R, R), (R, R, R), None, "deformation must have shape"),
        ((R, R, R), (R, R, R - 1, 3), None, "deformation must have shape"),
        ((R, R, R), None, [[-1, -1, -1]], "bbox must have shape"),
        ((R, R, R), None, [[1, -1, -1], [-1, 1, 1]], "max > min"),
    ],
)
def test_wrong_shapes_raise(sdf_shape, deformation_shape, bbox, message):
    sdf = np.linspace(-1, 1, int(np.prod(sdf_shape)), dtype=np.float32).reshape(sdf_shape)
    deformation = None if deformation_shape is None else np.zeros(deformation_shape, np.float32)
    kwargs = {} if bbox is None else {"bbox": bbox}
    with pytest.raises(ValueError, match=message):
        marching_cubes(sdf, deformation, **kwargs)


def test_non_finite_sdf_raises():
    sdf = sphere_sdf()
    sdf[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        marching_cubes(sdf)


def test_remove_floaters_keeps_only_the_big_component():
    big = sphere_sdf(0.5, center=(-0.2, 0.0, 0.0))
    small = sphere_sdf(0.12, center=(0.65, 0.0, 0.0))
    mesh = trimesh.Trimesh(*marching_cubes(np.minimum(big, small)), process=False)
    alone = trimesh.Trimesh(*marching_cubes(big), process=False)
    assert len(mesh.faces) > len(alone.faces) + 50  # the floater is really there

    cleaned = remove_floaters(mesh, min_fraction=0.2)
    assert len(cleaned.faces) == len(alone.faces)
    assert len(cleaned.vertices) == len(alone.vertices)
    np.testing.assert_allclose(cleaned.volume, alone.volume, rtol=1e-6)
    assert cleaned.vertices[:, 0].max() < 0.35  # nothing left near the small sphere
    assert len(mesh.faces) > len(cleaned.faces)  # input untouched

    # The largest component survives any threshold; a low one keeps both (no copy made).
    assert len(remove_floaters(mesh, min_fraction=1.5).faces) == len(alone.faces)
    assert remove_floaters(mesh, min_fraction=0.01) is mesh
    # Empty meshes pass through.
    empty = trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), np.int64))
    assert len(remove_floaters(empty).faces) == 0


@pytest.mark.parametrize("target", [300, 1000])
def test_simplify_reaches_target_and_keeps_orientation(target):
    mesh = trimesh.Trimesh(*marching_cubes(sphere_sdf(0.5)), process=False)
    assert len(mesh.faces) > 3 * target
    small = simplify(mesh, target)
    assert abs(len(small.faces) - target) <= 0.1 * target
    assert small.volume > 0
    np.testing.assert_allclose(small.volume, mesh.volume, rtol=0.05)

    assert simplify(mesh, len(mesh.faces) + 10) is mesh  # already small enough
    empty = trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), np.int64))
    assert len(simplify(empty, 100).faces) == 0


# --- the torch marching cubes against PyMCubes, the library its case table comes from ---------------

def _pymcubes_reference(sdf: np.ndarray, isovalue: float = 0.0):
    """PyMCubes on the padded grid: vertices in unpadded grid index units, faces wound outward."""
    padded = np.pad(sdf.astype(np.float64), 1, constant_values=isovalue + 1.0)
    verts, faces = mcubes.marching_cubes(padded, isovalue)
    return np.asarray(verts) - 1.0, np.asarray(faces, dtype=np.int64)[:, ::-1]


def _triangles(vertices: np.ndarray, faces: np.ndarray) -> list[tuple]:
    """Each triangle as its corner positions, rotated to start at the smallest corner (winding kept),
    sorted: equal lists mean the same triangles with the same orientation, whatever the numbering."""
    out = []
    for tri in np.round(vertices[faces], 9).tolist():
        first = min(range(3), key=lambda k: tri[k])
        out.append(tuple(map(tuple, tri[first:] + tri[:first])))
    return sorted(out)


def test_case_table_triangles_lie_on_crossed_edges():
    table = case_table().numpy()
    assert table.shape == (256, 15)
    assert (table[0] == -1).all() and (table[255] == -1).all()
    counts = (table >= 0).sum(1)
    assert (counts % 3 == 0).all() and counts[1:255].min() == 3 and counts.max() == 15
    for case in range(256):
        low = [case >> k & 1 for k in range(8)]
        for e in table[case][table[case] >= 0]:
            a = CUBE_CORNERS.index(EDGE_STARTS[e])
            end = list(EDGE_STARTS[e])
            end[EDGE_AXES[e]] = 1
            b = CUBE_CORNERS.index(tuple(end))
            assert low[a] != low[b], f"case {case}: edge {e} does not cross the surface"
        tris = table[case][table[case] >= 0].reshape(-1, 3)
        assert all(len(set(t)) == 3 for t in tris.tolist())


@pytest.mark.parametrize("kind", ["gaussian", "integers with exact zeros", "sphere"])
def test_whole_grids_give_pymcubes_triangles(kind):
    rng = np.random.default_rng(7)
    if kind == "gaussian":
        sdf = rng.normal(size=(13, 13, 13)).astype(np.float32)
    elif kind == "integers with exact zeros":  # ties: s == iso sides with s < iso, as in PyMCubes
        sdf = rng.integers(-2, 3, (11, 11, 11)).astype(np.float32)
    else:
        sdf = sphere_sdf(0.55, center=(0.1, 0.0, -0.05))
    surface = extract_surface(torch.from_numpy(sdf))
    ref_v, ref_f = _pymcubes_reference(sdf)
    assert len(surface.faces) == len(ref_f) > 100
    assert len(surface) == len(ref_v)  # one vertex per crossed edge, shared by its cubes
    assert _triangles(surface.vertices().numpy(), surface.faces.numpy()) == _triangles(ref_v, ref_f)


def test_surface_corners_are_the_ends_of_the_vertex_edges():
    sdf = (X - 0.3).astype(np.float32)  # touches the border: some edges end in the padding
    surface = extract_surface(torch.from_numpy(sdf))
    start = surface.edge_start.numpy()
    end = start + np.eye(3, dtype=np.int64)[surface.edge_axis.numpy()]
    corners = surface.corners.numpy()
    assert ((corners >= 0) & (corners < R)).all()
    assert len(np.unique(corners, axis=0)) == len(corners)
    padded_row = np.vstack([corners, [[-9, -9, -9]]])  # slot K: the padding
    for slot, point in ((0, start), (1, end)):
        got = padded_row[surface.corner_slots[:, slot].numpy()]
        in_grid = ((point >= 0) & (point < R)).all(1)
        np.testing.assert_array_equal(got[in_grid], point[in_grid])
        assert (got[~in_grid] == -9).all()
    assert (~((start >= 0) & (start < R)).all(1)).any()  # the cap edges were exercised
    # vertices lie on their edges, between the two ends
    t = surface.t.numpy()
    assert ((t >= 0) & (t <= 1)).all()
