"""triplane_turbo.texturing.uv: the box-projection atlas's promises, on smooth closed shapes and on a spiral
ramp whose projection folds over itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from triplane_turbo.texturing.coverage import rasterize_coverage
from triplane_turbo.texturing.texels import atlas_owner
from triplane_turbo.texturing.uv import DIRECTIONS, MAX_PROJECTION_ANGLE, atlas_pixels, box_unwrap

SIZE = 256
PADDING = 4


def blob() -> trimesh.Trimesh:
    """A smooth, lumpy closed surface (20k faces), like the model's objects."""
    sphere = trimesh.creation.icosphere(subdivisions=5)
    x, y, z = sphere.vertices.T
    radius = 1 + 0.25 * np.sin(3 * x) * np.cos(2 * y) + 0.15 * np.sin(4 * z + 1)
    return trimesh.Trimesh(sphere.vertices * radius[:, None], sphere.faces, process=False)


def spiral_ramp(turns: float = 2.5) -> trimesh.Trimesh:
    """A gently rising helical strip: every face looks up +z, and the projection onto the xy-plane
    covers the annulus ``turns`` times."""
    angle = np.linspace(0, 2 * np.pi * turns, int(120 * turns) + 1)
    radius = np.linspace(0.5, 1.0, 6)
    a, r = np.meshgrid(angle, radius, indexing="ij")
    vertices = np.stack([r * np.cos(a), r * np.sin(a), 0.05 * a], -1).reshape(-1, 3)
    cols = len(radius)
    quads = [(i * cols + j, i * cols + j + 1, (i + 1) * cols + j + 1, (i + 1) * cols + j)
             for i in range(len(angle) - 1) for j in range(cols - 1)]
    faces = np.array([[q[0], q[1], q[2]] for q in quads] + [[q[0], q[2], q[3]] for q in quads])
    return trimesh.Trimesh(vertices, faces, process=False)


def charts_of(faces: np.ndarray, uv_count: int) -> np.ndarray:
    """Chart id per face: faces sharing a UV vertex are in one chart."""
    import scipy.sparse
    from scipy.sparse.csgraph import connected_components

    rows = np.repeat(np.arange(len(faces)), 3)
    graph = scipy.sparse.coo_matrix((np.ones(rows.size), (rows, faces.ravel())), shape=(len(faces), uv_count)).tocsr()
    return connected_components(graph @ graph.T, directed=False)[1]


def check_atlas(mesh: trimesh.Trimesh, vmapping, faces, uv, owner):
    """The contract of an atlas: returns the chart of each face."""
    assert vmapping.dtype == faces.dtype == np.int64 and uv.dtype == np.float32
    assert np.array_equal(vmapping[faces], mesh.faces)
    assert uv.min() >= 0 and uv.max() <= 1
    # every face keeps its winding, and none collapses: UV area = 3D area x cos(its projection angle) x scale²
    corners = uv[faces].astype(np.float64)
    d1, d2 = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
    uv_area = 0.5 * (d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0])
    area = mesh.area_faces
    assert (uv_area > 0).all()
    chart = charts_of(faces, len(uv))
    # every face is an orthographic projection along one of the six directions, all at one scale
    cosines = mesh.face_normals @ DIRECTIONS.T  # [F, 6]
    ratio = uv_area[:, None] / (area[:, None] * np.clip(cosines, 1e-9, None))
    scale2 = np.median(ratio[np.arange(len(faces)), np.argmax(cosines, 1)])  # most faces take their dominant axis
    matches = (cosines > np.cos(np.radians(MAX_PROJECTION_ANGLE)) - 1e-9) & (np.abs(ratio / scale2 - 1) < 1e-2)
    measurable = uv_area * SIZE**2 > 0.05  # float32 UVs resolve the area of triangles above 1/20 texel
    assert matches[measurable].any(1).all()
    # no texel drawn twice, and the owner handed to the bake is the atlas's own rasterisation
    _, count = rasterize_coverage(atlas_pixels(uv, SIZE), torch.tensor(faces), (SIZE, SIZE), counted="ccw",
                                  subpixel_bits=8)
    assert int(count.max()) == 1
    assert torch.equal(owner, atlas_owner(torch.tensor(uv), torch.tensor(faces), SIZE))
    # charts at least PADDING texels apart: no two texels of different charts closer than that
    texel_chart = np.where(owner.numpy() >= 0, chart[owner.numpy().clip(0)], -1)
    for dy in range(-PADDING + 1, PADDING):
        for dx in range(-PADDING + 1, PADDING):
            if dx * dx + dy * dy >= PADDING * PADDING or (dx, dy) == (0, 0):
                continue
            a = texel_chart[max(dy, 0):SIZE + min(dy, 0), max(dx, 0):SIZE + min(dx, 0)]
            b = texel_chart[max(-dy, 0):SIZE + min(-dy, 0), max(-dx, 0):SIZE + min(-dx, 0)]
            assert not ((a >= 0) & (b >= 0) & (a != b)).any(), (dx, dy)
    return chart


