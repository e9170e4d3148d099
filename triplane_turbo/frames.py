"""The frames exported meshes are written in, and where their origin sits.

Meshes come out of ``isosurface.marching_cubes`` in the MODEL frame (about 1 unit across, centred on
the generation volume). Files take one of two frames:

* the DISPLAY frame (GLB, OBJ, PLY, USDZ): ``to_display_frame``, the demo's reorientation
  ``(x, y, z) -> (y, z, x)``: +Y is up and the object's front faces +Z, towards a glTF viewer's
  default camera (which looks down -Z). Units are metres where the format has units (glTF, USD).
  ``place`` then moves the origin (``origin``) and scales (``scale``, metres per model unit).
* the PRINT frame (STL, 3MF): ``to_print_frame``, the display frame turned so that display +Y is
  +Z (up for slicers) and display +Z, the front, is -Y (towards a slicer's front view); then scaled
  to millimetres so the largest side of the bounding box is ``print_size``, centred in x and y and
  resting on z = 0. As a matrix, ``print = s · R · display + t`` with ``R`` mapping
  ``(x, y, z) -> (x, -z, y)`` (Blender's glTF import turns files the same way).

Both maps are proper rotations (determinant +1) times positive scales, so triangle winding, and with
it outward normals, is kept.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

#: ``origin`` values of ``Placement``: None keeps the model's own origin (the centre of the
#: generation volume, as every file before these options); "center": the bounding box's centre;
#: "bottom": the centre of the base (lowest point along the up axis, centred in the other two).
ORIGINS = ("center", "bottom")
#: The print formats' default largest side, in millimetres.
DEFAULT_PRINT_SIZE = 100.0
#: Bounds of ``Placement.print_size`` (mm) and ``Placement.scale`` (metres per unit).
PRINT_SIZE_RANGE = (1.0, 10000.0)
SCALE_RANGE = (1e-6, 1e6)


def to_display_frame(vertices: np.ndarray) -> np.ndarray:
    """Maps model-frame points to the display frame: ``(x, y, z) -> (y, z, x)``.

    Args:
        vertices: [V, 3] model-frame coordinates.

    Returns:
        [V, 3] display-frame coordinates (new_x = old_y, new_y = old_z, new_z = old_x).
    """
    vertices = np.asarray(vertices)
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"vertices must have shape [V, 3], got {list(vertices.shape)}")
    return vertices[:, [1, 2, 0]]


#: The rotation from the display frame (+Y up, front +Z) to the print frame (+Z up, front -Y).
DISPLAY_TO_PRINT = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])


@dataclass(frozen=True)
class Placement:
    """Where an exported mesh sits and how large it is (checked on construction).

    Attributes:
        origin: for the display formats (GLB, OBJ, PLY, USDZ): None keeps the model's origin (the
            centre of the generation volume); "center" puts the bounding box's centre there;
            "bottom" the centre of its base (lowest y, centred in x and z), the pivot game engines expect.
        scale: display formats: metres (GLB, USDZ; plain units in OBJ, PLY) per model unit; 1 keeps
            the model's size, about 1 across.
        print_size: print formats (STL, 3MF): the largest side of the bounding box in millimetres.
    """

    origin: str | None = None
    scale: float = 1.0
    print_size: float = DEFAULT_PRINT_SIZE

    def __post_init__(self):
        if self.origin is not None and self.origin not in ORIGINS:
            raise ValueError(f"origin must be one of {', '.join(ORIGINS)} (or None), got {self.origin!r}")
        validate_scale(self.scale)
        validate_print_size(self.print_size)


def _check_range(name: str, value: float, bounds: tuple[float, float]) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or not bounds[0] <= value <= bounds[1]:
        raise ValueError(f"{name} must be a number from {bounds[0]:g} to {bounds[1]:g}, got {value!r}")
    return value


def validate_scale(value: float) -> float:
    """``value`` if it is a usable ``Placement.scale`` (metres per model unit), else ValueError."""
    return _check_range("scale", value, SCALE_RANGE)


def validate_print_size(value: float) -> float:
    """``value`` if it is a usable ``Placement.print_size`` (millimetres), else ValueError."""
    return _check_range("print size", value, PRINT_SIZE_RANGE)


def place(vertices: np.ndarray, placement: Placement, up: int = 1) -> np.ndarray:
    """Display-frame points moved to ``placement.origin`` and scaled by ``placement.scale``.

    Args:
        vertices: [V, 3] display-frame points.
        placement: where the origin goes and the scale.
        up: the index of the up axis (1: the display frame's +Y).

    Returns:
        [V, 3] float64 points: ``(vertices - pivot) * scale``, where the pivot is 0 (origin None),
        the bounding box's centre, or its centre with the up coordinate at the minimum ("bottom").
    """
    vertices = np.asarray(vertices, dtype=np.float64)
    pivot = np.zeros(3)
    if placement.origin is not None:
        low, high = vertices.min(0), vertices.max(0)
        pivot = (low + high) / 2
        if placement.origin == "bottom":
            pivot[up] = low[up]
    if placement.scale == 1.0 and not pivot.any():
        return vertices  # today's files, bit for bit
    return (vertices - pivot) * placement.scale


def to_print_frame(vertices: np.ndarray, print_size: float = DEFAULT_PRINT_SIZE) -> np.ndarray:
    """Display-frame points -> the print frame: +Z up, millimetres, the largest side of the bounding
    box ``print_size``, centred in x and y, resting on z = 0.

    Args:
        vertices: [V, 3] display-frame points (any size, any position).
        print_size: the largest extent after scaling, in millimetres.

    Returns:
        [V, 3] float64 points ``s · R · (vertices - c) + t`` (``R``: ``DISPLAY_TO_PRINT``; ``c``:
        the bounding box's centre; ``s = print_size / largest extent``; ``t = (0, 0, s·height/2)``).
        The lowest vertex has z exactly 0.
    """
    vertices = np.asarray(vertices, dtype=np.float64)
    low, high = vertices.min(0), vertices.max(0)
    extent = float((high - low).max())
    if extent <= 0:
        raise ValueError("cannot scale a mesh with no extent for printing")
    turned = (vertices - (low + high) / 2) @ DISPLAY_TO_PRINT.T * (print_size / extent)
    turned[:, 2] -= turned[:, 2].min()  # exact: the lowest point's z minus itself
    return turned


__all__ = ["DEFAULT_PRINT_SIZE", "DISPLAY_TO_PRINT", "ORIGINS", "PRINT_SIZE_RANGE", "Placement", "SCALE_RANGE",
           "place", "to_display_frame", "to_print_frame", "validate_print_size", "validate_scale"]
