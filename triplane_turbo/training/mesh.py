"""The mesh path of PRD training: the library's marching cubes and rasteriser, with gradients.

Per object: the SDF on a ``grid``³ lattice without gradients decides the surface's topology
(``isosurface.extract_surface``); the SDF and the deformation are then evaluated *with* gradients at
the grid points the crossed edges end at, giving differentiable vertex positions (``edge_t``); the
mesh is rasterised from each camera (``raster.rasterize``: nvdiffrast on CUDA when installed, torch
elsewhere), and per pixel the surface point, the interpolated vertex normal and the distance along
the ray are read, the colour field at the surface point is composited over the background (the
learned one during training, evaluated at every pixel's ray direction as the authors'
``enable_bg_rays``), and all of it goes through nvdiffrast's silhouette antialiasing (``antialias``).

An SDF without a zero crossing on the grid gets one, as the authors' renderer does (after
InstantMesh): the centre grid point is pushed to ``−1 − max`` below its value and a two-point-deep
border shell to ``1 − min`` above, so a small closed surface appears and gradients keep flowing
(instead of a picture of the background). Their offsets follow the SDF's max/min with gradients;
here they are constants (the path's SDF gradient is scaled by 0.001 anyway). When none of an object's
views sees its surface, the whole first view counts as covered, as theirs (``mask[:1] = True``,
generative_space_mesh_rasterize_renderer.py:169-172): coloured by the field at the origin (the
interpolated position off the mesh), zero normals and clip depth there.

Besides the distance along the ray (``depth``), the path gives the clip-space z the authors hand to
RichDreamer (``clip_depth``, generative_space_mesh_rasterize_renderer.py:153-154 and 176-189; the
projection's near 0.1 / far 1000, multiview_multiprompt_dualrender_multistep_v2.py:339-341).

Where gradients go, and where they are dropped:

* colour -> the texture planes and the colour head (the main signal of this path);
* colour, normals, depth -> the interpolated surface points and vertex normals -> the vertices ->
  the SDF and the deformation at the edge ends, scaled by ``grad_scale`` (0.001, as the authors:
  geometry is learned mostly through the volume renderer);
* silhouettes -> the vertices through the antialiasing blend (nvdiffrast's visibility gradient);
* dropped: the topology itself (marching cubes' case choice).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..isosurface import extract_surface
from ..texturing.raster import interpolate, rasterize
from ..triplane import TriplaneFields
from ..texturing.antialias import antialias, edge_neighbours
from .cameras import Cameras
from .config import MeshConfig

Background = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class MeshRender:
    """Images [N, C, S, S] (row 0 at the top), after antialiasing.

    Attributes:
        rgb: [N, 3, S, S] over the background.
        opacity: [N, 1, S, S] coverage: 1 where the mesh covers the pixel, fractional on silhouettes.
        normal: [N, 3, S, S] world-space unit vertex normals (outward) times the coverage.
        depth: [N, 1, S, S] distance from the camera along the pixel's ray times the coverage.
        clip_depth: [N, 1, S, S] the clip-space z the authors' mesh path gives RichDreamer (their
            ``depth = interpolate(v_pos_clip)[..., 2]``, not divided by w; near 0.1, far 1000:
            z_clip = 1.0002·z_axial − 0.2), times the coverage; 0 where no triangle is hit.
        faces: triangles of each object's mesh.
        forced: per object, whether its SDF had no surface on the grid and one was forced.
    """

    rgb: torch.Tensor
    opacity: torch.Tensor
    normal: torch.Tensor
    depth: torch.Tensor
    faces: list[int]
    forced: list[bool]
    clip_depth: torch.Tensor | None = None


def shrink_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` in the forward pass; its gradient multiplied by ``scale`` in the backward pass."""
    return x * scale + x.detach() * (1 - scale)


