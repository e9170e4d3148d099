"""Preview images: a mesh rendered from a fixed three-quarter view with simple shading.

Used for the app's variants and history galleries and the README's pictures. The mesh is shown as
the exported files show it (display frame: +Y up, front towards +Z), coloured by its baked texture
when it has one, else by its vertex colours, lit by a key light from the upper left of the camera
plus ambient light, anti-aliased by supersampling. Rasterised by ``raster.rasterize`` (nvdiffrast
on CUDA when installed, the torch rasteriser elsewhere).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
import trimesh

from .export import to_display_frame
from .raster import interpolate, rasterize
from .texture import UVTexture

#: Camera of every preview: azimuth and elevation in degrees, vertical field of view.
AZIMUTH, ELEVATION, FOV = 35.0, 22.0, 30.0
BACKGROUND = (245, 245, 247)


def look_at(eye: torch.Tensor, target: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """World -> camera matrix [4, 4] (OpenGL: the camera looks down its -z axis)."""
    forward = F.normalize(target - eye, dim=0)
    right = F.normalize(torch.linalg.cross(forward, up), dim=0)
    true_up = torch.linalg.cross(right, forward)
    view = torch.eye(4, dtype=eye.dtype)
    view[0, :3], view[1, :3], view[2, :3] = right, true_up, -forward
    view[:3, 3] = -view[:3, :3] @ eye
    return view


def perspective(fov_degrees: float, near: float, far: float) -> torch.Tensor:
    """Camera -> clip matrix [4, 4] for a square image (OpenGL conventions)."""
    f = 1.0 / math.tan(math.radians(fov_degrees) / 2)
    return torch.tensor([[f, 0, 0, 0], [0, f, 0, 0],
                         [0, 0, (far + near) / (near - far), 2 * far * near / (near - far)],
                         [0, 0, -1, 0]], dtype=torch.float64)


@torch.inference_mode()
def render_preview(mesh: trimesh.Trimesh, texture: UVTexture | None = None, size: int = 256, *,
                   supersample: int = 2, background=BACKGROUND, device: str | torch.device = "cpu",
                   backend: str = "auto") -> np.ndarray:
    """A shaded picture of ``mesh`` (model frame, as the pipeline returns it) -> [size, size, 3] uint8.

    Args:
        mesh: vertices and faces; coloured by ``texture`` if given, else by its vertex colours
            (plain grey without either).
        texture: the mesh's baked ``UVTexture``.
        size: image side in pixels.
        supersample: rendered at ``size * supersample`` and averaged down (anti-aliasing).
    """
    image = np.empty((size, size, 3), np.uint8)
    image[:] = background
    if len(mesh.faces) == 0:
        return image
    vertices = torch.as_tensor(to_display_frame(np.asarray(mesh.vertices, dtype=np.float64)))
    normals = torch.as_tensor(to_display_frame(np.asarray(mesh.vertex_normals, dtype=np.float64)))
    faces = torch.as_tensor(np.asarray(mesh.faces, dtype=np.int64))
    if texture is not None:  # draw the seam-split mesh so that UVs are per corner
        vertices, normals, faces = vertices[texture.vmapping], normals[texture.vmapping], torch.as_tensor(texture.faces)

    low, high = vertices.min(0).values, vertices.max(0).values
    centre = (low + high) / 2
    radius = float((vertices - centre).norm(dim=1).max())  # the sphere around the box centre that holds it
    distance = radius / math.sin(math.radians(FOV) / 2) * 1.15
    az, el = math.radians(AZIMUTH), math.radians(ELEVATION)
    eye = centre + distance * torch.tensor([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)],
                                           dtype=torch.float64)
    view = look_at(eye, centre, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    projection = perspective(FOV, max(distance - radius * 1.5, 1e-3), distance + radius * 1.5)
    homogeneous = torch.cat([vertices, torch.ones(len(vertices), 1, dtype=torch.float64)], 1)
    clip = (homogeneous @ (projection @ view).T).float().to(device)
    faces = faces.to(device)
    side = size * supersample
    rast = rasterize(clip, faces, (side, side), backend=backend)

    covered = rast[0, ..., 3] > 0
    normal = F.normalize(interpolate(normals.float().to(device), rast, faces)[0], dim=-1)
    if texture is not None:
        uv = interpolate(torch.as_tensor(texture.uv, device=device), rast, faces)[0]
        base = torch.as_tensor(texture.base_color, device=device).permute(2, 0, 1)[None].float() / 255
        grid = torch.stack([uv[..., 0] * 2 - 1, 1 - uv[..., 1] * 2], -1)[None]  # image rows run top-down
        albedo = F.grid_sample(base, grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
        albedo = albedo.permute(1, 2, 0)
    elif mesh.visual.kind == "vertex":
        colors = torch.as_tensor(np.asarray(mesh.visual.vertex_colors)[:, :3], device=device).float() / 255
        albedo = interpolate(colors, rast, faces)[0]
    else:
        albedo = torch.full((side, side, 3), 0.7, device=device)

    # light from the camera's upper left, and a dimmer fill from the opposite side
    to_camera = F.normalize((eye - centre).float(), dim=0).to(device)
    right = view[0, :3].float().to(device)
    up = view[1, :3].float().to(device)
    key = F.normalize(to_camera + 0.6 * up - 0.5 * right, dim=0)
    fill = F.normalize(to_camera - 0.8 * up + 0.7 * right, dim=0)
    lambert = 0.62 * (normal @ key).clamp(min=0) + 0.18 * (normal @ fill).clamp(min=0) + 0.32
    shaded = (albedo * lambert[..., None]).clamp(0, 1)
    canvas = torch.tensor(background, device=device).float().expand(side, side, 3) / 255
    pixels = torch.where(covered[..., None], shaded, canvas).flip(0)  # row 0 at the top
    pixels = F.avg_pool2d(pixels.permute(2, 0, 1)[None], supersample)[0].permute(1, 2, 0)
    return np.round(pixels.cpu().numpy() * 255).astype(np.uint8)


__all__ = ["AZIMUTH", "BACKGROUND", "ELEVATION", "FOV", "look_at", "perspective", "render_preview"]
