"""Silhouette antialiasing with nvdiffrast's semantics: ``nvdiffrast.torch.antialias`` on CUDA when
installed, the same analysis written in torch elsewhere.

What it computes (Laine et al. 2020, "Modular Primitives for High-Performance Differentiable
Rendering", §4.3): for every pair of horizontally or vertically adjacent pixels whose rasterised
triangle ids differ, take the nearer of the two triangles (a pixel without a triangle counts as
infinitely far) and look for one of its *silhouette* edges (an edge with no neighbouring triangle, or
whose neighbour folds onto the same side of it on screen) that crosses the segment between the two
pixel centres and is closer to perpendicular to it than parallel. If the edge crosses at a fraction
``c`` ∈ [0, 1] of the way from the triangle's pixel to the other, the two colours are blended as if
the edge cut the pixels: with α = ½ − c, the triangle's pixel becomes ``own + α (other − own)``
when α > 0, else the other pixel becomes ``other + |α| (own − other)``. For a straight edge this is
the exact coverage of the pixel square along the segment. The blend is differentiable in the colours
and, through ``c``, in the edge's vertex positions: that is the visibility (silhouette) gradient a
rasteriser alone does not have. Where α saturates (|α| = ½) the position gradient is zero.

The torch path evaluates every candidate pair at once (no hash table: the neighbour across each edge
comes from sorting the edges); autograd then gives the gradients that nvdiffrast's kernel writes by
hand. An edge shared by more than two triangles counts as a silhouette here (nvdiffrast keeps two of
them, in an order its atomics decide); marching-cubes meshes have none.
"""

from __future__ import annotations

import torch

from .raster import resolve_backend


def edge_neighbours(faces: torch.Tensor) -> torch.Tensor:
    """For each triangle and each edge i (the one opposite corner i), the vertex of the triangle
    on the other side of that edge, or -1 where there is none (a boundary): [F, 3] int64."""
    faces = faces.long()
    f = len(faces)
    if f == 0:
        return faces.new_zeros((0, 3))
    a = faces[:, [1, 2, 0]]  # edge i joins corners i+1 and i+2
    b = faces[:, [2, 0, 1]]
    lo, hi = torch.minimum(a, b).reshape(-1), torch.maximum(a, b).reshape(-1)
    key = lo * (int(faces.max()) + 1) + hi
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    same_next = torch.zeros_like(sorted_key, dtype=torch.bool)
    same_next[:-1] = sorted_key[1:] == sorted_key[:-1]
    count = torch.unique_consecutive(sorted_key, return_counts=True)[1]
    group_size = torch.repeat_interleave(count, count)  # per sorted entry
    paired = group_size == 2
    partner = torch.where(same_next, torch.arange(len(key), device=key.device) + 1,
                          torch.arange(len(key), device=key.device) - 1)
    opposite_corner = faces.reshape(-1)  # corner i of triangle t sits at 3t + i, opposite edge i
    result = torch.full_like(key, -1)
    result[order[paired]] = opposite_corner[order[partner[paired]]]
    return result.reshape(f, 3)


def antialias(color: torch.Tensor, rast: torch.Tensor, positions: torch.Tensor, faces: torch.Tensor,
              backend: str = "auto", neighbours: torch.Tensor | None = None) -> torch.Tensor:
    """``nvdiffrast.torch.antialias``: colours blended across silhouette edges.

    Args:
        color: [B, H, W, C] images in the rasteriser's layout (row 0 at the bottom).
        rast: [B, H, W, 4] the rasteriser's output for these images (``raster.rasterize``).
        positions: [B, V, 4] or [V, 4] the clip positions that were rasterised (gradients flow here).
        faces: [F, 3] triangles.
        backend: "auto" (nvdiffrast for CUDA tensors when installed), "torch" or "nvdiffrast".
        neighbours: ``edge_neighbours(faces)`` when already computed.
    Returns:
        [B, H, W, C].
    """
    if resolve_backend(backend, color.device) == "nvdiffrast":
        import nvdiffrast.torch as dr

        return dr.antialias(color.contiguous(), rast.contiguous(), positions.float().contiguous(),
                            faces.to(device=color.device, dtype=torch.int32).contiguous())
    if len(faces) == 0:
        return color
    positions = positions[None] if positions.ndim == 2 else positions
    positions = positions.expand(rast.shape[0], -1, -1).float()
    faces = faces.to(device=color.device, dtype=torch.long)
    if neighbours is None:
        neighbours = edge_neighbours(faces)
    out = color
    for down in (False, True):
        out = _blend_pairs(out, color, rast, positions, faces, neighbours, down)
    return out


