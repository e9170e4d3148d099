"""Triangle rasterisation with nvdiffrast's semantics: nvdiffrast on CUDA when installed, torch elsewhere.

One small interface, two back-ends that compute the same thing (the torch one finds each triangle's
covered pixels with ``coverage``, which also rasterises flat triangles for UV atlases):

* ``rasterize(clip_positions, faces, (H, W))`` -> ``rast`` [B, H, W, 4] holding, per pixel,
  ``(u, v, z/w, triangle_id + 1)``; all zeros where no triangle covers the pixel. ``u`` is the
  perspective-correct barycentric weight of ``faces[t, 0]``, ``v`` that of ``faces[t, 1]`` and
  ``1 - u - v`` that of ``faces[t, 2]``.
* ``interpolate(attributes, rast, faces)`` -> [B, H, W, C], the attributes blended with those weights
  (zero where nothing was drawn).

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

import torch

from .coverage import SUBPIXEL_BITS, bounding_box_pixels, covered_pixels, edge_function, spans_exact

logger = logging.getLogger(__name__)

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
                           "(docs/WEIGHTS.md, 'Hardware': pip install -r requirements-gpu.txt)")
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

    Coverage is ``coverage.covered_pixels``'s (each triangle's covered pixels, row by row), or
    ``coverage.bounding_box_pixels``'s for the few triangles too far out for its spans; each covered
    pixel's screen-linear depth decides, by one scatter-min, which triangle it shows.
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
    # per triangle and corner, the snapped position (1/16 pixel: the vertices covered_pixels
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
    # The scanline spans are exact in float64 up to a bound on the coordinates; a vertex just in front
    # of the camera plane can lie far beyond it: those few triangles are tested pixel by pixel over
    # their bounding box, with their edge functions in int64 (float64 would round them).
    reach = torch.maximum(high(x0.abs(), x1.abs(), x2.abs()), high(y0.abs(), y1.abs(), y2.abs())) + 1 + scale
    in_spans = spans_exact(reach, scale, max(height, width))
    near, far = (drawable & in_spans).nonzero().squeeze(1), (drawable & ~in_spans).nonzero().squeeze(1)
    columns = (x0, y0, x1, y1, x2, y2, area)  # corners and twice the area, per triangle
    covered = [((near.index_select(0, tri), pixel, columns) for tri, pixel, _ in
                covered_pixels(xy, faces[near], height, width, SUBPIXEL_BITS))]
    if len(far):
        exact = tuple(c.long() for c in columns)
        corners = torch.stack([torch.stack(exact[0:6:2], 1), torch.stack(exact[1:6:2], 1)], 2)[far]  # [T, 3, 2]
        covered.append(((far.index_select(0, tri), pixel, exact) for tri, pixel in
                        bounding_box_pixels(corners, height, width, scale)))
    for tri, pixel, exact_columns in itertools.chain(*covered):
        # screen-space weights of the snapped triangle: its edge functions at the pixel centre (exact
        # integers, in float64 or int64 as above) over twice its area; the third edge function is the
        # area less the other two
        ax, ay, bx, by, cx, cy, a = (c.index_select(0, tri) for c in exact_columns)
        sx = (pixel % width).to(ax.dtype) * scale + scale // 2
        sy = torch.div(pixel, width, rounding_mode="floor").to(ax.dtype) * scale + scale // 2
        e0, e1 = edge_function(bx, by, cx, cy, sx, sy), edge_function(cx, cy, ax, ay, sx, sy)
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
