"""The frames meshes are written in. The model frame is the triplane's (the authors' axes); the
display frame is what every exported file uses: +Y up, the object's front toward a viewer looking
down −Z (glTF's convention). Texturing and export both need it, so it lives apart from either.
"""

from __future__ import annotations

import numpy as np


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
