"""MikkTSpace tangents, the frames glTF viewers derive for a normal map when a file has no TANGENT.

glTF 2.0 (§3.7.2.1): "When tangents are not specified, client implementations SHOULD calculate
tangents using default MikkTSpace algorithms with the specified vertex positions, normals, and
texture coordinates associated with the normal texture." A normal map baked in any other frame is
shaded differently from viewer to viewer; baked in these, and shipped with them as TANGENT, it is
decoded alike everywhere.

This is a vectorised port of Morten Mikkelsen's reference implementation (mikktspace.c,
``genTangSpaceDefault``) for triangle meshes, written because no maintained Python binding builds
here (``pymikktspace`` 0.3.0, the one on PyPI, was last released in 2021 and no longer compiles
with Cython 3). The algorithm, step by step as the reference does it:

1. vertices with identical position, normal and texture coordinate are welded;
2. triangles with two identical corner positions are degenerate and set aside;
3. per triangle, the directions of increasing s and t (``vOs``, ``vOt``: the first-order
   derivatives of position by texture coordinate), normalised, with the sign of the triangle's
   texture-space area (orientation preserving or not); a triangle with no texture area or a
   zero derivative "groups with anything";
4. triangles sharing an edge (with consistent winding) are neighbours; at every welded vertex the
   corners of neighbouring triangles with the same orientation form a group (a fan, split where
   the orientation flips or the fan is cut);
5. each group's tangent is the angle-weighted mean of its triangles' ``vOs`` projected onto the
   vertex normal's plane and normalised, and its sign is +1 for orientation-preserving groups;
6. corners of degenerate triangles copy the frame of the first healthy corner with the same welded
   vertex; corners in no group keep the default (1, 0, 0) with sign -1.

Two simplifications, both on measure-zero cases: the reference splits a group further where two
of its triangles' projected tangents are exactly opposite (its default angular threshold is 180°),
which is not done here; and a triangle that groups with anything takes the orientation of the
first group whose flood fill reaches it (the reference's one order dependency), replaced here by
the orientation of its first neighbour that has one, spreading outwards from the healthy triangles.
``tests/test_tangents.py`` checks this port against the WebAssembly build of the reference (npm
``mikktspace``, what three.js and glTF-Transform use).

Decoding, as viewers do (and as the baker inverts): with the vertex normal N and tangent T
interpolated over the triangle, B = w · (N × T) and the shading normal is
normalize(x T + y B + z N) for the map's (x, y, z).
"""

from __future__ import annotations

import numpy as np

#: The reference's test for "not zero": |x| > FLT_MIN.
_TINY = float(np.finfo(np.float32).tiny)


