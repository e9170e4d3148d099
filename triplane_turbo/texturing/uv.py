"""A fast UV atlas for smooth, closed isosurfaces: box-projected charts, packed in numpy.

xatlas parametrises charts by least-squares conformal maps and packs them with a rasteriser; on a
60k-face marching-cubes mesh that takes seconds (3 s here, 39 s with its default options), more
than everything else that makes a textured mesh. The surfaces this model makes are smooth blobs, and
for those a projection is enough (Stable Fast 3D unwraps its meshes the same way):

1. each face picks one of the six axis directions ±x, ±y, ±z: the one its smoothed normal points
   most along, among those its own normal is within ``MAX_PROJECTION_ANGLE`` of (so that no
   triangle flips or collapses in the projection); a majority vote over its neighbours removes the
   speckle that marching-cubes normals leave near 45°, and tiny charts join a neighbour;
2. charts are the connected groups of faces with the same direction (across shared edges), each
   projected orthographically onto the plane perpendicular to its direction (right-handed, so every
   triangle keeps its winding in UV and the charts need no mirroring); a face around a vertex whose
   projected fan winds round twice (a marching-cubes sliver) becomes a chart of its own;
3. charts are turned to their principal axes and shelf-packed, tallest first, into one square at
   the largest scale that fits, with ``padding`` texels between charts at the bake size (all charts
   at one scale: the texel density is uniform up to the projection's foreshortening);
4. the packed atlas is rasterised at the bake size counting coverage; where a chart's projection
   overlaps itself, the faces involved leave it (a rim folding over), or a chart overlapping on many
   texels (a spiral ramp, a curled ear) is split along its depth, and the atlas is packed again,
   until no texel is covered twice. The last rasterisation is the bake's.

A surface too rough for charts (noise: their padding alone would not fit) gets one cell per
triangle instead (``triangle_atlas``), in O(F) time.

Everything is vectorised except the shelf packing's loop over charts (a few hundred on these
meshes). Written by hand because no maintained library does projection unwrapping: xatlas is the
maintained unwrapper, kept as ``texture.unwrap(..., method="xatlas")``.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from .coverage import rasterize_coverage, triangles_covering

logger = logging.getLogger(__name__)

#: The six projection directions and, per direction, the (u, v) axes with u × v = direction, so
#: that a triangle facing the direction keeps its counter-clockwise winding in UV.
DIRECTIONS = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=np.float64)
_U_AXIS = np.array([1, 2, 2, 0, 0, 1])  # +x: (y, z); -x: (z, y); +y: (z, x); -y: (x, z); +z: (x, y); -z: (y, x)
_V_AXIS = np.array([2, 1, 0, 2, 1, 0])
#: A face may be projected along a direction only within this angle of its normal: the projection
#: shrinks it by cos(angle) across one axis, so it keeps at least a third of its texels there.
MAX_PROJECTION_ANGLE = 70.0
#: Rounds of the neighbours' majority vote on the face labels.
VOTE_ROUNDS = 3
#: Charts of fewer faces are merged into a neighbour where their faces allow it.
CRUMB_FACES = 16
#: Rounds of trimming or splitting self-overlapping charts; after these, every face of a chart that
#: still overlaps itself becomes a chart of its own (a single triangle cannot overlap itself).
SPLIT_ROUNDS = 6
#: Snapping grid of the overlap check, 1/256 texel (see ``coverage.rasterize_coverage``).
ATLAS_SUBPIXEL_BITS = 8
#: A chart overlapping itself on more texels than this is split in depth, not trimmed face by face.
LARGE_OVERLAP_TEXELS = 64


def box_unwrap(vertices: np.ndarray, faces: np.ndarray, size: int = 1024, padding: int = 4,
               device: torch.device | str | None = None, return_owner: bool = False):
    """A UV atlas of box-projected charts, packed into one square.

    Args:
        vertices, faces: [V, 3] float and [F, 3] int, the mesh.
        size: the texture side the atlas will be baked at (the packing's resolution).
        padding: texels between charts at that size.
        device: where to rasterise the atlas for the overlap check (default: the CPU).
        return_owner: also return the check's rasterisation (what ``texels.texel_samples`` needs,
            so that a bake does not rasterise the atlas twice).
    Returns:
        vmapping [V'] int64 (the mesh vertex each UV vertex copies), faces [F, 3] int64 in UV-vertex
        indices (``vmapping[faces] == faces``), uv [V', 2] float32 in [0, 1] (v = 0 at the image's
        bottom row); with ``return_owner`` also owner [S, S] int64 on ``device``: the face each texel
        centre falls in (rows bottom-up, -1 in the gutters).
    """
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if len(faces) == 0:
        empty = (np.zeros(0, np.int64), np.zeros((0, 3), np.int64), np.zeros((0, 2), np.float32))
        return (*empty, torch.full((size, size), -1, dtype=torch.int64, device=device)) if return_owner else empty
    try:
        return _box_unwrap(vertices, faces, size, padding, device, return_owner)
    except _TooManyCharts as error:
        # a surface too rough for charts (noise, not an object): one cell per triangle, in O(F)
        logger.info("%s charts do not fit a %d² atlas: one UV cell per triangle", error, size)
        vmapping, uv_faces, uv = triangle_atlas(faces, size)
        if not return_owner:
            return vmapping, uv_faces, uv
        owner, _ = rasterize_coverage(atlas_pixels(uv, size, device), torch.from_numpy(uv_faces).to(device),
                                      (size, size), subpixel_bits=ATLAS_SUBPIXEL_BITS)
        return vmapping, uv_faces, uv, owner


def _box_unwrap(vertices, faces, size, padding, device, return_owner):
    """``box_unwrap`` for a non-empty mesh (float64 vertices, int64 faces)."""
    corners = vertices[faces]  # [F, 3, 3]
    cross = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    area2 = np.linalg.norm(cross, axis=1)
    normals = cross / np.maximum(area2, 1e-300)[:, None]
    pairs = face_adjacency(faces)
    labels, allowed = _direction_labels(normals, cross, faces, len(vertices), pairs)
    charts = _components(len(faces), pairs, labels)
    labels, charts = _absorb_crumbs(labels, charts, pairs, allowed)
    splits = np.zeros(len(faces), np.int64)  # refines the charts whose projection overlaps itself
    # faces taken out of their chart, one chart each: first those around a vertex whose projected
    # fan winds round more than once (marching-cubes slivers), found without rasterising
    projection = _project(vertices, faces, labels, charts)
    isolated = _folded_fans(projection)
    if isolated.any():
        charts = _components(len(faces), pairs, np.where(isolated, -1 - np.arange(len(faces)), labels))
        projection = _project(vertices, faces, labels, charts)
    attempt = 0
    while True:  # ends: every round takes faces out of overlapping charts, and a lone face cannot overlap
        vmapping, uv_faces, uv = _pack(projection, size, padding)
        uv = uv.astype(np.float32)
        xy, uv_faces_t = atlas_pixels(uv, size, device), torch.from_numpy(uv_faces).to(device)
        owner, count = rasterize_coverage(xy, uv_faces_t, (size, size), counted="ccw",
                                          subpixel_bits=ATLAS_SUBPIXEL_BITS)
        overlap = count > 1
        if not bool(overlap.any()):
            break
        culprits = triangles_covering(xy, uv_faces_t, overlap, ATLAS_SUBPIXEL_BITS).cpu().numpy()
        texels = np.bincount(charts[owner[overlap].cpu().numpy()], minlength=charts.max() + 1)
        if attempt >= SPLIT_ROUNDS:
            # last resort, never needed on the meshes measured: every face of an overlapping chart alone
            logger.info("charts still overlap after %d rounds: one chart per face for %d of them", attempt,
                        int((texels > 0).sum()))
            isolated |= np.isin(charts, np.flatnonzero(texels))
        else:
            # a small overlap (a chart's rim folding over itself) costs the faces involved their chart;
            # a large one (a ramp over a floor) splits the chart at its median depth, sheet from sheet
            large = np.flatnonzero(texels > LARGE_OVERLAP_TEXELS)
            splits = _split_by_depth(corners, labels, charts, np.isin(charts, large), splits)
            isolated[culprits[~np.isin(charts[culprits], large)]] = True
        key = np.where(isolated, -1 - np.arange(len(faces)), labels * (splits.max() + 1) + splits)
        charts = _components(len(faces), pairs, key)
        projection = _project(vertices, faces, labels, charts)
        attempt += 1
    out = (vmapping, uv_faces, uv)
    return (*out, owner) if return_owner else out


def atlas_pixels(uv: np.ndarray | torch.Tensor, size: int, device=None) -> torch.Tensor:
    """UV [V, 2] -> pixel coordinates [V, 2] float64 for ``coverage.rasterize_coverage`` (texel (c, r)
    samples uv ((c + 0.5)/S, (r + 0.5)/S), as ``texels.atlas_owner``)."""
    return torch.as_tensor(uv, device=device).double() * size


def face_adjacency(faces: np.ndarray) -> np.ndarray:
    """Pairs [P, 2] of faces sharing an edge (each pair once; an edge of k faces links them in a chain)."""
    edges = np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    key = edges[:, 0] * (int(faces.max()) + 1) + edges[:, 1]
    order = np.argsort(key, kind="stable")
    same = key[order[1:]] == key[order[:-1]]
    face = order // 3
    return np.stack([face[:-1][same], face[1:][same]], axis=1)


def _direction_labels(normals, cross, faces, vertex_count, pairs) -> tuple[np.ndarray, np.ndarray]:
    """Each face's projection direction [F] in 0..5 (an index into ``DIRECTIONS``), and the
    directions [F, 6] bool each face may take."""
    # smoothed normals: area-weighted vertex normals, averaged back onto the faces
    vertex_normals = np.stack([np.bincount(faces.ravel(), np.repeat(cross[:, k], 3), vertex_count)
                               for k in range(3)], axis=1)
    smooth = vertex_normals[faces].sum(1)
    allowed = normals @ DIRECTIONS.T > math.cos(math.radians(MAX_PROJECTION_ANGLE))  # [F, 6]
    allowed[np.arange(len(normals)), np.argmax(normals @ DIRECTIONS.T, axis=1)] = True  # degenerate faces too
    labels = np.argmax(np.where(allowed, smooth @ DIRECTIONS.T, -np.inf), axis=1)
    for _ in range(VOTE_ROUNDS):
        # the label most of a face's (usually three) neighbours have, where the face may take it
        both = np.concatenate([pairs, pairs[:, ::-1]])
        votes = np.bincount(both[:, 0] * 6 + labels[both[:, 1]], minlength=6 * len(labels)).reshape(-1, 6)
        votes = np.where(allowed, votes, -1)
        winner = np.argmax(votes, axis=1)
        change = (votes[np.arange(len(labels)), winner] >= 2) & (winner != labels)
        if not change.any():
            break
        labels = np.where(change, winner, labels)
    return labels, allowed


def _absorb_crumbs(labels, charts, pairs, allowed):
    """Faces of tiny charts (fewer than ``CRUMB_FACES``: where the surface sits near 45° to two
    axes the vote can leave single faces) join the largest neighbouring chart whose direction they
    may take. Returns the new labels and charts."""
    both = np.concatenate([pairs, pairs[:, ::-1]])
    for _ in range(3):
        sizes = np.bincount(charts)
        face, other = both[:, 0], both[:, 1]
        keep = (sizes[charts[face]] < CRUMB_FACES) & (sizes[charts[other]] > sizes[charts[face]])
        keep &= allowed[face, labels[other]]
        face, other = face[keep], other[keep]
        if len(face) == 0:
            break
        order = np.lexsort((-sizes[charts[other]], face))  # per face, the largest neighbouring chart first
        first = np.r_[True, face[order][1:] != face[order][:-1]]
        labels = labels.copy()
        labels[face[order][first]] = labels[other[order][first]]
        charts = _components(len(labels), pairs, labels)
    return labels, charts


def _components(face_count: int, pairs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Connected components [F] of the faces, linked across shared edges where labels agree."""
    import scipy.sparse
    from scipy.sparse.csgraph import connected_components

    keep = pairs[labels[pairs[:, 0]] == labels[pairs[:, 1]]]
    graph = scipy.sparse.coo_matrix((np.ones(len(keep), np.int8), (keep[:, 0], keep[:, 1])),
                                    shape=(face_count, face_count))
    return connected_components(graph, directed=False)[1]


def _project(vertices, faces, labels, charts):
    """Split the mesh along chart borders and project each chart.

    Returns vmapping [V'], uv_faces [F, 3], chart-local coordinates [V', 2] (world units) and the
    chart of each UV vertex [V'].
    """
    key = charts[:, None].astype(np.int64) * len(vertices) + faces  # one UV vertex per (chart, vertex)
    unique, inverse = np.unique(key.ravel(), return_inverse=True)
    vmapping = unique % len(vertices)
    vertex_chart = unique // len(vertices)
    chart_label = np.zeros(charts.max() + 1, np.int64)
    chart_label[charts] = labels
    label = chart_label[vertex_chart]
    points = vertices[vmapping]
    rows = np.arange(len(points))
    local = np.stack([points[rows, _U_AXIS[label]], points[rows, _V_AXIS[label]]], 1)
    return vmapping, inverse.reshape(-1, 3), local, vertex_chart


def _folded_fans(projection) -> np.ndarray:
    """Faces [F] bool around a UV vertex whose projected corner angles add up to more than a turn
    (``projection``: what ``_project`` returns).

    Every face keeps its winding in the projection, so around a vertex inside a chart the angles
    add up to one turn exactly unless the fan folds over itself (and on a chart's rim to less).
    """
    _, uv_faces, local, _ = projection
    corners = local[uv_faces]  # [F, 3, 2]
    to_next = np.roll(corners, -1, axis=1) - corners
    to_prev = np.roll(corners, 1, axis=1) - corners
    angle = np.abs(np.arctan2(to_next[..., 0] * to_prev[..., 1] - to_next[..., 1] * to_prev[..., 0],
                              (to_next * to_prev).sum(-1)))
    total = np.bincount(uv_faces.ravel(), angle.ravel(), minlength=len(local))
    folded = total > 2 * np.pi * (1 + 1e-6)
    return folded[uv_faces].any(1)


def _pack(projection, size, padding):
    """Turn and shelf-pack the projected charts (what ``_project`` returns). Returns vmapping,
    uv_faces, uv [V', 2] float64."""
    vmapping, uv_faces, local, vertex_chart = projection
    count = int(vertex_chart.max()) + 1  # charts are numbered 0.. (connected components), each with faces
    local = _principal_axes(local, vertex_chart, count)
    lo = np.full((count, 2), np.inf)
    hi = np.full((count, 2), -np.inf)
    _reduce(lo, hi, vertex_chart, local)
    extent = hi - lo
    scale, origin = _shelf_pack(extent, size, padding)
    uv = ((local - lo[vertex_chart]) * scale + origin[vertex_chart]) / size
    return vmapping, uv_faces, uv


def _reduce(lo, hi, groups, values):
    """Per-group min and max of ``values`` [N, 2] into ``lo``, ``hi`` [G, 2] (sorting beats ufunc.at)."""
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    present = sorted_groups[starts]
    lo[present] = np.minimum.reduceat(values[order], starts, axis=0)
    hi[present] = np.maximum.reduceat(values[order], starts, axis=0)


def _principal_axes(local, groups, count):
    """Each chart's points [N, 2] rotated so that its principal axis runs along u (a rotation keeps
    the winding); elongated charts then fill their bounding boxes better."""
    weight = np.bincount(groups, minlength=count).astype(np.float64)
    mean = np.stack([np.bincount(groups, local[:, k], count) for k in range(2)], 1) / np.maximum(weight, 1)[:, None]
    centred = local - mean[groups]
    cxx = np.bincount(groups, centred[:, 0] ** 2, count)
    cyy = np.bincount(groups, centred[:, 1] ** 2, count)
    cxy = np.bincount(groups, centred[:, 0] * centred[:, 1], count)
    angle = 0.5 * np.arctan2(2 * cxy, cxx - cyy)
    cos, sin = np.cos(angle)[groups], np.sin(angle)[groups]
    return np.stack([cos * centred[:, 0] + sin * centred[:, 1], -sin * centred[:, 0] + cos * centred[:, 1]], 1)


def _shelf_pack(extent: np.ndarray, size: int, padding: int):
    """Places boxes [C, 2] (width, height in world units) in a size × size square.

    Boxes go tallest first onto shelves, left to right; the scale (texels per world unit) is the
    largest that fits, found by bisection. Each box is padded by ``padding`` texels (rounded up to
    whole texels), so charts end up at least ``padding`` texels apart and from the border.

    Returns the scale and each box's origin [C, 2] in texels.
    """
    order = np.argsort(-extent[:, 1], kind="stable")

    def place(scale):
        boxes = np.ceil(extent[order] * scale) + padding
        origin = np.zeros((len(order), 2))
        x = y = shelf = 0.0
        for i, (w, h) in enumerate(boxes):
            if x + w > size - padding:
                x, y = 0.0, y + shelf
                shelf = 0.0
            if y + h > size - padding or w > size - padding:
                return None
            origin[i] = (x, y)
            x += w
            shelf = max(shelf, h)
        return origin

    if place(0.0) is None:  # even as bare padding the boxes do not fit
        raise _TooManyCharts(len(extent))
    area = float((extent[:, 0] * extent[:, 1]).sum())
    hi = (size - 2 * padding) / max(float(extent.max()), 1e-12)  # the largest box alone fills the side
    lo = min(hi, 0.5 * size / math.sqrt(max(area, 1e-24)))
    while place(lo) is None:  # many small boxes: their padding dominates
        lo /= 2
    for _ in range(20):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if place(mid) is not None else (lo, mid)
        if hi - lo < 1e-3 * lo:
            break
    origin = np.zeros((len(order), 2))
    origin[order] = place(lo) + padding / 2
    return lo, origin


def triangle_atlas(faces: np.ndarray, size: int, padding: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One UV cell per triangle: pairs of triangles share square cells on a regular grid.

    Each triangle maps to a right triangle (distorted, but with its own texels) separated from its
    neighbours by ``padding`` texels; the layout costs O(F) whatever the mesh. Same return values
    as ``box_unwrap``.
    """
    count = len(faces)
    cells = -(-count // 2)
    side = max(1, int(np.ceil(np.sqrt(cells))))
    cell = 1.0 / side
    pad = min(padding / size, cell / 8)
    index = np.arange(count)
    col, row = (index // 2) % side, (index // 2) // side
    x0, y0 = col * cell + pad, row * cell + pad
    x1, y1 = (col + 1) * cell - pad, (row + 1) * cell - pad
    gap = np.sqrt(2) * pad  # keeps the two triangles of a cell ``pad`` apart across the diagonal
    lower = index % 2 == 0
    corners = np.where(lower[:, None, None],
                       np.stack([np.stack([x0, y0], -1), np.stack([x1 - gap, y0], -1), np.stack([x0, y1 - gap], -1)], 1),
                       np.stack([np.stack([x1, y1], -1), np.stack([x0 + gap, y1], -1), np.stack([x1, y0 + gap], -1)], 1))
    return (np.asarray(faces, dtype=np.int64).reshape(-1), np.arange(3 * count, dtype=np.int64).reshape(count, 3),
            corners.reshape(-1, 2).astype(np.float32))


class _TooManyCharts(Exception):
    """The charts cannot be packed at any scale: their padding alone overfills the atlas."""


def _split_by_depth(corners, labels, charts, culprit, splits):
    """Halves each culprit chart at the median depth of its faces (along its projection direction):
    the sheets that overlap in projection lie at different depths. Returns the refined split ids."""
    depth = (corners.mean(1) * DIRECTIONS[labels]).sum(1)
    faces = np.flatnonzero(culprit)
    chart = charts[faces]
    order = np.lexsort((depth[faces], chart))
    sorted_chart = chart[order]
    starts = np.flatnonzero(np.r_[True, sorted_chart[1:] != sorted_chart[:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    rank = np.arange(len(order)) - np.repeat(starts, sizes)
    upper = np.empty(len(order), bool)
    upper[order] = rank >= np.repeat(sizes, sizes) / 2
    new = splits.copy()
    new[faces] = splits[faces] * 2 + upper
    return new


__all__ = ["DIRECTIONS", "MAX_PROJECTION_ANGLE", "atlas_pixels", "box_unwrap", "face_adjacency", "triangle_atlas"]
