"""Marching cubes with the semantics of the authors' DiffMC, on the CPU, plus mesh clean-up.

The reference extracts the surface with DiffMC (a CUDA library). This module reproduces its output
with PyMCubes and numpy:

* the SDF grid is padded by one cell with ``isovalue + 1`` (outside), so surfaces that touch the
  grid border are closed; the deformation grid is padded with zeros;
* each vertex lies on a grid edge ``a -> b`` at ``t = (iso - s_a) / (s_b - s_a)`` and is moved by
  the deformation interpolated along that edge: ``(a + d_a) + t * ((b + d_b) - (a + d_a))``;
* grid index space ``[0, R - 1]`` maps linearly onto the bounding box.

Convention: ``sdf[i, j, k]`` is the value at ``(axis[i], axis[j], axis[k])``, negative inside.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import mcubes
import numpy as np
import torch
import trimesh

#: The box the grid spans when none is given: ``[-1, 1]^3``.
DEFAULT_BBOX = ((-1.0, -1.0, -1.0), (1.0, 1.0, 1.0))


class EmptySurfaceWarning(UserWarning):
    """The SDF has no zero crossing, so no surface could be extracted."""


def _to_numpy(array: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """Returns a float32 numpy copy of a numpy array or a torch tensor on any device."""
    if isinstance(array, torch.Tensor):
        return array.detach().to(device="cpu", dtype=torch.float32).numpy()
    if isinstance(array, np.ndarray):
        return array.astype(np.float32)
    raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(array).__name__}")


def _validate_bbox(bbox: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Returns the box as a float64 [2, 3] array (row 0 the minimum, row 1 the maximum)."""
    box = np.asarray(bbox, dtype=np.float64)
    if box.shape != (2, 3):
        raise ValueError(f"bbox must have shape [2, 3] (min row, max row), got {list(box.shape)}")
    if not np.all(np.isfinite(box)) or not np.all(box[1] > box[0]):
        raise ValueError(f"bbox must be finite with max > min on every axis, got {box.tolist()}")
    return box