def mikktspace(positions: np.ndarray, normals: np.ndarray, uv: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """MikkTSpace tangents of every triangle corner.

    Args:
        positions: [V, 3] vertex positions.
        normals: [V, 3] unit vertex normals.
        uv: [V, 2] texture coordinates, v up (trimesh's and OpenGL's convention; MikkTSpace's own).
            glTF stores v down: flip it (v -> 1 - v) before calling this on a glTF's TEXCOORD_0.
        faces: [F, 3] vertex indices, counter-clockwise seen from outside.
    Returns:
        [F, 3, 4] float32: per corner the unit tangent (xyz) and the bitangent sign w = ±1.
    """
    positions = np.asarray(positions, dtype=np.float32).astype(np.float64)
    normals = np.asarray(normals, dtype=np.float32).astype(np.float64)
    uv = np.asarray(uv, dtype=np.float32).astype(np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    count = len(faces)
    out = np.zeros((count, 3, 4), np.float32)
    out[..., 0], out[..., 3] = 1.0, -1.0  # the reference's default frame
    if count == 0:
        return out

    # 1-2. welding, and degenerate triangles (two corners at one position)
    weld = _row_ids(np.concatenate([positions, normals, uv], axis=1))[faces]  # [F, 3]
    place = _row_ids(positions)[faces]
    good = (place[:, 0] != place[:, 1]) & (place[:, 0] != place[:, 2]) & (place[:, 1] != place[:, 2])

    # 3. first-order derivatives per triangle
    p = positions[faces]
    t = uv[faces]
    d1, d2 = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]
    t21, t31 = t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]
    signed_area = t21[:, 0] * t31[:, 1] - t21[:, 1] * t31[:, 0]
    v_os = t31[:, 1:2] * d1 - t21[:, 1:2] * d2
    v_ot = -t31[:, 0:1] * d1 + t21[:, 0:1] * d2
    orient = signed_area > 0
    textured = np.abs(signed_area) > _TINY
    sign = np.where(orient, 1.0, -1.0)[:, None]
    len_os, len_ot = np.linalg.norm(v_os, axis=1), np.linalg.norm(v_ot, axis=1)
    v_os = np.where((textured & (len_os > _TINY))[:, None], sign * v_os / np.where(len_os > 0, len_os, 1)[:, None], 0.0)
    mag_s = np.where(textured, len_os / np.where(textured, np.abs(signed_area), 1), 0.0)
    mag_t = np.where(textured, len_ot / np.where(textured, np.abs(signed_area), 1), 0.0)
    with_any = ~(textured & (mag_s > _TINY) & (mag_t > _TINY))

    # 4. neighbours across edges (healthy triangles only), then groups of corners
    neighbour = _neighbours(weld, good)  # [F, 3]: across edge k (corners k, k+1); -1 for none
    healthy = np.flatnonzero(good)
    orient = _adopted_orientation(orient, neighbour, good & with_any)
    group = _corner_groups(weld, neighbour, orient, good, with_any)  # [F, 3], -1: in no group

    # 5. each group's tangent: angle-weighted projected directions of its healthy triangles
    n = normals[faces]  # [F, 3 corners, 3]
    projected = v_os[:, None, :] - (n * v_os[:, None, :]).sum(-1, keepdims=True) * n
    projected = _normalised(projected)
    before, after = p[:, [2, 0, 1]] - p, p[:, [1, 2, 0]] - p  # edges to the previous and next corner
    before = _normalised(before - (before * n).sum(-1, keepdims=True) * n)
    after = _normalised(after - (after * n).sum(-1, keepdims=True) * n)
    angle = np.arccos(np.clip((before * after).sum(-1), -1.0, 1.0))  # [F, 3]
    contributes = (group >= 0) & ~with_any[:, None]
    groups = int(group.max()) + 1
    total = np.zeros((groups, 3))
    for axis in range(3):
        total[:, axis] = np.bincount(group[contributes], (angle[..., None] * projected)[contributes][:, axis], groups)
    total = _normalised(total)
    group_orient = np.zeros(groups, bool)
    group_orient[group[group >= 0]] = np.broadcast_to(orient[:, None], group.shape)[group >= 0]
    assigned = group >= 0
    out[assigned, :3] = total[group[assigned]]
    out[assigned, 3] = np.where(group_orient[group[assigned]], 1.0, -1.0)

    # 6. degenerate triangles copy the first healthy corner with the same welded vertex
    if (~good).any() and len(healthy):
        flat_weld = weld[healthy].reshape(-1)
        first = np.full(int(weld.max()) + 1, -1, np.int64)
        order = np.arange(len(flat_weld))[::-1]  # written last = the first occurrence
        first[flat_weld[order]] = order
        bad = np.flatnonzero(~good)
        source = first[weld[bad]]  # [B, 3] flat corner among the healthy ones, -1 if none
        found = source >= 0
        copied = out[healthy].reshape(-1, 4)[np.where(found, source, 0)]
        out[bad] = np.where(found[..., None], copied, out[bad])
    return out


def split_by_corner(faces: np.ndarray, corner_values: np.ndarray, vertex_count: int | None = None):
    """Per-vertex values from per-corner ones, splitting the vertices whose corners disagree.

    Args:
        faces: [F, 3] vertex indices.
        corner_values: [F, 3, K] a value per corner (e.g. ``mikktspace``'s tangents).
        vertex_count: V, the number of vertices (default: faces.max() + 1).
    Returns:
        extra [E] int64: the vertex each new vertex copies (new vertices are numbered V, V+1, ...);
        faces [F, 3] with split corners renumbered; values [V + E, K] (vertices no face uses get zeros).
    """
    faces = np.asarray(faces, dtype=np.int64)
    values = np.asarray(corner_values).reshape(faces.size, -1)
    if vertex_count is None:
        vertex_count = int(faces.max()) + 1 if faces.size else 0
    rows = np.concatenate([faces.reshape(-1, 1).astype(np.float64), values.astype(np.float64)], axis=1)
    ids = _row_ids(rows)  # one id per distinct (vertex, value)
    unique_ids, first = np.unique(ids, return_index=True)
    owner = faces.reshape(-1)[first]  # the vertex of each distinct (vertex, value)
    # the first distinct value of a vertex keeps its number, the others get new ones
    order = np.lexsort((first, owner))
    keeps = np.r_[True, owner[order][1:] != owner[order][:-1]]
    number = np.empty(len(unique_ids), np.int64)
    number[order[keeps]] = owner[order][keeps]
    extra = owner[order][~keeps]
    number[order[~keeps]] = vertex_count + np.arange(len(extra))
    remap = np.empty(int(ids.max()) + 1 if ids.size else 0, np.int64)
    remap[unique_ids] = number
    new_faces = remap[ids].reshape(faces.shape)
    out = np.zeros((vertex_count + len(extra), values.shape[1]), corner_values.dtype)
    out[new_faces.reshape(-1)] = values
    return extra, new_faces, out


def _row_ids(rows: np.ndarray) -> np.ndarray:
    """An id per row [N] such that equal rows (as float32 values; -0 = +0) get equal ids."""
    rows = np.ascontiguousarray(np.asarray(rows, dtype=np.float32) + np.float32(0.0))
    view = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).reshape(-1)
    return np.unique(view, return_inverse=True)[1].reshape(-1)


