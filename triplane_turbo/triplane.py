"""Triplane -> fields: plane sampling and the SDF / deformation / colour heads.

A triplane is [B, 6, C, H, W]: planes 0-2 (xy, xz, yz) carry geometry, planes 3-5 texture.
Numerics follow the authors' implementation (docs/CHECKPOINT.md §6.6): bilinear sampling with
``align_corners=False`` and zero padding; the geometry feature is the *sum* of the three geometry
samples, the texture feature the *concatenation* [xy, xz, yz]; ``sdf = mlp(geo) + (|p| - 0.5)``.

The reference rotates each decoded plane before sampling; the net effect is stated here directly on
the decoded image (row index from the top, column index from the left, both in [-1, 1]):
xy: row = x, column = y;  xz: row = -z, column = -x;  yz: row = -z, column = y.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def plane_columns_rows(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised points [..., 3] -> their (column, row) grid_sample coordinates on the xy, xz and yz
    planes, [..., 3] each (one plane per last index); see the module docstring for the axis conventions."""
    x, y, z = points.unbind(-1)
    return torch.stack([y, -x, y], -1), torch.stack([x, -z, -z], -1)


def plane_coordinates(points: torch.Tensor) -> torch.Tensor:
    """Normalised points [..., 3] -> grid_sample coordinates [3, ..., 2] for the xy, xz, yz planes
    (grid_sample reads (column, row))."""
    return torch.stack(plane_columns_rows(points), -1).movedim(-2, 0)


def lattice_weights(axis: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear weights [R, size] that sample a length-``size`` pixel row at normalised coords ``axis``.

    Same convention as grid_sample(align_corners=False, padding_mode="zeros"): the continuous pixel
    position of u is ((u + 1)·size - 1)/2 and taps outside the image contribute nothing. Sampling a
    plane on a lattice is then ``Wr @ plane @ Wc.T`` — separable, so a plane is read once per grid
    row instead of once per grid point.
    """
    pos = ((axis.float() + 1) * size - 1) / 2
    lo = pos.floor()
    frac = pos - lo
    weights = torch.zeros(axis.shape[0], size, dtype=torch.float32, device=axis.device)
    rows = torch.arange(axis.shape[0], device=axis.device)
    for tap, w in ((lo, 1 - frac), (lo + 1, frac)):
        inside = (tap >= 0) & (tap <= size - 1)
        weights[rows[inside], tap[inside].long()] += w[inside]
    return weights


def sample_bilinear(planes: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``F.grid_sample(planes, grid, "bilinear", padding_mode="zeros", align_corners=False)``, written
    with gathers so that it can be differentiated twice (grid_sample's own backward cannot be: the
    eikonal regulariser of training needs the gradient of the SDF's gradient).

    Args:
        planes: [N, C, H, W].
        grid: [N, 1, P, 2] sample points, (column, row) normalised to [-1, 1].
    Returns:
        [N, C, 1, P].
    """
    n, c, h, w = planes.shape
    x = ((grid[..., 0] + 1) * w - 1) / 2  # [N, 1, P] continuous pixel positions
    y = ((grid[..., 1] + 1) * h - 1) / 2
    x0, y0 = x.detach().floor(), y.detach().floor()
    fx, fy = x - x0, y - y0  # in [0, 1): the derivative is grid_sample's, even on a texel's centre
    flat = planes.reshape(n, c, h * w)
    out = 0
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        xi, yi = x0 + dx, y0 + dy
        weight = (fx if dx else 1 - fx) * (fy if dy else 1 - fy)  # bilinear tap weight, [N, 1, P]
        inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)  # zero padding
        index = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long().reshape(n, 1, -1).expand(-1, c, -1)
        taps = torch.gather(flat, 2, index).reshape(n, c, *x.shape[1:])
        out = out + taps * (weight * inside)[:, None]
    return out


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs (float16/bfloat16 planes) computed in float32; float64 kept (gradcheck)."""
    return x if x.dtype == torch.float64 else x.float()


class MLP(nn.Module):
    """Linear -> ReLU -> ... -> Linear without biases (keys ``layers.0``, ``layers.2``, ...)."""

    def __init__(self, dims: tuple[int, ...]):
        super().__init__()
        modules: list[nn.Module] = []
        for i in range(len(dims) - 1):
            if i:
                modules.append(nn.ReLU(inplace=True))
            modules.append(nn.Linear(dims[i], dims[i + 1], bias=False))
        self.layers = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@dataclass
class Fields:
    """Field values at query points.

    Attributes:
        sdf: [B, N, 1] signed distance (negative inside), sphere prior included.
        deformation: [B, N, 3] marching-cubes vertex offsets in grid-cell units.
        color: [B, N, 3] colour after the activation sigmoid(x)·1.002 − 0.001, in [−0.001, 1.001].
        sdf_raw: [B, N, 1] SDF head output before the sphere prior.
        color_raw: [B, N, 3] colour head output before the activation.
    """

    sdf: torch.Tensor
    deformation: torch.Tensor
    color: torch.Tensor
    sdf_raw: torch.Tensor
    color_raw: torch.Tensor


def color_activation(raw: torch.Tensor) -> torch.Tensor:
    """The authors' "sigmoid-mipnerf" colour activation."""
    return torch.sigmoid(raw) * 1.002 - 0.001


