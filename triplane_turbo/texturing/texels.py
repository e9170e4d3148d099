"""Where each texel of a UV atlas samples the surface: the atlas rasterised in UV space, texels just
outside a chart extended onto its nearest triangle, and the gutters filled from a covered texel near
the nearest. What ``texture.bake_texture`` queries the fields at.

Convention: rasterised rows run bottom-up (row r, column c samples uv ((c + 0.5)/S, (r + 0.5)/S));
images are flipped to top-down at the end of the bake.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .coverage import rasterize_coverage
from .uv import ATLAS_SUBPIXEL_BITS, atlas_pixels


def to_uint8(values: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8, rounded."""
    return np.round(np.clip(values, 0, 1) * 255).astype(np.uint8)


#: Texels beyond a chart's edge that get the colour field extended from the nearest triangle (the
#: rest of the gutter copies nearby texels): bilinear lookups at the edge then blend true values.
EXTENDED_TEXELS = 2.5



def atlas_owner(uv: torch.Tensor, faces: torch.Tensor, size: int) -> torch.Tensor:
    """owner [S, S] int64: the face whose UV triangle each texel centre falls in (-1: none), rows
    bottom-up; texel (r, c) samples uv ((c + 0.5)/S, (r + 0.5)/S). The lowest face wins where
    triangles overlap (xatlas' layouts, snapped slivers)."""
    return rasterize_coverage(atlas_pixels(uv, size), faces, (size, size), subpixel_bits=ATLAS_SUBPIXEL_BITS)[0]


def _ring_offsets(extend: float) -> list[tuple[int, int]]:
    """The (row, column) steps to the texels within ``extend`` of a texel, nearest first."""
    reach = int(math.floor(extend))
    steps = [(dy * dy + dx * dx, dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)]
    return [(dy, dx) for squared, dy, dx in sorted(steps) if 0 < squared <= extend * extend]


