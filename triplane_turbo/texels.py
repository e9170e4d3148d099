"""Where each texel of a UV atlas samples the surface: the atlas rasterised in UV space, texels just
outside a chart extended onto its nearest triangle, and the gutters filled from the nearest covered
texel. What ``texture.bake_texture`` queries the fields at.

Convention: rasterised rows run bottom-up (row r, column c samples uv ((c + 0.5)/S, (r + 0.5)/S));
images are flipped to top-down at the end of the bake.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .raster import rasterize_coverage
from .uv import ATLAS_SUBPIXEL_BITS, atlas_pixels


def to_uint8(values: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8, rounded."""
    return np.round(np.clip(values, 0, 1) * 255).astype(np.uint8)


#: Texels beyond a chart's edge that get the colour field extended from the nearest triangle (the
#: rest of the gutter copies nearest texels): bilinear lookups at the edge then blend true values.
EXTENDED_TEXELS = 2.5



def atlas_owner(uv: torch.Tensor, faces: torch.Tensor, size: int) -> torch.Tensor:
    """owner [S, S] int64: the face whose UV triangle each texel centre falls in (-1: none), rows
    bottom-up; texel (r, c) samples uv ((c + 0.5)/S, (r + 0.5)/S). The lowest face wins where
    triangles overlap (xatlas' layouts, snapped slivers)."""
    return rasterize_coverage(atlas_pixels(uv, size), faces, (size, size), subpixel_bits=ATLAS_SUBPIXEL_BITS)[0]


def _nearest_covered(covered: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every texel of ``covered`` [H, W], the flat index [H·W] of its nearest covered texel
    (Euclidean; itself where covered) and the squared distance to it [H·W] in texels² (integers)."""
    from scipy.ndimage import distance_transform_edt

    height, width = covered.shape
    rows, cols = distance_transform_edt(~covered, return_distances=False, return_indices=True)
    # the squared distance from the indices, exactly (scipy's distances would cost a float pass more)
    squared = (rows - np.arange(height)[:, None]) ** 2 + (cols - np.arange(width)[None, :]) ** 2
    return (rows.astype(np.int64) * width + cols).reshape(-1), squared.reshape(-1)


@dataclass
class TexelLayout:
    """Where each baked texel samples the surface.

    Attributes:
        mask: [S, S] bool, the baked texels (rows bottom-up).
        triangle: [N] int64, the face each of the N masked texels (row-major) samples.
        centre: [N, 2] float64, the UV point it samples: the texel centre, moved onto the triangle for
            the few texels of a sliver (``SLIVER_TEXELS``) that fall outside it.
        sliver: [N] bool, whether the texel's face is a sliver (``SLIVER_TEXELS``).
        source: [S·S] int64, for each texel of the image (rows top-down, as ``image`` writes it) the
            masked texel (an index into the N) whose value it shows: its own, or in the gutters
            beyond the mask its nearest covered texel's.
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
        return quantised[self.source].reshape(size, size, 3).cpu().numpy()


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
    """``texel_samples``, and where each gutter texel copies from (one distance transform serves both).

    ``owner``: ``atlas_owner(uv, faces, size)`` if the caller has it already.
    """
    device = uv.device
    faces = faces.to(device=device, dtype=torch.long)
    owner = atlas_owner(uv, faces, size) if owner is None else owner
    covered = (owner >= 0).cpu().numpy()
    if covered.any():
        nearest, squared = (torch.as_tensor(array, device=device) for array in _nearest_covered(covered))
        ring = torch.as_tensor(~covered.reshape(-1), device=device) & (squared <= extend ** 2)
        owner = owner.reshape(-1).clone()
        owner[ring] = owner[nearest[ring]]
        owner = owner.reshape(size, size)
    else:
        nearest = torch.arange(size * size, device=device)
    mask = owner >= 0
    flat_mask = mask.reshape(-1)
    texel = flat_mask.nonzero().squeeze(1)
    # each texel shows its own sample, or beyond the mask its nearest covered texel's (covered ⊆ mask)
    rank = torch.cumsum(flat_mask, 0) - 1
    source = torch.where(flat_mask, rank, rank[nearest]).clamp(min=0).reshape(size, size).flip(0).reshape(-1)
    tri = owner.reshape(-1)[texel]
    centre = torch.stack([(texel % size).double() + 0.5, torch.div(texel, size, rounding_mode="floor").double() + 0.5],
                         -1) / size
    # a sliver's texels outside it (its ring, or a snapping hair) sample its nearest point instead
    sliver = _slivers(uv, faces, size)[tri]
    if sliver.any():
        a, b, c = uv.double()[faces[tri[sliver]]].unbind(1)
        outside = _barycentric(centre[sliver], a, b, c).min(1).values < 0
        index = sliver.nonzero().squeeze(1)[outside]
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