def forced_surface_offsets(sdf: torch.Tensor) -> torch.Tensor | None:
    """Offsets [R, R, R] that give an SDF grid [R, R, R] without a zero crossing a small surface
    (the authors' rule, see the module docstring), or None when it has a crossing."""
    if not (bool((sdf > 0).all()) or bool((sdf < 0).all())):
        return None
    res = sdf.shape[0]
    offsets = torch.zeros_like(sdf)
    border = torch.zeros_like(sdf, dtype=torch.bool)
    for axis in range(3):
        index = [slice(None)] * 3
        index[axis] = torch.tensor([0, 1, res - 2, res - 1])
        border[tuple(index)] = True
    offsets[border] = 1 - sdf.min()
    offsets[res // 2, res // 2, res // 2] = -1 - sdf.max()
    offsets[(sdf + offsets) == 0] = 0  # never exactly on the level (as theirs)
    return offsets


def differentiable_mesh(fields: TriplaneFields, triplane: torch.Tensor, grid: int, grad_scale: float = 1.0,
                        force_surface: bool = False):
    """One object's isosurface with vertices differentiable in the fields.

    Args:
        triplane: [1, 6, C, H, W].
    Returns:
        vertices [V, 3] float32 world coordinates (with gradients), faces [F, 3] int64 (both empty
        when the SDF has no surface and none is forced), and whether a surface was forced.
    """
    with torch.no_grad():
        sdf = fields.grid_sdf(triplane.detach(), grid)[0]
    offsets = forced_surface_offsets(sdf) if force_surface else None
    if offsets is not None:
        sdf = sdf + offsets
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an empty surface is reported by the caller
        topology = extract_surface(sdf)
    if not len(topology):
        return triplane.new_zeros((0, 3)), topology.faces, offsets is not None
    corner_index = topology.corners.to(triplane.device)
    corners = fields.grid_axis(grid)[corner_index][None]  # [1, K, 3]
    corner_sdf = shrink_gradient(fields.sdf(triplane, corners)[0, :, 0], grad_scale)
    if offsets is not None:
        corner_sdf = corner_sdf + offsets[corner_index[:, 0], corner_index[:, 1], corner_index[:, 2]]
    offsets_xyz = shrink_gradient(fields.deformation(triplane, corners)[0], grad_scale)
    index = topology.vertices(offsets_xyz, topology.edge_t(corner_sdf))  # [V, 3] grid units
    low, high = fields.bbox[0].double(), fields.bbox[1].double()
    world = low + index / (grid - 1) * (high - low)
    return world.float(), topology.faces, offsets is not None


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted vertex normals [V, 3] (unit; outward for the library's marching cubes)."""
    faces = faces.to(vertices.device).long()
    a, b, c = vertices[faces[:, 0]], vertices[faces[:, 1]], vertices[faces[:, 2]]
    face_normals = torch.linalg.cross(b - a, c - a, dim=-1)  # length: twice the area
    normals = torch.zeros_like(vertices).index_add(0, faces.reshape(-1), face_normals.repeat_interleave(3, 0))
    return F.normalize(normals, dim=-1)


class MeshRenderer:
    """Renders each object's mesh from its cameras; see the module docstring."""

    def __init__(self, config: MeshConfig = MeshConfig()):
        self.config = config

    def render(self, fields: TriplaneFields, triplane: torch.Tensor, cameras: Cameras,
               background: Background | None = None) -> MeshRender:
        """The N = B·V views of B objects (triplane [B, 6, C, H, W]) as ``image``² pictures.

        ``background``: colours [B, R, 3] of ray directions [B, R, 3] (R = V·S·S, object b's views),
        e.g. ``LearnedBackground.bind(text)``; None: the config's plain colour.
        """
        cfg = self.config
        size, views = cfg.image, cameras.views_per_prompt
        device = triplane.device
        if background is None:
            background_color = torch.tensor(cfg.background, device=device)
            background = lambda d: background_color.expand(*d.shape[:-1], 3)  # noqa: E731
        _, directions = cameras.rays(size)  # [N, S, S, 3], row 0 at the top
        # every object's background at once; the rasteriser's rows run bottom-up, so it is flipped
        backgrounds = background(directions.reshape(triplane.shape[0], -1, 3)).reshape(-1, size, size, 3).flip(1)
        projection = cameras.projection()
        positions = cameras.c2w[:, :3, 3]
        images, counts, forced = [], [], []
        for b in range(triplane.shape[0]):
            view = slice(b * views, (b + 1) * views)
            vertices, faces, was_forced = differentiable_mesh(fields, triplane[b:b + 1], cfg.grid, cfg.grad_scale,
                                                              cfg.force_surface)
            counts.append(len(faces))
            forced.append(was_forced)
            bg = backgrounds[view]
            if not len(faces):  # nothing to draw (only when forcing is off): the background, on the graph
                empty = torch.zeros(views, size, size, 6, device=device) + 0 * triplane[b].sum()
                images.append(torch.cat([bg, empty], -1).flip(1))
                continue
            homogeneous = torch.cat([vertices, torch.ones_like(vertices[:, :1])], -1)
            clip = torch.einsum("nij,vj->nvi", projection[view], homogeneous)  # [views, V, 4]
            rast = rasterize(clip, faces, (size, size))  # row 0 at the bottom
            triangle = rast[..., 3:] > 0
            covered = triangle
            if cfg.empty_view_fallback and not bool(triangle.any()):
                # the authors' rule when none of the object's views sees its surface: the whole first
                # view counts as covered (coloured by the field at the origin), so gradients still flow
                covered = triangle.clone()
                covered[:1] = True
            hit = covered[..., 0]
            points = interpolate(vertices, rast, faces)  # [views, S, S, 3]; 0 (the origin) off the mesh
            normal = F.normalize(interpolate(vertex_normals(vertices, faces), rast, faces), dim=-1) * covered
            depth = (points - positions[view, None, None, :]).norm(dim=-1, keepdim=True) * covered
            # clip-space z of the surface point: affine in it, so equal to interpolating the vertices'
            # clip z with the same (perspective-correct) barycentrics, as the authors' mesh path does
            row = projection[view, 2]  # [views, 4]
            clip_depth = ((points * row[:, None, None, :3]).sum(-1, keepdim=True) + row[:, None, None, 3:]) * triangle
            color = bg.index_put((hit,), fields.color(triplane[b:b + 1], points[hit][None])[0])
            image = torch.cat([color, covered.float(), normal, depth, clip_depth], -1)  # [views, S, S, 9]
            if cfg.antialias:
                image = antialias(image, rast, clip, faces, neighbours=edge_neighbours(faces.to(device)))
            images.append(image.flip(1))
        out = torch.cat(images).permute(0, 3, 1, 2)  # [N, 9, S, S]
        return MeshRender(out[:, :3], out[:, 3:4], out[:, 4:7], out[:, 7:8], counts, forced, out[:, 8:9])


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, size, size], bilinear."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, (size, size), mode="bilinear", align_corners=False)