def _nearest_covered(covered: torch.Tensor, extend: float):
    """Where the texels outside ``covered`` [H, W] (bool, some set) copy from.

    Returns:
        ring [M] int64: the flat indices of the uncovered texels within ``extend`` of a covered one;
        ring_nearest [M] int64: the nearest covered texel of each (Euclidean, exact; ties either way);
        blocks [⌈H/2⌉, ⌈W/2⌉] int64: for each 2×2 block of texels, a covered texel that its uncovered
            texels copy: no more than 2√2 texels farther than their nearest covered texel.

    An exact distance transform of the whole image costs a fifth of a bake (50 ms at 1024²), and the
    gutters only need a nearby covered texel: so it runs on the blocks (a quarter of the texels), and
    the ring, where the exact nearest triangle is extended, looks up the few texels within reach.
    """
    from scipy.ndimage import distance_transform_edt

    device = covered.device
    height, width = covered.shape
    half_h, half_w = (height + 1) // 2, (width + 1) // 2
    if (height, width) != (2 * half_h, 2 * half_w):
        even = torch.zeros(2 * half_h, 2 * half_w, dtype=torch.bool, device=device)
        even[:height, :width] = covered
    else:
        even = covered
    quads = even.reshape(half_h, 2, half_w, 2)
    top_left, top_right = quads[:, 0, :, 0], quads[:, 0, :, 1]
    bottom_left, bottom_right = quads[:, 1, :, 0], quads[:, 1, :, 1]
    top = top_left | top_right
    any_covered = top | bottom_left | bottom_right
    # a covered texel of each block with one: in its top row if it has one there, else the bottom row
    rows = 2 * torch.arange(half_h, device=device)[:, None] + (~top).long()
    columns = 2 * torch.arange(half_w, device=device)[None, :] + torch.where(top, ~top_left, ~bottom_left).long()
    inside = (rows * width + columns).reshape(-1)
    # the nearest block with a covered texel, exactly on the blocks' grid
    near_rows, near_columns = (torch.from_numpy(a).to(device) for a in distance_transform_edt(
        ~any_covered.cpu().numpy(), return_distances=False, return_indices=True))
    blocks = inside[near_rows.long() * half_w + near_columns.long()]
    block_squared = ((near_rows - torch.arange(half_h, device=device)[:, None]) ** 2
                     + (near_columns - torch.arange(half_w, device=device)[None, :]) ** 2)
    # the ring's texels lie in blocks partly covered or within (extend + √2) / 2 blocks of one
    partial = any_covered & ~(top & bottom_left & bottom_right & top_left & top_right)
    reach = ((extend + math.sqrt(2)) / 2) ** 2
    candidate_blocks = (partial | ((block_squared > 0) & (block_squared <= reach))).reshape(-1).nonzero().squeeze(1)
    block_rows, block_columns = torch.div(candidate_blocks, half_w, rounding_mode="floor"), candidate_blocks % half_w
    texel_rows = (2 * block_rows[:, None] + torch.tensor([0, 0, 1, 1], device=device)).reshape(-1)
    texel_columns = (2 * block_columns[:, None] + torch.tensor([0, 1, 0, 1], device=device)).reshape(-1)
    keep = (texel_rows < height) & (texel_columns < width)
    texel_rows, texel_columns = texel_rows[keep], texel_columns[keep]
    keep = ~covered[texel_rows, texel_columns]
    texel_rows, texel_columns = texel_rows[keep], texel_columns[keep]
    # each candidate's neighbours within reach, nearest first, read from a zero-bordered copy
    steps = _ring_offsets(extend)
    if not steps or len(texel_rows) == 0:  # no ring (extend < 1, or nothing uncovered near a chart)
        none = torch.zeros(0, dtype=torch.long, device=device)
        return none, none, blocks
    margin = int(math.floor(extend))
    bordered = torch.zeros(height + 2 * margin, width + 2 * margin, dtype=torch.bool, device=device)
    bordered[margin:margin + height, margin:margin + width] = covered
    stride = width + 2 * margin
    neighbours = torch.tensor([dy * stride + dx for dy, dx in steps], dtype=torch.long, device=device)
    hits = bordered.reshape(-1)[((texel_rows + margin) * stride + texel_columns + margin)[:, None] + neighbours]
    found = hits.any(1)
    first = hits.to(torch.uint8).argmax(1)[found]  # the first hit is the nearest
    ring = (texel_rows * width + texel_columns)[found]
    steps_flat = torch.tensor([dy * width + dx for dy, dx in steps], dtype=torch.long, device=device)
    return ring, ring + steps_flat[first], blocks


