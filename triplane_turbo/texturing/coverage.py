"""Which pixel centres flat triangles cover, with ``raster.rasterize``'s rules, triangle by triangle.

* ``rasterize_coverage(xy, faces, (H, W))`` -> (owner [H, W], count [H, W]): triangles in pixel
  coordinates, no depth; which triangle covers each pixel centre and how many do (a UV atlas
  rasterised for texture baking, where a count above one means overlapping charts).
* ``triangles_covering(xy, faces, pixels)``: the triangles that cover any of some pixels.
* ``covered_pixels`` / ``bounding_box_pixels``: the (triangle, pixel) pairs themselves, which the
  torch back-end of ``raster.rasterize`` depth-tests.

Rules (nvdiffrast's): pixel (column c, row r) samples the point (c + 0.5, r + 0.5); vertices snap to
1/16 pixel (finer on request); a centre exactly on an edge shared by two triangles belongs to exactly
one of them (top-left rule). Torch only, on any device. Written by hand for the same reason as
``raster``.
"""

from __future__ import annotations

import math

import torch

#: Sub-pixel precision of the vertex snapping, as nvdiffrast's CUDA rasteriser (4 bits).
SUBPIXEL_BITS = 4
#: Candidate (triangle, pixel) pairs examined at once (bounds the memory).
PAIRS_PER_CHUNK = 1 << 22


