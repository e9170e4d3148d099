"""The mesh path of PRD training: the library's marching cubes and rasteriser, with gradients.

Per object: the SDF on a ``grid``³ lattice without gradients decides the surface's topology
(``isosurface.extract_surface``); the SDF and the deformation are then evaluated *with* gradients at
the grid points the crossed edges end at, giving differentiable vertex positions (``edge_t``); the
mesh is rasterised from each camera (``raster.rasterize``: nvdiffrast on CUDA when installed, torch
elsewhere), the surface point under every pixel is interpolated from the vertices, and the colour
field is read there.

Where gradients go, and where they are dropped:

* colour -> the texture planes and the colour head (the main signal of this path);
* colour -> the interpolated surface points -> the vertices -> the SDF and the deformation at the
  edge ends, scaled by ``grad_scale`` (0.001, as the authors: geometry is learned mostly through the
  volume renderer);
* dropped: which triangle covers a pixel (visibility and silhouettes: no anti-aliasing pass that would
  carry edge gradients), and the topology itself (marching cubes' case choice).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..isosurface import extract_surface
from ..raster import interpolate, rasterize
from ..triplane import TriplaneFields
from .cameras import Cameras
from .config import MeshConfig


@dataclass
class MeshRender:
    """Images [N, C, S, S] (row 0 at the top).

    Attributes:
        rgb: [N, 3, S, S] over the background.
        opacity: [N, 1, S, S] 1 where the mesh covers the pixel.
        faces: triangles of each object's mesh (0 where the SDF had no surface).
    """

    rgb: torch.Tensor
    opacity: torch.Tensor
    faces: list[int]


def shrink_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` in the forward pass; its gradient multiplied by ``scale`` in the backward pass."""
    return x * scale + x.detach() * (1 - scale)


def differentiable_mesh(fields: TriplaneFields, triplane: torch.Tensor, grid: int, grad_scale: float = 1.0):
    """One object's isosurface with vertices differentiable in the fields.

    Args:
        triplane: [1, 6, C, H, W].
    Returns:
        vertices [V, 3] float32 world coordinates (with gradients), faces [F, 3] int64; both empty
        when the SDF has no surface.
    """
    with torch.no_grad():
        sdf = fields.grid_sdf(triplane.detach(), grid)[0]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an empty surface is reported by the caller
        topology = extract_surface(sdf)
    if not len(topology):
        return triplane.new_zeros((0, 3)), topology.faces
    corners = fields.grid_axis(grid)[topology.corners.to(triplane.device)][None]  # [1, K, 3]
    corner_sdf = shrink_gradient(fields.sdf(triplane, corners)[0, :, 0], grad_scale)
    offsets = shrink_gradient(fields.deformation(triplane, corners)[0], grad_scale)
    index = topology.vertices(offsets, topology.edge_t(corner_sdf))  # [V, 3] grid units
    low, high = fields.bbox[0].double(), fields.bbox[1].double()
    world = low + index / (grid - 1) * (high - low)
    return world.float(), topology.faces


class MeshRenderer:
    """Renders each object's mesh from its cameras; see the module docstring."""

    def __init__(self, config: MeshConfig = MeshConfig()):
        self.config = config

    def render(self, fields: TriplaneFields, triplane: torch.Tensor, cameras: Cameras) -> MeshRender:
        """The N = B·V views of B objects (triplane [B, 6, C, H, W]) as ``image``² pictures."""
        cfg = self.config
        size, views = cfg.image, cameras.views_per_prompt
        background = torch.tensor(cfg.background, device=triplane.device)
        projection = cameras.projection()
        images, masks, counts = [], [], []
        for b in range(triplane.shape[0]):
            vertices, faces = differentiable_mesh(fields, triplane[b:b + 1], cfg.grid, cfg.grad_scale)
            counts.append(len(faces))
            view = slice(b * views, (b + 1) * views)
            if not len(faces):  # nothing to draw: the background, still attached to the graph
                images.append(background.expand(views, size, size, 3) + 0 * triplane[b].sum())
                masks.append(torch.zeros(views, size, size, 1, device=triplane.device))
                continue
            homogeneous = torch.cat([vertices, torch.ones_like(vertices[:, :1])], -1)
            clip = torch.einsum("nij,vj->nvi", projection[view], homogeneous)  # [V_views, V, 4]
            rast = rasterize(clip, faces, (size, size))  # row 0 at the bottom
            points = interpolate(vertices, rast, faces)  # [views, S, S, 3]
            covered = rast[..., 3:] > 0
            hit = covered[..., 0]
            color = background.expand_as(points).index_put((hit,), fields.color(triplane[b:b + 1], points[hit][None])[0])
            images.append(color.flip(1))
            masks.append(covered.float().flip(1))
        rgb = torch.cat(images).permute(0, 3, 1, 2)
        return MeshRender(rgb, torch.cat(masks).permute(0, 3, 1, 2), counts)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, size, size], bilinear."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, (size, size), mode="bilinear", align_corners=False)