@dataclass
class TexelLayout:
    """Where each baked texel samples the surface.

    Attributes:
        mask: [S, S] bool, the baked texels (rows bottom-up).
        triangle: [N] int64, the face each of the N masked texels (row-major) samples.
        centre: [N, 2] float64, the UV point it samples: the texel centre, moved onto the triangle for
            the few texels of a sliver (``SLIVER_TEXELS``) that fall outside it.
        sliver: [N] bool, whether the texel's face is a sliver (``SLIVER_TEXELS``).
        source: [S·S] int32, for each texel of the image (rows top-down, as ``image`` writes it) the
            masked texel (an index into the N) whose value it shows: its own, or in the gutters
            beyond the mask a covered texel's within 2√2 texels of its nearest (``_nearest_covered``).
        uv, faces: the atlas, [V', 2] and [F, 3] tensors.
    """

    mask: torch.Tensor
    triangle: torch.Tensor
    centre: torch.Tensor
    sliver: torch.Tensor
    source: torch.Tensor
    uv: torch.Tensor
    faces: torch.Tensor

    def weights(self) -> torch.Tensor:
        """[N, 3] float64 barycentric weights of each sample in its triangle's UV (negative outside)."""
        a, b, c = self.uv.double()[self.faces[self.triangle]].unbind(1)
        return _barycentric(self.centre, a, b, c)

    def points(self, vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        """[N, 3] float32: each sample's point on the mesh ([V, 3] vertices, [F, 3] faces in mesh
        indices), extended affinely past the triangle's edges for the ring outside the charts."""
        # each face's affine map from UV to 3D, then per texel three gathers and two fused products
        corners_uv = self.uv.double()[self.faces]  # [F, 3, 2]
        corners = vertices.double()[faces]  # [F, 3, 3]
        d = corners_uv[:, 1:] - corners_uv[:, :1]  # [F, 2 edges, 2]
        det = d[:, 0, 0] * d[:, 1, 1] - d[:, 0, 1] * d[:, 1, 0]
        det = torch.where(det.abs() > 1e-30, det, torch.full_like(det, 1e-30))
        inverse = torch.stack([torch.stack([d[:, 1, 1], -d[:, 1, 0]], -1),
                               torch.stack([-d[:, 0, 1], d[:, 0, 0]], -1)], 1) / det[:, None, None]  # D⁻¹, D = rows
        jacobian = torch.einsum("fek,fej->fkj", corners[:, 1:] - corners[:, :1], inverse)  # [F, 3, 2]: dP/d(u, v)
        offset = corners[:, 0] - torch.einsum("fkj,fj->fk", jacobian, corners_uv[:, 0])
        # point = offset + u · dP/du + v · dP/dv, each term gathered per texel as contiguous [N, 3] rows
        along_u, along_v, offset = (a.float().contiguous() for a in (jacobian[..., 0], jacobian[..., 1], offset))
        u, v = self.centre[:, 0:1].float(), self.centre[:, 1:2].float()
        points = torch.addcmul(offset.index_select(0, self.triangle), along_u.index_select(0, self.triangle), u)
        points.addcmul_(along_v.index_select(0, self.triangle), v)
        sliver = self.sliver
        if sliver.any():  # their affine maps are ill-conditioned: blend the corners instead
            a, b, c = self.uv.double()[self.faces[self.triangle[sliver]]].unbind(1)
            w = _barycentric(self.centre[sliver], a, b, c)
            points[sliver] = (w[..., None] * corners[self.triangle[sliver]]).sum(1).float()
        return points

    def image(self, values: torch.Tensor) -> np.ndarray:
        """Values [N, 3] in [0, 1] of the masked texels -> a top-down uint8 image [S, S, 3], the gutters filled."""
        size = self.mask.shape[0]
        if len(values) == 0:
            return np.zeros((size, size, 3), np.uint8)
        quantised = (values.float() * 255).round_().clamp_(0, 255).to(torch.uint8)  # as ``to_uint8``
        return quantised.index_select(0, self.source).reshape(size, size, 3).cpu().numpy()


#: A UV triangle narrower than this (its smallest altitude, in texels) is a sliver: its barycentric
#: weights blow up just outside it, so its texels there sample its nearest point instead.
SLIVER_TEXELS = 0.05


def _slivers(uv: torch.Tensor, faces: torch.Tensor, size: int) -> torch.Tensor:
    """[F] bool: the faces whose UV triangle is a sliver at texture size ``size``."""
    corners = uv.double()[faces] * size
    d1, d2 = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
    area2 = (d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]).abs()
    longest = torch.stack([d1, d2, corners[:, 2] - corners[:, 1]], 1).norm(dim=-1).amax(1)
    return area2 < SLIVER_TEXELS * longest


def texel_samples(uv: torch.Tensor, faces: torch.Tensor, size: int, extend: float = EXTENDED_TEXELS):
    """Which triangle each texel samples, and where.

    Covered texels take the triangle the atlas rasterises there (``atlas_owner``); texels up to
    ``extend`` texels outside a chart take the triangle of their nearest covered texel, extended
    past its edge.

    Returns:
        mask [S, S] bool (rows bottom-up, as rasterised), and for the N texels in the mask (row
        major): triangle [N] int64 and barycentric weights [N, 3] float64 of the sample in that
        triangle's UV (negative outside it).
    """
    layout = texel_layout(uv, faces, size, extend)
    return layout.mask, layout.triangle, layout.weights()


