"""Triplane -> meshes -> textures: the model's heads turned into coloured, optionally textured meshes.

Needs only the heads (``TriplaneFields``) and a triplane, not Stable Diffusion: a researcher with
triplanes from elsewhere, the training code and the benchmarks use it alone. The pipeline holds one
and calls it after decoding.

    mesher = TriplaneMesher(fields)
    meshes = mesher.extract_meshes(triplane, 160)          # vertex-coloured trimesh.Trimesh, model frame
    textures = mesher.bake_textures(triplane, meshes)       # one UVTexture per mesh
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import trimesh

from .config import GenerationConfig
from .devices import timed
from .inputs import validate_floater_fraction, validate_resolution, validate_target_faces, validate_unwrap
from .isosurface import extract_surface, grid_to_world, remove_floaters, simplify
from .texturing.bake import UVTexture, bake_texture, validate_texture_size, vertex_colors
from .triplane import TriplaneFields

#: Progress callback: ``callback(stage, step, total)`` when a stage, or one object's part of it, ends.
ProgressCallback = Callable[[str, int, int], None]


class TriplaneMesher:
    """Meshes and textures from triplanes, on the device of ``fields``.

    Args:
        fields: the model's heads (SDF, deformation, colour) and box.
        config: ``mesh_resolution``, ``field_chunk`` and ``texture_size`` defaults.
    """

    def __init__(self, fields: TriplaneFields, config: GenerationConfig = GenerationConfig()):
        self.fields = fields
        self.config = config

    @property
    def device(self) -> torch.device:
        return self.fields.bbox.device

    def field_chunk(self) -> int:
        """Grid points evaluated at once: ``config.field_chunk``, else per device (cache-sized pieces
        on the CPU, where the field MLPs are memory-bound; few, large ones on a GPU)."""
        if self.config.field_chunk is not None:
            return self.config.field_chunk
        return 2**21 if self.device.type == "cuda" else 2**16

    @torch.inference_mode()
    def extract_meshes(self, triplane: torch.Tensor, resolution: int | None = None, *,
                       remove_floaters_below: float | None = None, target_faces: int | None = None,
                       callback: ProgressCallback | None = None, timings: dict | None = None) -> list[trimesh.Trimesh]:
        """Triplane [B, 6, C, H, W] -> one vertex-coloured mesh per object (model frame).

        The SDF is evaluated on the R³ grid and meshed by marching cubes on the fields' device; the
        deformation is evaluated only at the grid points at the ends of the crossed edges (the only
        ones marching cubes reads), then optional clean-up, and colours queried at the final
        vertices. An object whose SDF has no zero crossing gives an empty mesh and an
        ``EmptySurfaceWarning``.

        Args:
            resolution: grid points per axis, 32–512 (default ``config.mesh_resolution``).
            remove_floaters_below: drop connected parts smaller than this fraction of the largest.
            target_faces: simplify each mesh to about this many faces.
        """
        resolution = validate_resolution(self.config.mesh_resolution if resolution is None else resolution)
        remove_floaters_below = validate_floater_fraction(remove_floaters_below)
        target_faces = validate_target_faces(target_faces)
        timings = {} if timings is None else timings
        triplane = triplane.to(self.device)
        with timed(timings, self.device, "fields"):
            sdf = self.fields.grid_sdf(triplane, resolution, self.field_chunk())
        if callback:
            callback("fields", 1, 1)
        meshes = []
        count = triplane.shape[0]
        for b in range(count):
            with timed(timings, self.device, "isosurface"):
                vertices, faces = self.mesh_surface(triplane[b:b + 1], sdf[b])
                mesh = trimesh.Trimesh(vertices, faces, process=False)
                if len(mesh.faces) and remove_floaters_below:
                    mesh = remove_floaters(mesh, remove_floaters_below)
                if len(mesh.faces) and target_faces:
                    mesh = simplify(mesh, target_faces)
            if callback:
                callback("isosurface", b + 1, count)
            with timed(timings, self.device, "color"):
                if len(mesh.vertices):
                    mesh.visual.vertex_colors = vertex_colors(self.fields, triplane[b:b + 1], mesh.vertices)
            if callback:
                callback("color", b + 1, count)
            meshes.append(mesh)
        return meshes

    @torch.inference_mode()
    def mesh_surface(self, triplane: torch.Tensor, sdf: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """One object's grid SDF [R, R, R] -> deformed vertices [V, 3] float32 (world) and faces [F, 3].

        Marching cubes runs where ``sdf`` is; the deformation head is evaluated at the grid points
        the vertices' edges end at (a few percent of the grid), which gives exactly the vertices of
        meshing the dense deformation grid.

        Args:
            triplane: [1, 6, C, H, W], the object's planes.
            sdf: [R, R, R] its grid SDF (``TriplaneFields.grid_sdf``).
        """
        surface = extract_surface(sdf)
        if not len(surface):
            return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64)
        points = self.fields.grid_axis(surface.resolution)[surface.corners.to(self.device)]  # [K, 3]
        offsets = torch.cat([self.fields.deformation(triplane, chunk[None])[0]
                             for chunk in points.split(self.field_chunk())])
        vertices = grid_to_world(surface.vertices(offsets.to(surface.t.device)), surface.resolution, self.fields.bbox)
        return vertices, surface.faces.cpu().numpy()

    @torch.inference_mode()
    def bake_textures(self, triplane: torch.Tensor, meshes: list[trimesh.Trimesh], texture_size: int | None = None,
                      normal_map: bool = False, *, unwrap: str | None = None, callback: ProgressCallback | None = None,
                      timings: dict | None = None) -> list[UVTexture | None]:
        """One baked ``UVTexture`` per mesh (None for an empty mesh): UV atlas, colour field per texel.

        Args:
            triplane: [B, 6, C, H, W]; meshes: the B meshes of ``extract_meshes`` (model frame).
            texture_size: texture side, 64–4096 (default ``config.texture_size``, 1024).
            normal_map: also bake a tangent-space normal map from the SDF's gradient.
            unwrap: "fast" or "xatlas" (default ``config.unwrap``).
        """
        size = validate_texture_size(self.config.texture_size if texture_size is None else texture_size)
        unwrap = validate_unwrap(self.config.unwrap if unwrap is None else unwrap)
        timings = {} if timings is None else timings
        textures: list[UVTexture | None] = []
        for b, mesh in enumerate(meshes):
            with timed(timings, self.device, "texture"):
                textures.append(bake_texture(self.fields, triplane[b:b + 1].to(self.device), mesh, size,
                                             normal_map=normal_map, chunk=self.field_chunk(), unwrap=unwrap)
                                if len(mesh.faces) else None)
            if callback:
                callback("texture", b + 1, len(meshes))
        return textures


__all__ = ["ProgressCallback", "TriplaneMesher"]