def _normalised(vectors: np.ndarray) -> np.ndarray:
    """Unit vectors along the last axis; zero vectors stay zero (the reference's VNotZero test)."""
    length = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return np.where(length > _TINY, vectors / np.where(length > 0, length, 1), 0.0)


def _neighbours(weld: np.ndarray, good: np.ndarray) -> np.ndarray:
    """[F, 3]: the healthy triangle across edge k (corners k -> k+1) of each healthy triangle, or -1.

    As the reference: an edge pairs with an edge of the opposite direction (consistent winding);
    where more than two triangles share an edge, in order of triangle number, each with the first
    free match.
    """
    count = len(weld)
    neighbour = np.full((count, 3), -1, np.int64)
    face = np.repeat(np.arange(count), 3)
    slot = np.tile(np.arange(3), count)
    start, end = weld.reshape(-1), weld[:, [1, 2, 0]].reshape(-1)
    keep = good[face]
    face, slot, start, end = face[keep], slot[keep], start[keep], end[keep]
    lo, hi = np.minimum(start, end), np.maximum(start, end)
    order = np.lexsort((face, hi, lo))
    lo, hi, face, slot, start = lo[order], hi[order], face[order], slot[order], start[order]
    first = np.r_[True, (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])]
    group_start = np.flatnonzero(first)
    sizes = np.diff(np.r_[group_start, len(lo)])
    # the common case: two triangles, opposite directions
    pair = group_start[sizes == 2]
    opposite = start[pair] != start[pair + 1]
    a, b = pair[opposite], pair[opposite] + 1
    neighbour[face[a], slot[a]] = face[b]
    neighbour[face[b], slot[b]] = face[a]
    for g in group_start[sizes > 2]:  # non-manifold edges: the reference's greedy pairing
        members = range(g, g + int(sizes[np.searchsorted(group_start, g)]))
        for i in members:
            if neighbour[face[i], slot[i]] >= 0:
                continue
            for j in members:
                if j > i and start[j] != start[i] and neighbour[face[j], slot[j]] < 0:
                    neighbour[face[i], slot[i]], neighbour[face[j], slot[j]] = face[j], face[i]
                    break
    return neighbour


def _adopted_orientation(orient: np.ndarray, neighbour: np.ndarray, with_any: np.ndarray) -> np.ndarray:
    """Orientations [F] after the triangles that group with anything take one from a neighbour.

    The reference gives such a triangle the orientation of the first group whose flood fill reaches
    it, through other such triangles too; here each takes, round by round, the orientation of its
    first neighbour (across edge 0, 1, then 2) that has one, starting from the healthy triangles.
    """
    orient = orient.copy()
    known = ~with_any
    for _ in range(len(orient)):
        pending = np.flatnonzero(~known)
        if len(pending) == 0:
            break
        candidates = neighbour[pending]  # [P, 3]
        usable = (candidates >= 0) & known[np.where(candidates >= 0, candidates, 0)]
        found = usable.any(1)
        if not found.any():
            break
        first = candidates[np.arange(len(pending)), np.argmax(usable, axis=1)]
        orient[pending[found]] = orient[first[found]]
        known[pending[found]] = True
    return orient


def _corner_groups(weld, neighbour, orient, good, with_any) -> np.ndarray:
    """[F, 3] group id of each corner (-1: none): the connected fans of same-orientation neighbours
    around each welded vertex that contain a healthy (not group-with-anything) triangle."""
    import scipy.sparse
    from scipy.sparse.csgraph import connected_components

    count = len(weld)
    links = []
    for k in range(3):  # corner k of f touches the edges k (corners k, k+1) and k-1 (corners k-1, k)
        for edge in (k, (k + 2) % 3):
            g = neighbour[:, edge]
            f = np.flatnonzero((g >= 0) & good)
            g = g[f]
            f = f[orient[f] == orient[g]]
            g = neighbour[f, edge]
            j = np.argmax(weld[g] == weld[f, k][:, None], axis=1)  # the neighbour's corner at this vertex
            links.append(np.stack([f * 3 + k, g * 3 + j], 1))
    links = np.concatenate(links)
    graph = scipy.sparse.coo_matrix((np.ones(len(links), np.int8), (links[:, 0], links[:, 1])),
                                    shape=(3 * count, 3 * count))
    _, component = connected_components(graph, directed=False)
    component = component.reshape(count, 3)
    seeded = np.zeros(component.max() + 1, bool)
    seeded[component[good & ~with_any].reshape(-1)] = True
    in_group = good[:, None] & seeded[component]
    _, group = np.unique(np.where(in_group, component, -1), return_inverse=True)
    group = group.reshape(count, 3) - (1 if (~in_group).any() else 0)
    return np.where(in_group, group, -1)


__all__ = ["mikktspace", "split_by_corner"]
