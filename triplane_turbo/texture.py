"""Texturing: vertex colours, and UV textures baked from the colour field.

Vertex colours read the colour field once per vertex, which ties colour detail to the triangle count.
A baked texture reads it once per texel instead, so a light mesh keeps the field's detail:

1. ``unwrap``: a UV atlas, by default ``uv.box_unwrap`` (box-projected charts, ~0.1 s for a 60k-face
   isosurface) or xatlas (``method="xatlas"``: conformal charts capped in area, seconds), packed
   into one square with padding between charts;
2. ``texel_samples``: the atlas rasterised in UV space (``coverage.rasterize_coverage``), so every
   covered texel knows its triangle and barycentrics, hence its 3D point on the surface; texels just
   outside a chart extend the nearest triangle, so a bilinear lookup at a chart's edge blends true
   field values;
3. the colour field at those points (``PlaneQuery``: the colour head's first layer folded into the
   planes, one fused gather per point), into a square sRGB image;
4. every texel farther out copies a covered texel near its nearest (no more than 2√2 texels farther;
   a distance transform of 2×2 blocks), so mip-mapped lookups near chart borders do not bleed the
   background in;
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
from dataclasses import dataclass

import numpy as np
import torch
import trimesh

from .config import UNWRAP_METHODS
from .devices import timed
from .texels import TexelLayout, texel_layout, to_uint8
from .triplane import PlaneQuery, TriplaneFields
from .uv import box_unwrap, triangle_atlas  # noqa: F401 - triangle_atlas: importable here as before

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


#: xatlas' cap on a chart's area, as a fraction 1/CHARTS_PER_AREA of the mesh's (5-15x faster than its
#: defaults on marching-cubes meshes, at the cost of more seams).
CHARTS_PER_AREA = 64.0


def unwrap(vertices: np.ndarray, faces: np.ndarray, size: int = 1024, padding: int = 4,
           charts_per_area: float = CHARTS_PER_AREA, method: str = "fast") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
    return _atlas(vertices, faces, size, padding, charts_per_area, method)[:3]


def _atlas(vertices, faces, size, padding, charts_per_area, method, device="cpu"):
    """``unwrap``'s atlas and, for the fast unwrap, the rasterisation of it that its overlap check
    made (``texels.atlas_owner``; None for xatlas), which the bake reuses."""
    if method not in UNWRAP_METHODS:
        raise ValueError(f"unknown unwrap method {method!r}; choose one of {UNWRAP_METHODS}")
    if method == "fast":
        return box_unwrap(vertices, faces, size, padding, device=device, return_owner=True)
    return (*_xatlas_unwrap(vertices, faces, size, padding, charts_per_area), None)


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


#: Points per field query on a CPU during a bake (see ``bake_texture``).
CPU_QUERY_POINTS = 2**14
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
    device = fields.bbox.device
    size = validate_texture_size(size)
    vertices, faces = np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces, dtype=np.int64)
    with timed(timings, device, "unwrap"):
        vmapping, uv_faces, uv, owner = _atlas(vertices, faces, size, padding, CHARTS_PER_AREA, unwrap, device)
    with timed(timings, device, "rasterize"):
        layout = texel_layout(torch.from_numpy(uv).to(device), torch.from_numpy(uv_faces).to(device), size,
                               owner=owner)
        points = layout.points(torch.from_numpy(vertices).to(device), torch.from_numpy(faces).to(device))
    triplane = triplane.to(device)
    # on a CPU the queries go in cache-sized pieces whatever ``chunk`` allows (2^14 points: measured
    # twice as fast as 2^18 on two cores)
    step = min(chunk, CPU_QUERY_POINTS) if device.type == "cpu" else chunk
    with timed(timings, device, "color"):
        color = PlaneQuery.color(fields, triplane)
        colors = torch.cat([color(p) for p in points.split(step)])
    with timed(timings, device, "image"):
        base_color = layout.image(colors.clamp(0, 1))
    normal = tangents = None
    if normal_map:
        with timed(timings, device, "normal"):
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


def _tangent_space(normals: torch.Tensor, layout: TexelLayout, uv_faces: np.ndarray, vertex_normals: np.ndarray,
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


__all__ = ["MAX_TEXTURE_SIZE", "MIN_TEXTURE_SIZE", "UNWRAP_METHODS", "PlaneQuery", "UVTexture",
           "bake_texture", "sdf_normals", "srgb_to_linear",
           "to_uint8", "triangle_atlas", "unwrap", "validate_texture_size", "vertex_colors"]