def texel_layout(uv: torch.Tensor, faces: torch.Tensor, size: int, extend: float = EXTENDED_TEXELS,
                  owner: torch.Tensor | None = None) -> TexelLayout:
    """``texel_samples``, and where each gutter texel copies from (``_nearest_covered`` gives both).

    ``owner``: ``atlas_owner(uv, faces, size)`` if the caller has it already.
    """
    device = uv.device
    faces = faces.to(device=device, dtype=torch.long)
    owner = atlas_owner(uv, faces, size) if owner is None else owner
    covered = owner >= 0
    mask = covered.reshape(-1).clone()
    if covered.any():
        ring, ring_nearest, blocks = _nearest_covered(covered, extend)
        owner = owner.reshape(-1).clone()
        owner[ring] = owner[ring_nearest]
        mask[ring] = True
    else:
        blocks = torch.zeros(((size + 1) // 2, (size + 1) // 2), dtype=torch.long, device=device)
    # each texel shows its own sample, or beyond the mask its block's chosen covered texel's (covered ⊆ mask)
    rank = torch.cumsum(mask, 0, dtype=torch.int32) - 1
    half_h, half_w = blocks.shape
    gutter = rank[blocks].clamp_(min=0)[:, None, :, None].expand(half_h, 2, half_w, 2).reshape(2 * half_h, 2 * half_w)
    mask = mask.reshape(size, size)
    source = torch.where(mask, rank.reshape(size, size), gutter[:size, :size]).flip(0).reshape(-1)
    rows, columns = mask.nonzero().unbind(1)  # the N masked texels, row-major
    tri = owner.reshape(-1)[rows * size + columns]
    centre = torch.empty(len(rows), 2, dtype=torch.float64, device=device)  # (u, v) of each texel centre
    centre[:, 0], centre[:, 1] = columns, rows
    centre.add_(0.5).div_(size)
    # a sliver's texels outside it (its ring, or a snapping hair) sample its nearest point instead
    sliver = _slivers(uv, faces, size)[tri]
    if sliver.any():
        index = sliver.nonzero().squeeze(1)
        a, b, c = uv.double()[faces[tri[index]]].unbind(1)
        outside = _barycentric(centre[index], a, b, c).min(1).values < 0
        index = index[outside]
        centre[index] = _closest_on_triangle(centre[index], a[outside], b[outside], c[outside])
    return TexelLayout(mask, tri, centre, sliver, source, uv, faces)


def _barycentric(p, a, b, c):
    """Barycentric weights [N, 3] of points p [N, 2] in triangles (a, b, c) [N, 2] each (float64)."""
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    area = torch.where(area.abs() > 1e-30, area, torch.full_like(area, 1e-30))
    w0 = ((b[:, 0] - p[:, 0]) * (c[:, 1] - p[:, 1]) - (b[:, 1] - p[:, 1]) * (c[:, 0] - p[:, 0])) / area
    w1 = ((c[:, 0] - p[:, 0]) * (a[:, 1] - p[:, 1]) - (c[:, 1] - p[:, 1]) * (a[:, 0] - p[:, 0])) / area
    return torch.stack([w0, w1, 1 - w0 - w1], -1)


def _closest_on_triangle(p, a, b, c):
    """The point [N, 2] of each triangle's edges nearest to p [N, 2] (p lies outside the triangle)."""
    best, best_distance = None, None
    for start, end in ((a, b), (b, c), (c, a)):
        edge = end - start
        t = (((p - start) * edge).sum(-1) / (edge * edge).sum(-1).clamp(min=1e-30)).clamp(0, 1)
        point = start + t[:, None] * edge
        distance = ((p - point) ** 2).sum(-1)
        if best is None:
            best, best_distance = point, distance
        else:
            closer = distance < best_distance
            best = torch.where(closer[:, None], point, best)
            best_distance = torch.where(closer, distance, best_distance)
    return best


__all__ = ["EXTENDED_TEXELS", "TexelLayout", "atlas_owner", "texel_layout", "texel_samples", "to_uint8"]
