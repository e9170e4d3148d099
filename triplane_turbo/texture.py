"""Texturing: vertex colours, and UV textures baked from the colour field.

Vertex colours read the colour field once per vertex, which ties colour detail to the triangle count.
A baked texture reads it once per texel instead, so a light mesh keeps the field's detail:

1. ``unwrap``: a UV atlas, by default ``uv.box_unwrap`` (box-projected charts, ~0.1 s for a 60k-face
   isosurface) or xatlas (``method="xatlas"``: conformal charts capped in area, seconds), packed
   into one square with padding between charts;
2. ``texel_samples``: the atlas rasterised in UV space (``raster.rasterize_coverage``), so every
   covered texel knows its triangle and barycentrics, hence its 3D point on the surface; texels just
   outside a chart extend the nearest triangle, so a bilinear lookup at a chart's edge blends true
   field values;
3. the colour field at those points (``PlaneQuery``: the colour head's first layer folded into the
   planes, one fused gather per point), into a square sRGB image;
4. every texel farther out copies its nearest covered texel (the same distance transform as step 2),
   so mip-mapped lookups near chart borders do not bleed the background in;
5. optionally a tangent-space normal map from the SDF's gradient, in MikkTSpace frames
   (``tangents.mikktspace``: what glTF viewers derive when a file carries no tangents), and the
   tangents themselves, which the GLB then carries; so a simplified mesh shades like the full
   isosurface in every viewer.

Everything runs on the device of the fields (the distance transform and the unwrap's packing on the
CPU, as small arrays).

Image convention: ``base_color[0]`` is the top row, i.e. v ≈ 1 in trimesh's (OpenGL) UV convention;
the GLB writer flips v into glTF's top-left origin.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import trimesh

from .raster import rasterize, rasterize_coverage
from .triplane import TriplaneFields, color_activation, plane_coordinates
from .uv import ATLAS_SUBPIXEL_BITS, atlas_pixels, box_unwrap, triangle_atlas

logger = logging.getLogger(__name__)

#: Texture sizes the library accepts.
MIN_TEXTURE_SIZE, MAX_TEXTURE_SIZE = 64, 4096


# -------------------------------------------------------------------------------------------------
# Vertex colours
# -------------------------------------------------------------------------------------------------

@torch.inference_mode()
def vertex_colors(fields: TriplaneFields, triplane: torch.Tensor, vertices: np.ndarray) -> np.ndarray:
    """Colours [V, 4] uint8 (opaque) of one object at its vertices.

    Args:
        fields: the heads that turn planes into colours.
        triplane: [1, 6, C, H, W], one object.
        vertices: [V, 3] world coordinates (the final, deformed positions).
    """
    points = torch.as_tensor(np.asarray(vertices), dtype=torch.float32, device=fields.bbox.device)[None]
    rgb = fields.color(triplane.to(fields.bbox.device), points)[0].clamp(0, 1).cpu().numpy()
    return np.concatenate([to_uint8(rgb), np.full((len(rgb), 1), 255, np.uint8)], axis=1)


def to_uint8(values: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8, rounded."""
    return np.round(np.clip(values, 0, 1) * 255).astype(np.uint8)


