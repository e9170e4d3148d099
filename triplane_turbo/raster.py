"""Triangle rasterisation with nvdiffrast's semantics: nvdiffrast on CUDA when installed, torch elsewhere.

One small interface, two back-ends that compute the same thing:

* ``rasterize(clip_positions, faces, (H, W))`` -> ``rast`` [B, H, W, 4] holding, per pixel,
  ``(u, v, z/w, triangle_id + 1)``; all zeros where no triangle covers the pixel. ``u`` is the
  perspective-correct barycentric weight of ``faces[t, 0]``, ``v`` that of ``faces[t, 1]`` and
  ``1 - u - v`` that of ``faces[t, 2]``.
* ``interpolate(attributes, rast, faces)`` -> [B, H, W, C], the attributes blended with those weights
  (zero where nothing was drawn).
* ``rasterize_coverage(xy, faces, (H, W))`` -> (owner [H, W], count [H, W]): flat triangles in pixel
  coordinates, no depth; which triangle covers each pixel centre and how many do (a UV atlas
  rasterised for texture baking, where a count above one means overlapping charts). Same coverage
  rules as ``rasterize``; torch only, on any device.

Conventions (nvdiffrast's): pixel (column x, row y) samples clip coordinates
``(2(x + 0.5)/W − 1, 2(y + 0.5)/H − 1)``, so **row 0 is the bottom** (clip y = −1) — flip rows to get
a top-down image; the fragment with the smallest z/w wins; there is no back-face culling; a pixel
centre exactly on an edge shared by two triangles belongs to exactly one of them (vertices snapped to
1/16 pixel, top-left rule). Fragments with z/w outside [−1, 1] are discarded.

The torch back-end runs on any device (it is the CPU path, and the reference the CUDA path is tested
against). It differs from nvdiffrast in one documented way: a triangle with a vertex at w ≤ 0
(behind the camera) is dropped instead of clipped — never the case for UV-space baking or for an
object in front of the camera. nvdiffrast (NVlabs, NVIDIA Source Code License, non-commercial use
only; not on PyPI, compiled with nvcc on first use) is an optional extra, imported lazily.

Written by hand because no maintained library rasterises triangles on the CPU in torch with these
semantics (pytorch3d's rasteriser has other conventions and no wheels for current torch).
"""

from __future__ import annotations

import functools
import itertools
import logging
import math

import torch

logger = logging.getLogger(__name__)

#: Sub-pixel precision of the vertex snapping, as nvdiffrast's CUDA rasteriser (4 bits).
SUBPIXEL_BITS = 4
#: Candidate (triangle, pixel) pairs examined at once by the torch back-end (bounds its memory).
PAIRS_PER_CHUNK = 1 << 22
BACKENDS = ("auto", "torch", "nvdiffrast")


@functools.lru_cache(maxsize=None)
def nvdiffrast_available() -> bool:
    """Whether ``nvdiffrast.torch`` imports and CUDA is present (cached: the import is slow)."""
    if not torch.cuda.is_available():
        return False
    try:
        import nvdiffrast.torch  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure to import means "not available"
        return False
    return True