class TriplaneFields(nn.Module):
    """The three heads and the object box; turns a triplane into fields at 3D points.

    Args:
        plane_channels: channels C of each plane (the published model: 32).
        mlp_hidden: hidden widths of each head (published: (64, 64)).
        sphere_radius: radius of the SDF's sphere prior.
        twice_differentiable: sample the planes with ``sample_bilinear`` (same values, and a
            gradient that can itself be differentiated: training's eikonal term) instead of grid_sample.
    """

    def __init__(self, plane_channels: int, mlp_hidden: tuple[int, ...] = (64, 64), sphere_radius: float = 0.5,
                 twice_differentiable: bool = False):
        super().__init__()
        self.sphere_radius = sphere_radius
        self.twice_differentiable = twice_differentiable
        self.sdf_network = MLP((plane_channels, *mlp_hidden, 1))
        self.feature_network = MLP((3 * plane_channels, *mlp_hidden, 3))
        self.deformation_network = MLP((plane_channels, *mlp_hidden, 3))
        self.register_buffer("bbox", torch.tensor([[-1.0] * 3, [1.0] * 3]))

    # -- coordinates -------------------------------------------------------------------------------
    def normalize(self, points: torch.Tensor) -> torch.Tensor:
        """World points -> [-1, 1] inside the box, computed as the reference does."""
        lo, hi = self.bbox[0], self.bbox[1]
        return (points - lo) / (hi - lo) * 2 - 1

    def grid_axis(self, resolution: int) -> torch.Tensor:
        """World coordinates [R] of the marching-cubes grid along each axis (a cubic box)."""
        lo, hi = self.bbox[0, 0], self.bbox[1, 0]
        return torch.linspace(0, 1, resolution, device=self.bbox.device) * (hi - lo) + lo

    # -- point queries -----------------------------------------------------------------------------
    def sample_planes(self, triplane: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features at world points.

        Args:
            triplane: [B, 6, C, H, W].
            points: [B, N, 3] world coordinates.
        Returns:
            geometry feature [B, N, C] (sum of the three planes) and texture feature
            [B, N, 3C] (concatenation [xy, xz, yz]).
        """
        return self.geometry_feature(triplane, points), self.texture_feature(triplane, points)

    def geometry_feature(self, triplane: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """[B, N, C]: the three geometry planes sampled at world points [B, N, 3], summed."""
        xy, xz, yz = self._sample_three(triplane[:, :3], points).unbind(1)
        return xy + xz + yz

    def texture_feature(self, triplane: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """[B, N, 3C]: the three texture planes sampled at world points [B, N, 3], concatenated."""
        xy, xz, yz = self._sample_three(triplane[:, 3:], points).unbind(1)
        return torch.cat([xy, xz, yz], dim=-1)

    def _sample_three(self, planes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Planes [B, 3, C, H, W] (xy, xz, yz) bilinearly sampled at world points [B, N, 3] -> [B, 3, N, C]."""
        b, _, c, h, w = planes.shape
        coords = plane_coordinates(_at_least_float32(self.normalize(points)))  # [3, B, N, 2]
        grid = coords.permute(1, 0, 2, 3).reshape(b * 3, 1, -1, 2)
        planes = _at_least_float32(planes.reshape(b * 3, c, h, w))
        if self.twice_differentiable:
            s = sample_bilinear(planes, grid)
        else:
            s = F.grid_sample(planes, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # [B·3, C, 1, N]
        return s.reshape(b, 3, c, -1).permute(0, 1, 3, 2)

    def forward(self, triplane: torch.Tensor, points: torch.Tensor) -> Fields:
        """All fields at world points [B, N, 3] (see ``Fields`` for shapes)."""
        geometry, texture = self.sample_planes(triplane, points)
        sdf_raw = self.sdf_network(geometry)
        color_raw = self.feature_network(texture)
        return Fields(
            sdf=sdf_raw + self.sphere_prior(points),
            deformation=self.deformation_network(geometry),
            color=color_activation(color_raw),
            sdf_raw=sdf_raw,
            color_raw=color_raw,
        )

    def sphere_prior(self, points: torch.Tensor) -> torch.Tensor:
        return _at_least_float32(points).norm(dim=-1, keepdim=True) - self.sphere_radius

    def sdf(self, triplane: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """[B, N, 1] signed distance at world points (sphere prior included)."""
        return self.sdf_network(self.geometry_feature(triplane, points)) + self.sphere_prior(points)

    def deformation(self, triplane: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """[B, N, 3] grid deformation at world points."""
        return self.deformation_network(self.geometry_feature(triplane, points))

    def color(self, triplane: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """[B, N, 3] activated colour at world points."""
        return color_activation(self.feature_network(self.texture_feature(triplane, points)))

    # -- grid queries ------------------------------------------------------------------------------
    def grid_points(self, resolution: int) -> torch.Tensor:
        """[R³, 3] world points of the grid, x slowest and z fastest (the reference's order)."""
        axis = self.grid_axis(resolution)
        return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)

    def grid_sdf(self, triplane: torch.Tensor, resolution: int, chunk: int = 2**16) -> torch.Tensor:
        """SDF on the R³ grid, [B, R, R, R] with ``[b, i, j, k]`` at (axis[i], axis[j], axis[k]).

        Separable evaluation: each plane is sampled once on its R×R lattice and pushed through the
        SDF head's first (linear, bias-free) layer; the per-point pre-activation is then the sum of
        three broadcast lattices. Matches point-wise sampling to float rounding at a fraction of the
        cost. About ``chunk`` points (whole x-slices) are finished at a time, channels first so that
        the head's layers are plain matrix products; that bounds memory, and on the CPU a chunk of
        ~2^16 points keeps the work in cache.
        """
        first, rest = self.sdf_network.layers[0], self.sdf_network.layers[1:]
        axis = self.grid_axis(resolution)
        u = self.normalize(axis[:, None].expand(-1, 3))[:, 0]  # the box is cubic: one axis serves all
        xy, xz, yz = self._projected_lattices(triplane[:, :3], u, first.weight)  # [B, K, R, R] each
        prior = axis.float() ** 2
        prior_jk = prior[:, None] + prior[None, :]  # y² + z² on the (j, k) lattice, shared by every slice
        out = torch.empty((triplane.shape[0], resolution, resolution, resolution), device=xy.device)
        slices = max(1, chunk // (resolution * resolution))
        for b in range(triplane.shape[0]):
            for start in range(0, resolution, slices):
                sl = slice(start, start + slices)
                # pre-activation at (i, j, k) = XY[i, j] + XZ[i, k] + YZ[j, k], as [K, i, j, k]
                h = yz[b, :, None] + xy[b, :, sl, :, None]
                h += xz[b, :, sl, None, :]
                sdf = _mlp_channels_first(rest, h.reshape(h.shape[0], -1)).reshape(-1, resolution, resolution)
                norm = (prior[sl, None, None] + prior_jk).sqrt()
                out[b, sl] = sdf + (norm - self.sphere_radius)
        return out

    def _projected_lattices(self, planes: torch.Tensor, u: torch.Tensor, weight: torch.Tensor):
        """Geometry planes [B, 3, C, H, W] sampled on the lattice and projected by ``weight`` [K, C].

        Returns XY[b, :, i, j], XZ[b, :, i, k], YZ[b, :, j, k], each [B, K, R, R].
        """
        planes = planes.float()
        size = planes.shape[-1]
        pos, neg = lattice_weights(u, size), lattice_weights(-u, size)
        proj = torch.einsum("kc,bpchw->bpkhw", weight.float(), planes)
        # rows/columns: xy (x, y); xz (-z, -x); yz (-z, y) — see the module docstring
        xy = torch.einsum("ih,bkhw,jw->bkij", pos, proj[:, 0], pos)
        xz = torch.einsum("kh,bchw,iw->bcik", neg, proj[:, 1], neg)
        yz = torch.einsum("kh,bchw,jw->bcjk", neg, proj[:, 2], pos)
        return xy.contiguous(), xz.contiguous(), yz.contiguous()


def _mlp_channels_first(layers: nn.Sequential, h: torch.Tensor) -> torch.Tensor:
    """The bias-free Linear/ReLU stack ``layers`` applied to features stored as columns, [C, N] -> [C', N]."""
    for layer in layers:
        h = torch.mm(layer.weight, h) if isinstance(layer, nn.Linear) else h.relu_()
    return h


class PlaneQuery:
    """A head's first layer folded into the planes, for fast queries at many points.

    The heads' first layer is linear and bias-free and bilinear sampling is linear too, so
    ``W · [sample(P_xy), sample(P_xz), sample(P_yz)] = Σ_p sample(W_p · P_p)``: the planes,
    multiplied by their slice of W once per bake, give the first hidden layer directly from twelve
    taps per point, which ``embedding_bag`` gathers and weights in one fused pass (on the CPU 2-3x
    faster than ``grid_sample`` of the raw planes, then the first matrix product). Same values as
    ``TriplaneFields`` up to float32 rounding (about 1e-6).

    Args:
        fields: the heads; ``head``: one of their MLPs; ``planes``: [3, C, H, W] (xy, xz, yz);
        ``concatenated``: the head reads the three samples concatenated (colour) rather than summed (SDF).
    """

    def __init__(self, fields: TriplaneFields, head: torch.nn.Module, planes: torch.Tensor, concatenated: bool):
        first = head.layers[0]
        weight = first.weight.float()  # [K, 3C] or [K, C]
        _, c, h, w = planes.shape
        per_plane = weight.reshape(weight.shape[0], 3, c).permute(1, 0, 2) if concatenated else weight.expand(3, -1, -1)
        # [3, H, W, K]: W_p · planes[p, :, row, column]
        table = torch.einsum("pkc,pchw->phwk", per_plane, planes.float())
        # zero rows and columns around each plane (one before, two after) stand for grid_sample's zero
        # padding: a tap off the plane reads a zero, so no tap needs a mask or a clamp
        self.table = torch.nn.functional.pad(table, (0, 0, 1, 2, 1, 2)).reshape(3 * (h + 3) * (w + 3), -1).contiguous()
        self.stride = w + 3  # of the padded table's rows
        self.plane_offsets = torch.arange(3, device=planes.device) * ((h + 3) * self.stride)
        # the four taps from (x0, y0): (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)
        self.tap_offsets = torch.tensor([0, 1, self.stride, self.stride + 1], device=planes.device)
        self.bias = first.bias.float() if first.bias is not None else None
        self.rest = head.layers[1:]
        self.activate = concatenated  # the colour head's output goes through the colour activation
        self.fields, self.height, self.width = fields, h, w

    @classmethod
    def color(cls, fields: TriplaneFields, triplane: torch.Tensor) -> "PlaneQuery":
        """Colour queries for one object's triplane [1, 6, C, H, W]: call it with points [N, 3] -> colours [N, 3]."""
        return cls(fields, fields.feature_network, triplane[0, 3:], concatenated=True)

    @classmethod
    def sdf(cls, fields: TriplaneFields, triplane: torch.Tensor) -> "PlaneQuery":
        """SDF queries (raw head output, without the sphere prior): points [N, 3] -> [N, 1]."""
        return cls(fields, fields.sdf_network, triplane[0, :3], concatenated=False)

    def hidden(self, points: torch.Tensor) -> torch.Tensor:
        """The first layer's output [N, K] (before its activation) at world points [N, 3]."""
        # point-major [N, 3 planes], so that the twelve taps come out contiguous per point
        column, row = plane_columns_rows(self.fields.normalize(points.float()))
        # grid_sample's align_corners=False pixel positions; beyond the zero border every tap reads zero,
        # so positions clamp to it
        x = (((column + 1) * self.width - 1) / 2).clamp_(-1, self.width)
        y = (((row + 1) * self.height - 1) / 2).clamp_(-1, self.height)
        x0, y0 = x.floor(), y.floor()
        fx, fy = x - x0, y - y0
        corner = ((y0 + 1) * self.stride + (x0 + 1)).long() + self.plane_offsets  # [N, 3] the (x0, y0) taps
        index = (corner[..., None] + self.tap_offsets).view(len(points), 12)  # [N, 3 planes, 4 taps]
        gx, gy = 1 - fx, 1 - fy
        weight = torch.stack([gx * gy, fx * gy, gx * fy, fx * fy], -1).view(len(points), 12)
        out = torch.nn.functional.embedding_bag(index, self.table, per_sample_weights=weight, mode="sum")
        return out + self.bias if self.bias is not None else out

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        """The head's output at world points [N, 3]: colours [N, 3] (activated) or raw SDF [N, 1]."""
        out = self.rest(self.hidden(points))
        return color_activation(out) if self.activate else out