def srgb_to_linear(rgb: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in [0, 1] -> linear light in [0, 1] (IEC 61966-2-1)."""
    rgb = np.asarray(rgb, dtype=np.float64)
    return np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)


# -------------------------------------------------------------------------------------------------
# UV textures
# -------------------------------------------------------------------------------------------------

@dataclass
class UVTexture:
    """A texture baked for one mesh, and the UV layout it needs.

    The mesh's faces keep their order; UV vertices are mesh vertices split along chart seams.

    Attributes:
        vmapping: [V'] int64, the mesh vertex each UV vertex copies.
        faces: [F, 3] int64, the mesh's faces in UV-vertex indices (``vmapping[faces] == mesh.faces``).
        uv: [V', 2] float32 in [0, 1], trimesh's convention (v = 0 is the image's bottom row).
        base_color: [S, S, 3] uint8 sRGB, row 0 at the top.
        normal: [S, S, 3] uint8 tangent-space normal map (glTF convention: +X along u, +Y along v
            "up", +Z out of the surface), or None.
        tangents: [V', 4] float32, the MikkTSpace tangent of each UV vertex (xyz in the model frame,
            w = ±1 the bitangent's sign) that the normal map was baked against, with the normals of
            ``vertex_normals``; None without a normal map.
    """

    vmapping: np.ndarray
    faces: np.ndarray
    uv: np.ndarray
    base_color: np.ndarray
    normal: np.ndarray | None = None
    tangents: np.ndarray | None = None

    @property
    def size(self) -> int:
        return int(self.base_color.shape[0])

    def textured_mesh(self, mesh: trimesh.Trimesh, roughness: float = 0.9) -> trimesh.Trimesh:
        """``mesh`` split along the seams, with this texture as a non-metallic PBR material."""
        from PIL import Image

        material = trimesh.visual.material.PBRMaterial(
            baseColorTexture=Image.fromarray(self.base_color),
            normalTexture=Image.fromarray(self.normal) if self.normal is not None else None,
            baseColorFactor=[255, 255, 255, 255], metallicFactor=0.0, roughnessFactor=roughness)
        visual = trimesh.visual.TextureVisuals(uv=self.uv, material=material)
        # the unsplit mesh's smooth normals: computed on the split mesh they would crease along the
        # seams, and the normal map was baked against these
        return trimesh.Trimesh(np.asarray(mesh.vertices)[self.vmapping], self.faces, visual=visual, process=False,
                               vertex_normals=self.vertex_normals(mesh))

    def vertex_normals(self, mesh: trimesh.Trimesh) -> np.ndarray:
        """[V', 3] float32 unit normals of the UV vertices: the unsplit mesh's smooth vertex normals
        (in ``mesh``'s frame), which the normal map was baked against. Computed on the split mesh they
        would crease along the seams."""
        return _unit(np.asarray(mesh.vertex_normals, dtype=np.float64)[self.vmapping]).astype(np.float32)


def validate_texture_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise TypeError(f"texture size must be an integer, got {type(size).__name__}")
    if not MIN_TEXTURE_SIZE <= int(size) <= MAX_TEXTURE_SIZE:
        raise ValueError(f"texture size must be between {MIN_TEXTURE_SIZE} and {MAX_TEXTURE_SIZE}, got {size}")
    return int(size)


#: Above this many sharp edges (dihedral angle over 40°) a mesh is too rough for xatlas: it would
#: make thousands of tiny charts and pack them in minutes (measured: 7,000 charts of a noise surface,
#: 11 s for 20k faces, 511 s for 70k). Smooth objects have a few hundred.
MAX_SHARP_EDGES_FOR_CHARTS = 4000
#: UV unwrappers ``unwrap`` and ``bake_texture`` accept.
UNWRAP_METHODS = ("fast", "xatlas")


def unwrap(vertices: np.ndarray, faces: np.ndarray, size: int = 1024, padding: int = 4,
           charts_per_area: float = 64.0, method: str = "fast") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A UV atlas for a mesh, packed as one atlas.

    ``method="fast"`` (default): box-projected charts (``uv.box_unwrap``), for the smooth closed
    surfaces this model makes; about 0.1 s for 60k faces. ``method="xatlas"``: xatlas charts, each
    capped in area, for any mesh (seconds; 39 s for 60k faces with xatlas' defaults). A mesh too
    rough for xatlas' charts (see ``MAX_SHARP_EDGES_FOR_CHARTS``) gets one cell per triangle
    (``triangle_atlas``), so that the time stays bounded whatever the network produced.

    Args:
        vertices, faces: [V, 3] and [F, 3] the mesh.
        size: the texture side the atlas will be baked at (the packer's resolution).
        padding: texels left between charts at that resolution.
        charts_per_area: xatlas only: cap on each chart's area, as a fraction 1/charts_per_area of the mesh's.
        method: "fast" or "xatlas".
    Returns:
        vmapping [V'] int64, faces [F, 3] int64 in UV-vertex indices (``vmapping[faces] == faces``),
        uv [V', 2] float32 in [0, 1] (v = 0 at the image's bottom row).
    """
    if method not in UNWRAP_METHODS:
        raise ValueError(f"unknown unwrap method {method!r}; choose one of {UNWRAP_METHODS}")
    if method == "fast":
        return box_unwrap(vertices, faces, size, padding)
    return _xatlas_unwrap(vertices, faces, size, padding, charts_per_area)


def _xatlas_unwrap(vertices, faces, size, padding, charts_per_area):
    import xatlas

    mesh = trimesh.Trimesh(vertices, faces, process=False)
    sharp = int((mesh.face_adjacency_angles > np.radians(40)).sum())
    if sharp > MAX_SHARP_EDGES_FOR_CHARTS:
        logger.info("%d sharp edges: one UV cell per triangle instead of xatlas charts", sharp)
        return triangle_atlas(np.asarray(faces), size)
    vertices = np.ascontiguousarray(vertices, dtype=np.float32)
    faces = np.ascontiguousarray(faces, dtype=np.uint32)
    atlas = xatlas.Atlas()
    atlas.add_mesh(vertices, faces)
    charts = xatlas.ChartOptions()
    area = float(trimesh.triangles.area(vertices[faces.astype(np.int64)]).sum())
    charts.max_chart_area = area / charts_per_area
    packing = xatlas.PackOptions()
    packing.resolution = size
    packing.padding = padding
    atlas.generate(chart_options=charts, pack_options=packing)
    if atlas.atlas_count != 1:  # with texels_per_unit left at 0 xatlas grows one atlas; check anyway
        raise RuntimeError(f"xatlas packed the charts into {atlas.atlas_count} atlases, expected one")
    vmapping, uv_faces, uv = atlas[0]
    return vmapping.astype(np.int64), uv_faces.astype(np.int64), uv.astype(np.float32)


def rasterize_atlas(uv: torch.Tensor, faces: torch.Tensor, size: int) -> torch.Tensor:
    """The atlas's triangles rasterised in UV space: rast [S, S, 4], row 0 at v ≈ 0 (bottom).

    Texel (row r, column c) samples uv ((c + 0.5)/S, (r + 0.5)/S).
    """
    clip = torch.cat([uv * 2 - 1, torch.zeros_like(uv[:, :1]), torch.ones_like(uv[:, :1])], dim=1)
    return rasterize(clip, faces, (size, size))[0]


def atlas_owner(uv: torch.Tensor, faces: torch.Tensor, size: int) -> torch.Tensor:
    """owner [S, S] int64: the face whose UV triangle each texel centre falls in (-1: none), rows
    bottom-up; texel (r, c) samples uv ((c + 0.5)/S, (r + 0.5)/S). The lowest face wins where
    triangles overlap (xatlas' layouts, snapped slivers)."""
    return rasterize_coverage(atlas_pixels(uv, size), faces, (size, size), subpixel_bits=ATLAS_SUBPIXEL_BITS)[0]


def fill_gutters(image: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """Every uncovered texel takes the value of its nearest covered texel (Euclidean).

    Args:
        image: [H, W, C] texel values (only covered ones are meaningful).
        covered: [H, W] bool.
    """
    if covered.all() or not covered.any():
        return image
    return image.reshape(-1, image.shape[-1])[_nearest_covered(covered)].reshape(image.shape)


def _nearest_covered(covered: np.ndarray, distances: bool = False):
    """For every texel of ``covered`` [H, W], the flat index of its nearest covered texel [H·W]
    (itself where covered), and with ``distances`` the distance to it [H, W] in texels."""
    from scipy.ndimage import distance_transform_edt

    result = distance_transform_edt(~covered, return_distances=distances, return_indices=True)
    distance, (rows, cols) = result if distances else (None, result)
    nearest = (rows.astype(np.int64) * covered.shape[1] + cols).reshape(-1)
    return (nearest, distance) if distances else nearest


#: Points per field query on a CPU during a bake (see ``bake_texture``).
CPU_QUERY_POINTS = 2**14
#: Texels beyond a chart's edge that get the colour field extended from the nearest triangle (the
#: rest of the gutter copies nearest texels): bilinear lookups at the edge then blend true values.
EXTENDED_TEXELS = 2.5


@contextmanager
def _stage(timings: dict | None, name: str, device: torch.device):
    """Adds the block's wall time to ``timings[name]`` (synchronising CUDA first), when timings are kept."""
    if timings is None:
        yield
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


@torch.inference_mode()
def bake_texture(fields: TriplaneFields, triplane: torch.Tensor, mesh: trimesh.Trimesh, size: int = 1024, *,
                 normal_map: bool = False, grid_spacing: float | None = None, chunk: int = 2**18,
                 padding: int = 4, unwrap: str = "fast", timings: dict | None = None) -> UVTexture:
    """Unwrap ``mesh`` and bake the colour field (and optionally the SDF's normals) into textures.

    Args:
        fields: the heads of the model; the bake runs on their device.
        triplane: [1, 6, C, H, W], the object's planes.
        mesh: the (possibly simplified) mesh in the model frame, world coordinates.
        size: texture side in texels.
        normal_map: also bake a tangent-space normal map from the SDF's gradient (MikkTSpace frames;
            the texture then carries the tangents for the GLB).
        grid_spacing: finite-difference step for the SDF gradient (default: half a 256³ cell).
        chunk: points per field query.
        padding: texels between charts (``unwrap``).
        unwrap: the UV unwrapper, "fast" (box projection) or "xatlas" (see ``unwrap``).
        timings: if given, seconds per stage are added to it: "unwrap", "rasterize", "color",
            "normal" and "image".
    """
    if unwrap not in UNWRAP_METHODS:
        raise ValueError(f"unknown unwrap method {unwrap!r}; choose one of {UNWRAP_METHODS}")
    device = fields.bbox.device
    size = validate_texture_size(size)
    vertices, faces = np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces, dtype=np.int64)
    owner = None
    with _stage(timings, "unwrap", device):
        if unwrap == "fast":  # its overlap check rasterised the atlas already: reuse that
            vmapping, uv_faces, uv, owner = box_unwrap(vertices, faces, size, padding, device=device, return_owner=True)
        else:
            vmapping, uv_faces, uv = _xatlas_unwrap(vertices, faces, size, padding, 64.0)
    with _stage(timings, "rasterize", device):
        layout = _texel_layout(torch.from_numpy(uv).to(device), torch.from_numpy(uv_faces).to(device), size,
                               owner=owner)
        points = layout.points(torch.from_numpy(vertices).to(device), torch.from_numpy(faces).to(device))
    triplane = triplane.to(device)
    # on a CPU the queries go in cache-sized pieces whatever ``chunk`` allows (2^14 points: measured
    # twice as fast as 2^18 on two cores)
    step = min(chunk, CPU_QUERY_POINTS) if device.type == "cpu" else chunk
    with _stage(timings, "color", device):
        color = PlaneQuery.color(fields, triplane)
        colors = torch.cat([color(p) for p in points.split(step)])
    with _stage(timings, "image", device):
        base_color = layout.image(colors.clamp(0, 1))
    normal = tangents = None
    if normal_map:
        with _stage(timings, "normal", device):
            from .export import to_display_frame
            from .tangents import mikktspace, split_by_corner

            vertex_normals = _unit(np.asarray(mesh.vertex_normals, dtype=np.float64)).astype(np.float32)
            # computed in the exported file's frame, as a viewer computes them: MikkTSpace turns with
            # the mesh except for the default (1, 0, 0) it leaves where a corner has no texture area
            corner_tangents = mikktspace(to_display_frame(vertices.astype(np.float32)[vmapping]),
                                         to_display_frame(vertex_normals[vmapping]), uv, uv_faces)
            corner_tangents[..., :3] = corner_tangents[..., [2, 0, 1]]  # back to the model frame
            # a UV vertex whose corners got different frames (a fan MikkTSpace splits) becomes several
            extra, uv_faces, tangents = split_by_corner(uv_faces, corner_tangents, len(uv))
            vmapping, uv = np.concatenate([vmapping, vmapping[extra]]), np.concatenate([uv, uv[extra]])
            sdf = PlaneQuery.sdf(fields, triplane)
            normals = torch.cat([sdf_normals(fields, triplane, p, grid_spacing, query=sdf)
                                 for p in points.split(max(1, step // 4))])  # four probes per point
            encoded = _tangent_space(normals, layout, uv_faces, vertex_normals[vmapping], tangents)
            normal = layout.image(encoded * 0.5 + 0.5)
    return UVTexture(vmapping, uv_faces, uv, base_color, normal, tangents)


@dataclass
class _TexelLayout:
    """Where each baked texel samples the surface.

    Attributes:
        mask: [S, S] bool, the baked texels (rows bottom-up).
        triangle: [N] int64, the face each of the N masked texels (row-major) samples.
        centre: [N, 2] float64, the UV point it samples: the texel centre, moved onto the triangle for
            the few texels of a sliver (``SLIVER_TEXELS``) that fall outside it.
        nearest: [S·S] int64 (CPU), each texel's nearest covered texel (itself where covered).
        uv, faces: the atlas, [V', 2] and [F, 3] tensors.
    """

    mask: torch.Tensor
    triangle: torch.Tensor
    centre: torch.Tensor
    nearest: np.ndarray
    uv: torch.Tensor
    faces: torch.Tensor

    def weights(self) -> torch.Tensor:
        """[N, 3] float64 barycentric weights of each sample in its triangle's UV (negative outside)."""
        a, b, c = self.uv.double()[self.faces[self.triangle]].unbind(1)
        return _barycentric(self.centre, a, b, c)

    def points(self, vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        """[N, 3] float32: each sample's point on the mesh ([V, 3] vertices, [F, 3] faces in mesh
        indices), extended affinely past the triangle's edges for the ring outside the charts."""
        # each face's affine map from UV to 3D, then one 3x3 gather and product per texel
        corners_uv = self.uv.double()[self.faces]  # [F, 3, 2]
        corners = vertices.double()[faces]  # [F, 3, 3]
        d = corners_uv[:, 1:] - corners_uv[:, :1]  # [F, 2 edges, 2]
        det = d[:, 0, 0] * d[:, 1, 1] - d[:, 0, 1] * d[:, 1, 0]
        det = torch.where(det.abs() > 1e-30, det, torch.full_like(det, 1e-30))
        inverse = torch.stack([torch.stack([d[:, 1, 1], -d[:, 1, 0]], -1),
                               torch.stack([-d[:, 0, 1], d[:, 0, 0]], -1)], 1) / det[:, None, None]  # D⁻¹, D = rows
        jacobian = torch.einsum("fek,fej->fkj", corners[:, 1:] - corners[:, :1], inverse)  # [F, 3, 2]: dP/d(u, v)
        offset = corners[:, 0] - torch.einsum("fkj,fj->fk", jacobian, corners_uv[:, 0])
        affine = torch.cat([jacobian, offset[..., None]], -1).float()  # [F, 3, 3]
        m = affine[self.triangle]  # [N, 3, 3]
        u, v = self.centre[:, 0:1].float(), self.centre[:, 1:2].float()
        points = m[:, :, 0] * u + m[:, :, 1] * v + m[:, :, 2]
        sliver = _slivers(self.uv, self.faces, self.mask.shape[0])[self.triangle]
        if sliver.any():  # their affine maps are ill-conditioned: blend the corners instead
            a, b, c = self.uv.double()[self.faces[self.triangle[sliver]]].unbind(1)
            w = _barycentric(self.centre[sliver], a, b, c)
            points[sliver] = (w[..., None] * corners[self.triangle[sliver]]).sum(1).float()
        return points

    def image(self, values: torch.Tensor) -> np.ndarray:
        """Values [N, 3] in [0, 1] of the masked texels -> a top-down uint8 image [S, S, 3], the gutters filled."""
        size = self.mask.shape[0]
        flat = np.zeros((size * size, 3), np.uint8)
        inside = self.mask.reshape(-1).cpu().numpy()
        flat[inside] = to_uint8(values.float().cpu().numpy())
        # texels outside the mask (beyond the extended ring) copy their nearest covered texel
        flat[~inside] = flat[self.nearest[~inside]]
        return np.ascontiguousarray(flat.reshape(size, size, 3)[::-1])  # rasterised bottom-up; images are top-down


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
    layout = _texel_layout(uv, faces, size, extend)
    return layout.mask, layout.triangle, layout.weights()


def _texel_layout(uv: torch.Tensor, faces: torch.Tensor, size: int, extend: float = EXTENDED_TEXELS,
                  owner: torch.Tensor | None = None) -> _TexelLayout:
    """``texel_samples``, and the gutter's nearest-texel map (one distance transform serves both).

    ``owner``: ``atlas_owner(uv, faces, size)`` if the caller has it already.
    """
    device = uv.device
    faces = faces.to(device=device, dtype=torch.long)
    owner = atlas_owner(uv, faces, size) if owner is None else owner
    covered = (owner >= 0).cpu().numpy()
    if covered.any():
        nearest, distance = _nearest_covered(covered, distances=True)
        ring = torch.as_tensor(~covered & (distance <= extend), device=device).reshape(-1)
        owner = owner.reshape(-1).clone()
        owner[ring] = owner[torch.as_tensor(nearest, device=device)[ring]]
        owner = owner.reshape(size, size)
    else:
        nearest = np.arange(size * size)
    mask = owner >= 0
    texel = mask.reshape(-1).nonzero().squeeze(1)
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
    return _TexelLayout(mask, tri, centre, nearest, uv, faces)


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
        # table[p·H·W + row·W + column] = W_p · planes[p, :, row, column]
        self.table = torch.einsum("pkc,pchw->phwk", per_plane, planes.float()).reshape(3 * h * w, -1).contiguous()
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
        coords = plane_coordinates(self.fields.normalize(points.float()))  # [3, N, 2] (column, row) in [-1, 1]
        x = ((coords[..., 0] + 1) * self.width - 1) / 2  # grid_sample's align_corners=False pixel positions
        y = ((coords[..., 1] + 1) * self.height - 1) / 2
        x0, y0 = x.floor(), y.floor()
        fx, fy = x - x0, y - y0
        offsets = torch.arange(3, device=points.device)[:, None] * (self.height * self.width)
        index, weight = [], []
        for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi <= self.width - 1) & (yi >= 0) & (yi <= self.height - 1)  # zero padding
            index.append((yi.clamp(0, self.height - 1) * self.width + xi.clamp(0, self.width - 1)).long() + offsets)
            weight.append((fx if dx else 1 - fx) * (fy if dy else 1 - fy) * inside)
        index = torch.stack(index, -1).permute(1, 0, 2).reshape(len(points), 12)
        weight = torch.stack(weight, -1).permute(1, 0, 2).reshape(len(points), 12)
        out = torch.nn.functional.embedding_bag(index, self.table, per_sample_weights=weight, mode="sum")
        return out + self.bias if self.bias is not None else out

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        """The head's output at world points [N, 3]: colours [N, 3] (activated) or raw SDF [N, 1]."""
        out = self.rest(self.hidden(points))
        return color_activation(out) if self.activate else out


def sdf_normals(fields: TriplaneFields, triplane: torch.Tensor, points: torch.Tensor,
                spacing: float | None = None, query: PlaneQuery | None = None) -> torch.Tensor:
    """Unit outward normals [N, 3] of the SDF's level sets at world points [N, 3].

    The gradient from four samples at the corners of a tetrahedron around each point (second-order
    accurate like central differences, with four SDF queries instead of six). ``query``: a
    ``PlaneQuery.sdf`` of this triplane, for speed (the sphere prior is added here).
    """
    h = spacing if spacing is not None else 1.0 / 255  # half a cell of a 256³ grid over [-1, 1]
    corners = torch.tensor([[1.0, -1, -1], [-1, -1, 1], [-1, 1, -1], [1, 1, 1]], device=points.device)
    probes = (points[:, None] + corners * h).reshape(-1, 3)
    if query is None:
        sdf = fields.sdf(triplane, probes[None])
    else:
        sdf = query(probes) + fields.sphere_prior(probes)
    return torch.nn.functional.normalize((sdf.reshape(-1, 4, 1) * corners).sum(1), dim=-1)


def _tangent_space(normals: torch.Tensor, layout: _TexelLayout, uv_faces: np.ndarray, vertex_normals: np.ndarray,
                   tangents: np.ndarray) -> torch.Tensor:
    """SDF normals [N, 3] -> tangent-space normals [N, 3] (unit) as a glTF viewer decodes them.

    A viewer interpolates the vertex normal N and tangent T over the triangle, takes the bitangent
    B = w · (N × T), and shows normalize(x T + y B + z N) for the map's (x, y, z) (the MikkTSpace
    convention). The baker inverts exactly that: (x, y, z) = [T B N]⁻¹ n, normalised.
    """
    device = normals.device
    corner = torch.as_tensor(uv_faces, device=device)[layout.triangle]  # [N, 3] UV vertices
    w = layout.weights()[..., None]
    n = (w * torch.as_tensor(vertex_normals, dtype=torch.float64, device=device)[corner]).sum(1)
    tangent = torch.as_tensor(tangents, dtype=torch.float64, device=device)[corner]  # [N, 3, 4]
    t = (w * tangent[..., :3]).sum(1)
    sign = torch.where((w[..., 0] * tangent[..., 3]).sum(1) < 0, -1.0, 1.0).to(torch.float64)
    b = sign[:, None] * torch.cross(n, t, dim=-1)
    det = (t * torch.cross(b, n, dim=-1)).sum(-1, keepdim=True)
    det = torch.where(det.abs() > 1e-12, det, torch.full_like(det, 1e-12))
    target = normals.double()
    # rows of [T B N]⁻¹ are (B × N, N × T, T × B) / det
    local = torch.stack([(torch.cross(b, n, dim=-1) * target).sum(-1), (torch.cross(n, t, dim=-1) * target).sum(-1),
                         (torch.cross(t, b, dim=-1) * target).sum(-1)], -1) / det
    return torch.nn.functional.normalize(local, dim=-1).float()


def _unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    length = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(length > 0, length, 1)


__all__ = ["MAX_TEXTURE_SIZE", "MIN_TEXTURE_SIZE", "UNWRAP_METHODS", "PlaneQuery", "UVTexture", "atlas_owner",
           "bake_texture", "fill_gutters", "rasterize_atlas", "sdf_normals", "srgb_to_linear", "texel_samples",
           "to_uint8", "triangle_atlas", "unwrap", "validate_texture_size", "vertex_colors"]
