"""Texturing: the colour field evaluated at mesh vertices, as 8-bit RGBA vertex colours."""

from __future__ import annotations

import numpy as np
import torch

from .triplane import TriplaneFields


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
    rgba = np.concatenate([np.round(rgb * 255), np.full((len(rgb), 1), 255)], axis=1)
    return rgba.astype(np.uint8)