def _same_sign(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # as nvdiffrast: by the sign bits, so -0.0 counts as negative
    return torch.signbit(a) == torch.signbit(b)


def _blend_pairs(out, color, rast, positions, faces, neighbours, down: bool):
    b, h, w, _ = color.shape
    tri_id = rast[..., 3]
    if down:
        first, second = tri_id[:, :-1, :], tri_id[:, 1:, :]
    else:
        first, second = tri_id[:, :, :-1], tri_id[:, :, 1:]
    batch, py, px = (first != second).nonzero(as_tuple=True)
    if len(batch) == 0:
        return out
    qy, qx = (py + 1, px) if down else (py, px + 1)
    tri0 = rast[batch, py, px, 3].long() - 1
    tri1 = rast[batch, qy, qx, 3].long() - 1
    z0, z1 = rast[batch, py, px, 2], rast[batch, qy, qx, 2]
    use1 = (tri0 < 0) | ((tri1 >= 0) & ~(z0 < z1))  # the nearer triangle; the background is farthest
    tri = torch.where(use1, tri1, tri0)
    ref_x = torch.where(use1, qx, px).float() + 0.5
    ref_y = torch.where(use1, qy, py).float() + 0.5
    ds = torch.where(use1, -1.0, 1.0)

    corner = faces[tri]  # [P, 3]
    other = neighbours[tri]  # [P, 3]
    other = torch.where(other >= 0, other, corner)  # no neighbour: the corner itself (always a silhouette)
    pos = positions[batch[:, None], corner]  # [P, 3, 4]
    opp = positions[batch[:, None], other]

    def screen(p):  # pixel coordinates relative to the reference pixel's centre
        x = (p[..., 0] / p[..., 3] + 1) * (w / 2) - ref_x[:, None]
        y = (p[..., 1] / p[..., 3] + 1) * (h / 2) - ref_y[:, None]
        return x, y

    x, y = screen(pos)
    ox, oy = screen(opp)
    x0, x1, x2 = x.unbind(1)
    y0, y1, y2 = y.unbind(1)
    area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
    wing = torch.stack([(x1 - ox[:, 0]) * (y2 - oy[:, 0]) - (x2 - ox[:, 0]) * (y1 - oy[:, 0]),
                        (x2 - ox[:, 1]) * (y0 - oy[:, 1]) - (x0 - ox[:, 1]) * (y2 - oy[:, 1]),
                        (x0 - ox[:, 2]) * (y1 - oy[:, 2]) - (x1 - ox[:, 2]) * (y0 - oy[:, 2])], 1)
    silhouette = _same_sign(wing, area[:, None])  # [P, 3]: the neighbour folds onto the same side
    if down:  # measure along the segment's own axis
        x, y = y, x
    # edge i joins corners i+1 and i+2; its crossing of the line through both pixel centres
    xa, ya = x[:, [1, 2, 0]], y[:, [1, 2, 0]]
    xb, yb = x[:, [2, 0, 1]], y[:, [2, 0, 1]]
    dx, dy = xb - xa, yb - ya
    numerator = ds[:, None] * (xa * dy - ya * dx)
    crosses = ~_same_sign(ya, yb)
    dy_safe = torch.where(crosses, dy, torch.ones_like(dy))
    crossing = torch.where(crosses, numerator / dy_safe, torch.full_like(dy, -float("inf")))
    best = crossing.detach().argmax(1)  # the furthest crossing edge, as nvdiffrast's max_idx3
    pick = lambda t: t.gather(1, best[:, None])[:, 0]  # noqa: E731
    usable = pick(silhouette) & pick(crosses) & (pick(dy).abs() >= pick(dx).abs())
    c = pick(crossing)
    eps = 1.0 / 16  # nvdiffrast: no more than 1/16 pixel inaccuracy expected
    usable &= (c.detach() > -eps) & (c.detach() < 1 + eps)
    if not bool(usable.any()):
        return out
    batch, py, px, qy, qx = batch[usable], py[usable], px[usable], qy[usable], qx[usable]
    alpha = ds[usable] * (0.5 - c[usable].clamp(0.0, 1.0))  # [P]
    difference = color[batch, qy, qx] - color[batch, py, px]  # [P, C]
    first_pixel = alpha.detach() > 0
    target_y = torch.where(first_pixel, py, qy)
    target_x = torch.where(first_pixel, px, qx)
    flat = (batch * h + target_y) * w + target_x
    delta = torch.zeros(b * h * w, color.shape[-1], dtype=color.dtype, device=color.device)
    delta = delta.index_add(0, flat, alpha[:, None].to(color.dtype) * difference)
    return out + delta.reshape(color.shape)


__all__ = ["antialias", "edge_neighbours"]