@functools.lru_cache(maxsize=None)
def _nvdiffrast_context(device: torch.device):
    import nvdiffrast.torch as dr

    return dr.RasterizeCudaContext(device=device)


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto" -> "nvdiffrast" for CUDA tensors when it is installed, else "torch"."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown rasteriser back-end {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "nvdiffrast" if device.type == "cuda" and nvdiffrast_available() else "torch"
    if backend == "nvdiffrast" and not (device.type == "cuda" and nvdiffrast_available()):
        raise RuntimeError("the nvdiffrast back-end needs CUDA tensors and the nvdiffrast package "
                           "(see the README's 'GPU extras')")
    return backend


def rasterize(clip_positions: torch.Tensor, faces: torch.Tensor, resolution: tuple[int, int],
              backend: str = "auto") -> torch.Tensor:
    """Rasterise triangles given in clip space.

    Args:
        clip_positions: [B, V, 4] or [V, 4] homogeneous clip coordinates (x, y, z, w).
        faces: [F, 3] vertex indices (any integer dtype).
        resolution: (height, width) in pixels.
        backend: "auto", "torch" or "nvdiffrast".
    Returns:
        rast [B, H, W, 4] float32: (u, v, z/w, triangle_id + 1); zeros where nothing is drawn.
    Raises:
        ValueError (torch back-end): for a triangle in front of the camera that reaches more than
            about 60 million pixels outside the image (a vertex almost on the camera plane), beyond
            which its edge functions would leave int64. Triangles with vertices that are not finite
            draw nothing.
    """
    positions = clip_positions[None] if clip_positions.ndim == 2 else clip_positions
    if positions.ndim != 3 or positions.shape[-1] != 4:
        raise ValueError(f"clip_positions must be [B, V, 4] or [V, 4], got {list(clip_positions.shape)}")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces must be [F, 3], got {list(faces.shape)}")
    height, width = int(resolution[0]), int(resolution[1])
    if height <= 0 or width <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    positions = positions.float()
    if len(faces) == 0:
        return torch.zeros(positions.shape[0], height, width, 4, device=positions.device)
    if resolve_backend(backend, positions.device) == "nvdiffrast":
        import nvdiffrast.torch as dr

        rast, _ = dr.rasterize(_nvdiffrast_context(positions.device), positions.contiguous(),
                               faces.to(device=positions.device, dtype=torch.int32).contiguous(), (height, width),
                               grad_db=False)
        return rast
    faces = faces.to(device=positions.device, dtype=torch.long)
    return torch.stack([_rasterize_one(p, faces, height, width) for p in positions])


def interpolate(attributes: torch.Tensor, rast: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Per-vertex attributes [B or 1, V, C] or [V, C] blended at every pixel -> [B, H, W, C].

    Pixels without a triangle get zeros (a valid-looking value: mask with ``rast[..., 3] > 0``).
    Same result as ``nvdiffrast.torch.interpolate`` without derivatives; differentiable with respect
    to ``attributes`` and to the barycentrics in ``rast``.
    """
    attributes = attributes[None] if attributes.ndim == 2 else attributes
    batch = rast.shape[0]
    if attributes.shape[0] not in (1, batch):
        raise ValueError(f"attributes hold {attributes.shape[0]} batches for {batch} images")
    triangle = rast[..., 3].long() - 1  # [B, H, W]; -1 where empty
    covered = triangle >= 0
    corners = faces.to(device=rast.device, dtype=torch.long)[triangle.clamp(min=0)]  # [B, H, W, 3]
    weights = torch.stack([rast[..., 0], rast[..., 1], 1 - rast[..., 0] - rast[..., 1]], -1)  # [B, H, W, 3]
    attributes = attributes.expand(batch, -1, -1)
    values = torch.stack([attributes[b][corners[b]] for b in range(batch)])  # [B, H, W, 3, C]
    out = (weights[..., None].to(values.dtype) * values).sum(-2)
    return out * covered[..., None]


def _rasterize_one(clip: torch.Tensor, faces: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The torch back-end for one image: clip [V, 4], faces [F, 3] (long) -> rast [H, W, 4].

    Coverage is ``rasterize_coverage``'s (the covered pixels of each triangle, row by row); each
    covered pixel's screen-linear depth decides, by one scatter-min, which triangle it shows.
    """
    device = clip.device
    if len(faces) >= 1 << 31:
        raise ValueError(f"at most 2^31 - 1 triangles per image, got {len(faces)}")
    w = clip[:, 3]
    safe_w = torch.where(w > 0, w, torch.ones_like(w))
    # pixel positions (float32; snapping to 1/16 pixel, a power of two, adds no rounding of its own);
    # coverage and the depth test are not differentiable: only the weights below carry gradients
    xy = torch.stack([(clip[:, 0] / safe_w + 1) * 0.5 * width, (clip[:, 1] / safe_w + 1) * 0.5 * height], 1).detach()
    z_ndc = clip[:, 2] / safe_w
    ndc = (clip[:, :2] / safe_w[:, None]).double()
    # The winner per pixel: the smallest (depth, triangle id), packed in one int64 so that one
    # scatter-min decides the depth test and breaks exact ties by the lower id.
    best = torch.full((height * width,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=device)
    scale = 1 << SUBPIXEL_BITS
    # per triangle and corner, the snapped position (1/16 pixel: the vertices _covered_pixels
    # rasterises) and z/w, as contiguous float64 columns [F] to gather from
    snapped = torch.round(xy.double() * scale)
    corner = lambda values, k: values.index_select(0, faces[:, k]).contiguous()  # noqa: E731
    x0, x1, x2 = (corner(snapped[:, 0], k) for k in range(3))
    y0, y1, y2 = (corner(snapped[:, 1], k) for k in range(3))
    z0, z1, z2 = (corner(z_ndc.detach().double(), k) for k in range(3))
    area = (x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0)  # twice the signed area, an exact integer
    # Triangles that can draw nothing are left out first: behind the camera (dropped, see the module
    # docstring), not finite, wholly nearer or farther than the depth range (the depth at a pixel is a
    # blend of the corners' z/w with weights in [0, 1]), or wholly beside the image.
    low = lambda a, b, c: torch.minimum(torch.minimum(a, b), c)  # noqa: E731
    high = lambda a, b, c: torch.maximum(torch.maximum(a, b), c)  # noqa: E731
    edge_of_image = lambda size: (size - 1) * scale + scale // 2  # noqa: E731  the last pixel centre
    drawable = (w > 0)[faces].all(1) & torch.isfinite(area) & (high(z0, z1, z2) >= -1) & (low(z0, z1, z2) <= 1) \
        & (high(x0, x1, x2) >= scale // 2) & (low(x0, x1, x2) <= edge_of_image(width)) \
        & (high(y0, y1, y2) >= scale // 2) & (low(y0, y1, y2) <= edge_of_image(height))
    # The scanline spans are exact in float64 up to a bound on the coordinates (_covered_pixels);
    # a vertex just in front of the camera plane can lie far beyond it: those few triangles are
    # tested pixel by pixel over their bounding box in int64 instead.
    reach = torch.maximum(high(x0.abs(), x1.abs(), x2.abs()), high(y0.abs(), y1.abs(), y2.abs())) + 1 + scale
    spans_exact = 4 * reach * reach + 2 * reach * scale * max(height, width) < 2.0 ** 52
    near, far = (drawable & spans_exact).nonzero().squeeze(1), (drawable & ~spans_exact).nonzero().squeeze(1)
    columns = (x0, y0, x1, y1, x2, y2)
    covered = [((near.index_select(0, tri), pixel, columns) for tri, pixel, _ in
                _covered_pixels(xy, faces[near], height, width, SUBPIXEL_BITS))]
    if len(far):  # their edge functions in int64: float64 would round them
        exact = tuple(c.long() for c in columns)
        corners = torch.stack([torch.stack(exact[0::2], 1), torch.stack(exact[1::2], 1)], 2)[far]  # [T, 3, 2]
        covered.append(((far.index_select(0, tri), pixel, exact) for tri, pixel in
                        _bounding_box_pixels(corners, height, width, scale)))
    for tri, pixel, exact_columns in itertools.chain(*covered):
        # screen-space weights of the snapped triangle: its edge functions at the pixel centre
        # (exact integers, in float64 within _covered_pixels's bound, else in int64) over twice its
        # area; the third edge function is the area less the other two
        ax, ay, bx, by, cx, cy = (c.index_select(0, tri) for c in exact_columns)
        sx = (pixel % width).to(ax.dtype) * scale + scale // 2
        sy = torch.div(pixel, width, rounding_mode="floor").to(ax.dtype) * scale + scale // 2
        e0, e1 = _edge(bx, by, cx, cy, sx, sy), _edge(cx, cy, ax, ay, sx, sy)
        a = (bx - ax) * (cy - ay) - (by - ay) * (cx - ax)
        e2 = a - e0 - e1
        a, e0, e1, e2 = a.double(), e0.double(), e1.double(), e2.double()
        take = lambda column: column.index_select(0, tri)  # noqa: E731
        depth = e0 / a * take(z0) + e1 / a * take(z1) + e2 / a * take(z2)  # screen-linear z/w
        visible = (depth >= -1) & (depth <= 1)
        key = (_sortable(depth[visible]) << 31) | tri[visible]
        best.scatter_reduce_(0, pixel[visible], key, reduce="amin")

    rast = torch.zeros(height * width, 4, device=device)
    drawn = (best != torch.iinfo(torch.int64).max).nonzero().squeeze(1)
    if len(drawn):
        tri = best[drawn] & ((1 << 31) - 1)
        v0, v1, v2 = faces[tri].unbind(1)
        px, py = drawn % width, torch.div(drawn, width, rounding_mode="floor")
        # Coverage used the snapped vertices; the weights, as nvdiffrast's, use the exact ones.
        b0, b1, b2 = _screen_weights((px.double() + 0.5) / width * 2 - 1, (py.double() + 0.5) / height * 2 - 1,
                                     ndc[v0], ndc[v1], ndc[v2])
        depth = b0 * z_ndc[v0] + b1 * z_ndc[v1] + b2 * z_ndc[v2]
        # perspective-correct weights: screen weights over w, renormalised
        p0, p1, p2 = b0 / w[v0].double(), b1 / w[v1].double(), b2 / w[v2].double()
        total = p0 + p1 + p2
        rast[drawn, 0] = (p0 / total).clamp(0, 1).float()
        rast[drawn, 1] = (p1 / total).clamp(0, 1).float()
        rast[drawn, 2] = depth.float()
        rast[drawn, 3] = (tri + 1).float()
    return rast.reshape(height, width, 4)


def _bounding_box_pixels(corners: torch.Tensor, height: int, width: int, scale: int):
    """Yields (triangle [N], pixel [N]) for the covered pixel centres of triangles whose snapped
    corners [T, 3, 2] (int64, 1/scale pixel) are too far out for ``_covered_pixels``: every pixel of
    each bounding box (clamped to the image) is tested with int64 edge functions and the top-left
    rule, the same test. Exact while |coordinate| < 2^30 (about 67 million pixels at 1/16)."""
    if int(corners.abs().max()) >= 1 << 30:
        raise ValueError("a triangle in front of the camera reaches more than 60 million pixels outside the image; "
                         "move the near plane away from the camera")
    x, y = corners[..., 0], corners[..., 1]
    first = lambda low: torch.div(low - scale // 2 + scale - 1, scale, rounding_mode="floor")  # noqa: E731
    last = lambda high: torch.div(high - scale // 2, scale, rounding_mode="floor")  # noqa: E731
    xmin, xmax = first(x.min(1).values).clamp(0, width), last(x.max(1).values).clamp(-1, width - 1)
    ymin, ymax = first(y.min(1).values).clamp(0, height), last(y.max(1).values).clamp(-1, height - 1)
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
            dx, dy = (bx - ax) * sign[tri], (by - ay) * sign[tri]
            edge = dx * (sy - ay) - dy * (sx - ax)
            inside &= (edge > 0) | ((edge == 0) & ((dy < 0) | ((dy == 0) & (dx > 0))))  # top-left rule
        yield tri[inside], (py * width + px)[inside]


def _edge(ax, ay, bx, by, sx, sy):
    """The edge function of the edge from a to b at samples s (all [N]): positive on its left."""
    return (bx - ax) * (sy - ay) - (by - ay) * (sx - ax)


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
            out; see ``_covered_pixels``).
    """
    if counted not in ("all", "ccw"):
        raise ValueError(f"counted must be 'all' or 'ccw', got {counted!r}")
    if not 1 <= subpixel_bits <= 10:
        raise ValueError(f"subpixel_bits must be in 1..10, got {subpixel_bits}")
    height, width = int(resolution[0]), int(resolution[1])
    device = xy.device
    owner = torch.full((height * width,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=device)
    count = torch.zeros(height * width, dtype=torch.int32, device=device)
    for tri, pixel, ccw in _covered_pixels(xy, faces, height, width, subpixel_bits):
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
    found = [tri[wanted[pixel]] for tri, pixel, _ in _covered_pixels(xy, faces, height, width, subpixel_bits)]
    return torch.unique(torch.cat(found)) if found else torch.zeros(0, dtype=torch.long, device=xy.device)


def _covered_pixels(xy: torch.Tensor, faces: torch.Tensor, height: int, width: int, subpixel_bits: int):
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
    # |t| <= 4 reach² + 2 reach · scale · height, with reach bounding |coordinate| and |scale/2 - coordinate|
    reach = math.ceil(largest) + scale if math.isfinite(largest) else math.inf
    if not 4 * reach * reach + 2 * reach * scale * max(height, width) < 1 << 52:
        raise ValueError(f"triangle coordinates up to {largest / scale:.0f} pixels are not finite or too far "
                         f"outside a {height}x{width} image to rasterise exactly")
    snapped = torch.round(corners).to(torch.int64)
    x, y = snapped[..., 0], snapped[..., 1]  # [F, 3] each
    area = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (y[:, 1] - y[:, 0]) * (x[:, 2] - x[:, 0])
    sign = torch.sign(area)[:, None]
    # edge k runs from corner k+1 to corner k+2 (the edge opposite corner k); interior positive
    ax, ay = x[:, [1, 2, 0]], y[:, [1, 2, 0]]
    dx, dy = (x[:, [2, 0, 1]] - ax) * sign, (y[:, [2, 0, 1]] - ay) * sign
    top_left = (dy < 0) | ((dy == 0) & (dx > 0))
    # e = dx (sy - ay) - dy (sx - ax) at the centre sx = scale (c + 1/2), sy = scale (r + 1/2):
    # per_column · c + per_row · r + constant
    per_column, per_row = (-dy * scale).double(), (dx * scale).double()
    constant = (dx * (scale // 2 - ay) - dy * (scale // 2 - ax) - (~top_left).long()).double()
    first_x = torch.div(x.min(1).values - scale // 2 + scale - 1, scale, rounding_mode="floor").clamp(0, width)
    last_x = torch.div(x.max(1).values - scale // 2, scale, rounding_mode="floor").clamp(-1, width - 1)
    first_y = torch.div(y.min(1).values - scale // 2 + scale - 1, scale, rounding_mode="floor").clamp(0, height)
    last_y = torch.div(y.max(1).values - scale // 2, scale, rounding_mode="floor").clamp(-1, height - 1)
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


def _screen_weights(px, py, a, b, c):
    """Screen-space barycentric weights of points (px, py) in triangles (a, b, c), each [N, 2], float64."""
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    w0 = (b[:, 0] - px) * (c[:, 1] - py) - (b[:, 1] - py) * (c[:, 0] - px)
    w1 = (c[:, 0] - px) * (a[:, 1] - py) - (c[:, 1] - py) * (a[:, 0] - px)
    return w0 / area, w1 / area, 1 - (w0 + w1) / area


def _sortable(values: torch.Tensor) -> torch.Tensor:
    """Depths -> int64 keys in [0, 2^32) in the same order (through their float32 bit patterns)."""
    bits = values.float().view(torch.int32).to(torch.int64)  # sign-extended
    # Non-negative floats already order like their bits; for negative ones the magnitude bits run
    # backwards, so they are mirrored below the positives.
    return torch.where(bits < 0, -1 - (bits + (1 << 31)), bits) + (1 << 31)