def rasterize_coverage(xy: torch.Tensor, faces: torch.Tensor, resolution: tuple[int, int], counted: str = "all",
                       subpixel_bits: int = SUBPIXEL_BITS):
    """Flat triangles, given in pixel units, rasterised without depth.

    Pixel (column c, row r) samples the point (c + 0.5, r + 0.5) of ``xy``'s frame; coverage follows
    ``rasterize`` exactly (1/16-pixel snapping, top-left rule), so ``owner`` equals the triangle ids
    ``rasterize`` draws for the same triangles at one depth. A finer ``subpixel_bits`` snaps less:
    a UV atlas checked for overlaps uses 8 (1/256 pixel), since two vertices of a marching-cubes
    sliver a twentieth of a texel apart can swap sides on the 1/16 grid, and the snapped triangles
    then overlap where the layout does not.

    Args:
        xy: [V, 2] vertex positions in pixels (x along columns, y along rows).
        faces: [F, 3] vertex indices.
        resolution: (height, width).
        counted: which triangles ``count`` counts: "all", or "ccw", those that stay counter-clockwise
            (positive area in this frame) after snapping. A UV atlas whose triangles are all
            counter-clockwise counts "ccw": a sliver thinner than the snapping grid can flip and then
            covers a neighbour's pixels, which is no overlap of the layout.
        subpixel_bits: vertices snap to 1/2^bits pixel (1 to 10).
    Returns:
        owner [H, W] int64: the lowest id of the triangles covering the pixel centre, -1 where none;
        count [H, W] int32: how many (counted) triangles cover it: more than one only where
        triangles overlap.
    Raises:
        ValueError: for vertices that are not finite or so far outside the image that the edge
            functions could leave float64's exact integers (at 1/1024 pixel about 30,000 pixels
            out; see ``covered_pixels``).
    """
    if counted not in ("all", "ccw"):
        raise ValueError(f"counted must be 'all' or 'ccw', got {counted!r}")
    if not 1 <= subpixel_bits <= 10:
        raise ValueError(f"subpixel_bits must be in 1..10, got {subpixel_bits}")
    height, width = int(resolution[0]), int(resolution[1])
    device = xy.device
    owner = torch.full((height * width,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=device)
    count = torch.zeros(height * width, dtype=torch.int32, device=device)
    for tri, pixel, ccw in covered_pixels(xy, faces, height, width, subpixel_bits):
        owner.scatter_reduce_(0, pixel, tri, reduce="amin")
        count.scatter_add_(0, pixel, ccw.int() if counted == "ccw" else torch.ones_like(pixel, dtype=torch.int32))
    owner.masked_fill_(count == 0, -1)
    return owner.reshape(height, width), count.reshape(height, width)


def triangles_covering(xy: torch.Tensor, faces: torch.Tensor, pixels: torch.Tensor,
                       subpixel_bits: int = SUBPIXEL_BITS) -> torch.Tensor:
    """The ids (sorted, unique) of the triangles that cover any pixel centre where ``pixels`` [H, W]
    (bool) is set; same frame and rules as ``rasterize_coverage``."""
    height, width = pixels.shape
    wanted = pixels.reshape(-1)
    found = [tri[wanted[pixel]] for tri, pixel, _ in covered_pixels(xy, faces, height, width, subpixel_bits)]
    return torch.unique(torch.cat(found)) if found else torch.zeros(0, dtype=torch.long, device=xy.device)


def covered_pixels(xy: torch.Tensor, faces: torch.Tensor, height: int, width: int, subpixel_bits: int):
    """Yields (triangle [N], pixel [N], counter-clockwise [N] bool) for every covered pixel centre
    (flat pixel index, row-major; the winding is the snapped triangle's).

    Scanline form of ``rasterize``'s coverage test: each edge is an integer linear function of the
    pixel's column and row, with the top-left rule folded into its constant (an edge function is an
    integer, so "> 0, or = 0 on a top or left edge" becomes ">= 1", or ">= 0" on a top or left edge).
    On each row of a triangle's bounding box the three inequalities bound the covered columns, found
    by exact division; only covered pixels are ever listed. Each row's edge function at column 0,
    t, and the per-column step a are integers below 2^52, computed in float64 (exact there, and
    several times faster than int64 on a CPU), and the floor of a correctly rounded quotient t / a of
    such integers is the exact floor (t / a is either an integer, or at least 1/|a| away from one,
    more than half an ulp); coordinates that could break the bound, or are not finite, are refused.
    """
    if len(faces) == 0:
        return
    scale = 1 << subpixel_bits
    faces = faces.to(device=xy.device, dtype=torch.long)
    corners = xy.double()[faces] * scale  # [F, 3, 2], in 1/scale pixel
    largest = float(corners.abs().max())  # nan if any is
    reach = math.ceil(largest) + scale if math.isfinite(largest) else math.inf
    if not spans_exact(reach, scale, max(height, width)):
        raise ValueError(f"triangle coordinates up to {largest / scale:.0f} pixels are not finite or too far "
                         f"outside a {height}x{width} image to rasterise exactly")
    snapped = torch.round(corners).to(torch.int64)
    x, y = snapped[..., 0], snapped[..., 1]  # [F, 3] each
    area = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (y[:, 1] - y[:, 0]) * (x[:, 2] - x[:, 0])
    sign = torch.sign(area)[:, None]
    # edge k runs from corner k+1 to corner k+2 (the edge opposite corner k); interior positive
    ax, ay = x[:, [1, 2, 0]], y[:, [1, 2, 0]]
    dx, dy = (x[:, [2, 0, 1]] - ax) * sign, (y[:, [2, 0, 1]] - ay) * sign
    top_left = _top_left(dx, dy)
    # e = dx (sy - ay) - dy (sx - ax) at the centre sx = scale (c + 1/2), sy = scale (r + 1/2):
    # per_column · c + per_row · r + constant
    per_column, per_row = (-dy * scale).double(), (dx * scale).double()
    constant = (dx * (scale // 2 - ay) - dy * (scale // 2 - ax) - (~top_left).long()).double()
    first_x, last_x = _pixel_range(x, scale, width)
    first_y, last_y = _pixel_range(y, scale, height)
    spans_x, spans_y = (last_x - first_x + 1).clamp(min=0), (last_y - first_y + 1).clamp(min=0)
    triangles = ((area != 0) & (spans_x > 0) & (spans_y > 0)).nonzero().squeeze(1)
    first_column, last_column = first_x.double(), last_x.double()  # the bounds below are float64
    # (triangle, row) pairs, in chunks whose bounding-box pixels stay bounded
    for chunk in _chunks(triangles, (spans_x * spans_y)[triangles], PAIRS_PER_CHUNK):
        rows_per = spans_y[chunk]
        tri = torch.repeat_interleave(chunk, rows_per)
        starts = torch.cumsum(rows_per, 0) - rows_per
        # (gathers by index_select: 3x faster than advanced indexing for these shapes on the CPU)
        row = torch.arange(len(tri), device=tri.device) + torch.repeat_interleave(first_y[chunk] - starts, rows_per)
        lo, hi = first_column.index_select(0, tri), last_column.index_select(0, tri)
        a = per_column.index_select(0, tri)  # [P, 3]
        t = torch.addcmul(constant.index_select(0, tri), per_row.index_select(0, tri), row.double()[:, None])
        # the edge functions are a · column + t >= 0: a > 0 bounds the column from below by
        # ceil(-t / a), a < 0 from above by floor(-t / a); a = 0 (a horizontal edge) passes or empties the row
        quotient = t.div(a).neg_()  # -t / a (inf or nan where a = 0, never chosen)
        lower = torch.where(a > 0, quotient.ceil(), -1.0)
        upper = torch.where(a < 0, quotient.floor_(), float(width))
        upper.masked_fill_((a == 0) & (t < 0), -1.0)
        # (three columns combined elementwise: torch's reductions over a dimension of 3 are slow)
        lo = torch.maximum(torch.maximum(lo, lower[:, 0]), torch.maximum(lower[:, 1], lower[:, 2])).long()
        hi = torch.minimum(torch.minimum(hi, upper[:, 0]), torch.minimum(upper[:, 1], upper[:, 2])).long()
        count = (hi - lo + 1).clamp_(min=0)
        pixel_tri = torch.repeat_interleave(tri, count)
        # each (triangle, row)'s first pixel, less the pixels listed before it: + a running count gives the rest
        first = row * width + lo - (torch.cumsum(count, 0) - count)
        pixel = torch.repeat_interleave(first, count) + torch.arange(len(pixel_tri), device=tri.device)
        yield pixel_tri, pixel, area.index_select(0, pixel_tri) > 0


def spans_exact(reach, scale: int, size: int):
    """Whether ``covered_pixels``'s float64 spans are exact for coordinates bounded by ``reach`` (in
    1/scale pixel, plus ``scale``; a float or a tensor of them) on an image whose larger side is
    ``size``: a row's edge function at column 0 is at most 4 reach² + 2 reach · scale · size."""
    return 4 * reach * reach + 2 * reach * scale * size < 2.0 ** 52


def _pixel_range(coordinates: torch.Tensor, scale: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last pixel [F] (clamped to the image; last < first when none) whose centre lies in
    the span of each row of ``coordinates`` [F, 3] (int64, 1/scale pixel); pixel i's centre is at
    scale · i + scale / 2."""
    first = torch.div(coordinates.min(1).values - scale // 2 + scale - 1, scale, rounding_mode="floor")
    last = torch.div(coordinates.max(1).values - scale // 2, scale, rounding_mode="floor")
    return first.clamp(0, size), last.clamp(-1, size - 1)


def _chunks(triangles: torch.Tensor, pairs: torch.Tensor, limit: int):
    """Splits ``triangles`` into runs whose candidate pixel counts sum to about ``limit``."""
    if len(triangles) == 0:
        return
    ends = torch.cumsum(pairs, 0)
    start, offset = 0, 0
    while start < len(triangles):
        stop = int(torch.searchsorted(ends, offset + limit, right=True))
        stop = max(stop, start + 1)  # one huge triangle still goes through, on its own
        yield triangles[start:stop]
        offset = int(ends[stop - 1])
        start = stop


def bounding_box_pixels(corners: torch.Tensor, height: int, width: int, scale: int):
    """Yields (triangle [N], pixel [N]) for the covered pixel centres of triangles whose snapped
    corners [T, 3, 2] (int64, 1/scale pixel) are too far out for ``covered_pixels``: every pixel of
    each bounding box (clamped to the image) is tested with int64 edge functions and the top-left
    rule, the same test. Exact while |coordinate| < 2^30 (about 67 million pixels at 1/16)."""
    if int(corners.abs().max()) >= 1 << 30:
        raise ValueError("a triangle in front of the camera reaches more than 60 million pixels outside the image; "
                         "move the near plane away from the camera")
    x, y = corners[..., 0], corners[..., 1]
    xmin, xmax = _pixel_range(x, scale, width)
    ymin, ymax = _pixel_range(y, scale, height)
    spans_x, spans_y = (xmax - xmin + 1).clamp(min=0), (ymax - ymin + 1).clamp(min=0)
    area = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (y[:, 1] - y[:, 0]) * (x[:, 2] - x[:, 0])
    sign = torch.sign(area)
    triangles = ((area != 0) & (spans_x > 0) & (spans_y > 0)).nonzero().squeeze(1)
    for chunk in _chunks(triangles, (spans_x * spans_y)[triangles], PAIRS_PER_CHUNK):
        counts = (spans_x * spans_y)[chunk]
        tri = torch.repeat_interleave(chunk, counts)
        local = torch.arange(len(tri), device=tri.device) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts,
                                                                                    counts)
        px = xmin[tri] + local % spans_x[tri]
        py = ymin[tri] + torch.div(local, spans_x[tri], rounding_mode="floor")
        sx, sy = px * scale + scale // 2, py * scale + scale // 2
        inside = torch.ones_like(tri, dtype=torch.bool)
        for k in range(3):  # the edge from corner k+1 to corner k+2, interior positive for either winding
            ax, ay, bx, by = x[tri, (k + 1) % 3], y[tri, (k + 1) % 3], x[tri, (k + 2) % 3], y[tri, (k + 2) % 3]
            edge = edge_function(ax, ay, bx, by, sx, sy) * sign[tri]
            inside &= (edge > 0) | ((edge == 0) & _top_left((bx - ax) * sign[tri], (by - ay) * sign[tri]))
        yield tri[inside], (py * width + px)[inside]


def edge_function(ax, ay, bx, by, sx, sy):
    """The edge function of the edge from a to b at samples s (all [N]): positive on its left."""
    return (bx - ax) * (sy - ay) - (by - ay) * (sx - ax)


def _top_left(dx, dy):
    """Whether edges of direction (dx, dy), interior on their left, are "top" or "left" ones (with y
    up): a pixel centre exactly on an edge shared by two triangles belongs to the one for which it is."""
    return (dy < 0) | ((dy == 0) & (dx > 0))


__all__ = ["PAIRS_PER_CHUNK", "SUBPIXEL_BITS", "bounding_box_pixels", "covered_pixels", "edge_function",
           "rasterize_coverage", "spans_exact", "triangles_covering"]