def _trilinear(field: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Trilinearly interpolates a vector field at points in index coordinates.

    Args:
        field: [X, Y, Z, C] values at integer grid positions.
        points: [N, 3] positions in index units, inside ``[0, X-1] x [0, Y-1] x [0, Z-1]``.

    Returns:
        [N, C] float64 interpolated values.
    """
    upper = np.array(field.shape[:3]) - 2
    # Clamp the lower corner to size - 2 so a point exactly on the last grid plane uses the cell
    # below it with weight 1 on its upper corner, instead of indexing past the end.
    lower = np.clip(np.floor(points).astype(np.int64), 0, upper)
    frac = points - lower
    out = np.zeros((len(points), field.shape[3]), dtype=np.float64)
    for corner in np.ndindex(2, 2, 2):
        offset = np.array(corner)
        weight = np.prod(np.where(offset == 1, frac, 1.0 - frac), axis=1)
        idx = lower + offset
        out += weight[:, None] * field[idx[:, 0], idx[:, 1], idx[:, 2]]
    return out


def marching_cubes(
    sdf: np.ndarray | torch.Tensor,
    deformation: np.ndarray | torch.Tensor | None = None,
    bbox: Sequence[Sequence[float]] | np.ndarray = DEFAULT_BBOX,
    isovalue: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Extracts the ``isovalue`` level set of a grid SDF, as DiffMC does.

    Args:
        sdf: [R, R, R] signed distances, negative inside; ``sdf[i, j, k]`` is the grid point
            ``(axis[i], axis[j], axis[k])`` with ``axis[i] = 2 * i / (R - 1) - 1`` before the
            mapping onto ``bbox``.
        deformation: optional [R, R, R, 3] offsets of the grid points, in grid-cell units.
        bbox: [2, 3] world box (min row, max row) spanned by grid index space ``[0, R - 1]``.
        isovalue: the level to extract.

    Returns:
        vertices: [V, 3] float32 world coordinates. Vertices of the caps that the padding adds
            where the surface meets the border lie up to one cell outside the box (grid index in
            (-1, 0) or (R - 1, R); never exactly -1 or R, as the pad value is iso + 1, not iso).
        faces: [F, 3] int64, wound so that normals point outward (toward increasing SDF).
        Both are empty (shape [0, 3]) with an ``EmptySurfaceWarning`` when the SDF has no zero
        crossing.
    """
    grid = _to_numpy(sdf, "sdf")
    if grid.ndim != 3 or len(set(grid.shape)) != 1 or grid.shape[0] < 2:
        raise ValueError(f"sdf must be a cubic grid [R, R, R] with R >= 2, got {list(grid.shape)}")
    if not np.all(np.isfinite(grid)):
        raise ValueError("sdf contains NaN or infinite values")
    res = grid.shape[0]
    offsets = None
    if deformation is not None:
        offsets = _to_numpy(deformation, "deformation")
        if offsets.shape != (res, res, res, 3):
            raise ValueError(
                f"deformation must have shape [{res}, {res}, {res}, 3] to match the sdf, "
                f"got {list(offsets.shape)}"
            )
        if not np.all(np.isfinite(offsets)):
            raise ValueError("deformation contains NaN or infinite values")
    box = _validate_bbox(bbox)

    # DiffMC's reference swaps a grid without a sign change for a sphere; we report it instead.
    # (With the outside padding an all-inside grid would yield the box's faces, which is not a
    # surface the model produced.)
    if not (np.any(grid < isovalue) and np.any(grid > isovalue)):
        warnings.warn(
            "the SDF has no zero crossing: the model produced no surface; "
            "try another seed/prompt",
            EmptySurfaceWarning,
            stacklevel=2,
        )
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64)

    padded = np.pad(grid.astype(np.float64), 1, mode="constant", constant_values=isovalue + 1.0)
    # PyMCubes returns undeformed vertices a + t (b - a) in padded index units.
    verts, faces = mcubes.marching_cubes(padded, float(isovalue))
    verts = np.asarray(verts, dtype=np.float64)
    # With negative inside, PyMCubes winds triangles inward; reverse them to face outward.
    faces = np.asarray(faces, dtype=np.int64)[:, ::-1].copy()

    if offsets is not None and len(verts):
        padded_offsets = np.pad(offsets.astype(np.float64), ((1, 1), (1, 1), (1, 1), (0, 0)))
        # A vertex sits on a grid edge (two integer coordinates), so trilinear interpolation at
        # it reduces to DiffMC's linear interpolation of the two endpoint offsets along the edge.
        verts = verts + _trilinear(padded_offsets, verts)

    unit = (verts - 1.0) / (res - 1)  # undo the padding shift, then grid index -> [0, 1]
    world = box[0] + unit * (box[1] - box[0])
    return world.astype(np.float32), faces


def remove_floaters(mesh: trimesh.Trimesh, min_fraction: float = 0.05) -> trimesh.Trimesh:
    """Drops connected components much smaller than the largest one.

    Args:
        mesh: the mesh ([V, 3] vertices, [F, 3] faces); not modified.
        min_fraction: components with fewer than ``min_fraction * largest`` faces are removed;
            the largest component is always kept.

    Returns:
        A new mesh with the kept faces and only the vertices they use (order preserved), or the
        input mesh itself when nothing is removed (or it has no faces).
    """
    if len(mesh.faces) == 0:
        return mesh
    # Components of the face-adjacency graph (faces sharing an edge); isolated faces are their
    # own component thanks to node_count.
    labels = trimesh.graph.connected_component_labels(
        mesh.face_adjacency, node_count=len(mesh.faces)
    )
    sizes = np.bincount(labels)
    keep_labels = sizes >= min_fraction * sizes.max()
    keep_labels[np.argmax(sizes)] = True
    keep = keep_labels[labels]
    if keep.all():
        return mesh
    cleaned = trimesh.Trimesh(
        vertices=mesh.vertices.copy(), faces=mesh.faces[keep], process=False
    )
    cleaned.remove_unreferenced_vertices()
    return cleaned


def simplify(mesh: trimesh.Trimesh, target_faces: int) -> trimesh.Trimesh:
    """Quadric decimation (fast_simplification) to about ``target_faces`` faces.

    Args:
        mesh: the mesh ([V, 3] vertices, [F, 3] outward faces); not modified.
        target_faces: the wanted face count, >= 4.

    Returns:
        A new, decimated mesh with the same face orientation, or the input mesh itself when it
        already has at most ``target_faces`` faces (or none).
    """
    if target_faces < 4:
        raise ValueError(f"target_faces must be at least 4, got {target_faces}")
    if len(mesh.faces) <= target_faces:
        return mesh
    return mesh.simplify_quadric_decimation(face_count=int(target_faces))