def test_a_smooth_blob_gets_few_charts_tightly_packed():
    mesh = blob()
    vmapping, faces, uv, owner = box_unwrap(mesh.vertices, mesh.faces, SIZE, PADDING, return_owner=True)
    chart = check_atlas(mesh, vmapping, faces, uv, owner)
    sizes = np.bincount(chart)
    assert 6 <= len(sizes) <= 20 and np.sort(sizes)[-6:].sum() > 0.85 * len(faces)  # six big charts, a few small
    uv_area = trimesh.triangles.area(np.pad(uv[faces], ((0, 0), (0, 0), (0, 1)))).sum()
    assert uv_area > 0.35  # measured 0.39 (10 charts); xatlas: 0.27 (83 charts) at this size and padding
    assert len(uv) < 1.1 * len(mesh.vertices)  # seams cost few extra vertices


def test_a_torus_unwraps_without_overlaps():
    mesh = trimesh.creation.torus(major_radius=1.0, minor_radius=0.35, major_sections=96, minor_sections=48)
    vmapping, faces, uv, owner = box_unwrap(mesh.vertices, mesh.faces, SIZE, PADDING, return_owner=True)
    check_atlas(mesh, vmapping, faces, uv, owner)


def test_a_spiral_ramp_is_split_where_its_projection_folds_over_itself():
    mesh = spiral_ramp()
    assert (mesh.face_normals[:, 2] > 0.7).all()  # one label for every face: one chart before the checks
    vmapping, faces, uv, owner = box_unwrap(mesh.vertices, mesh.faces, SIZE, PADDING, return_owner=True)
    chart = check_atlas(mesh, vmapping, faces, uv, owner)
    assert 3 <= len(np.unique(chart)) <= 12  # 2.5 turns: cut into about one chart per turn


def test_degenerate_faces_and_an_empty_mesh():
    mesh = blob()
    faces = np.concatenate([mesh.faces, [[0, 0, 1], [5, 6, 5]]])  # two faces with a repeated vertex
    vmapping, uv_faces, uv = box_unwrap(mesh.vertices, faces, SIZE, PADDING)
    assert np.array_equal(vmapping[uv_faces], faces) and uv.min() >= 0 and uv.max() <= 1
    empty = box_unwrap(np.zeros((0, 3)), np.zeros((0, 3), np.int64), SIZE, return_owner=True)
    assert [len(x) for x in empty[:3]] == [0, 0, 0] and bool((empty[3] == -1).all())


@pytest.mark.parametrize("size", [64, 1024])
def test_the_padding_holds_at_other_sizes(size):
    mesh = trimesh.creation.icosphere(subdivisions=3)
    _, faces, uv = box_unwrap(mesh.vertices, mesh.faces, size, 2)
    boxes = []
    for c in np.unique(charts := charts_of(faces, len(uv))):
        points = uv[np.unique(faces[charts == c])] * size
        boxes.append((points.min(0), points.max(0)))
    # the charts' bounding boxes (which the shelf packer places) keep 2 texels apart
    for i, (lo_a, hi_a) in enumerate(boxes):
        for lo_b, hi_b in boxes[i + 1:]:
            gap = np.maximum(lo_b - hi_a, lo_a - hi_b).max()
            assert gap >= 2 - 1e-3


@pytest.mark.parametrize("setting", [("SPLIT_ROUNDS", 0), ("LARGE_OVERLAP_TEXELS", 10**9)])
def test_the_other_ways_out_of_an_overlap_also_end_clean(monkeypatch, setting):
    """Trimming the faces involved (what a small overlap gets), and the last resort of one chart per
    face for a chart that still overlaps itself: both leave no texel covered twice."""
    from triplane_turbo.texturing import uv

    monkeypatch.setattr(uv, *setting)
    mesh = spiral_ramp(1.5)
    vmapping, faces, uv_coords, owner = box_unwrap(mesh.vertices, mesh.faces, SIZE, PADDING, return_owner=True)
    chart = check_atlas(mesh, vmapping, faces, uv_coords, owner)
    assert len(np.unique(chart)) > 20  # single faces came out of the folded chart
