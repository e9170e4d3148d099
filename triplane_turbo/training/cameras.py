"""Cameras for training renders: sampled around the object in the fields' frame (z up, box [-1, 1]³).

OpenGL conventions: a camera looks down its own -z axis, with +y up in the image. Images here are
top-down (row 0 at the top), for both renderers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import CameraConfig


@dataclass
class Cameras:
    """N cameras, ``views_per_prompt`` consecutive ones per prompt.

    Attributes:
        c2w: [N, 4, 4] camera-to-world (columns: right, up, back, position).
        fovy: vertical field of view in radians (all cameras).
        distance: [N] distance to the origin.
        views_per_prompt: V; camera n belongs to prompt n // V.
    """

    c2w: torch.Tensor
    fovy: float
    distance: torch.Tensor
    views_per_prompt: int

    def __len__(self) -> int:
        return self.c2w.shape[0]

    @property
    def prompt_index(self) -> torch.Tensor:
        return torch.arange(len(self), device=self.c2w.device) // self.views_per_prompt

    def rays(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ray origins and unit directions through pixel centres, each [N, size, size, 3], row 0 at the top."""
        focal = 0.5 * size / math.tan(self.fovy / 2)
        centre = torch.arange(size, dtype=torch.float32, device=self.c2w.device) + 0.5 - size / 2
        y, x = torch.meshgrid(-centre / focal, centre / focal, indexing="ij")
        camera = torch.stack([x, y, -torch.ones_like(x)], -1)  # [S, S, 3] in camera space
        directions = F.normalize(torch.einsum("nij,hwj->nhwi", self.c2w[:, :3, :3], camera), dim=-1)
        origins = self.c2w[:, None, None, :3, 3].expand_as(directions)
        return origins, directions

    def projection(self, near: float = 0.1, far: float = 1000.0) -> torch.Tensor:
        """World -> clip matrices [N, 4, 4] (OpenGL, square images)."""
        f = 1.0 / math.tan(self.fovy / 2)
        proj = torch.tensor([[f, 0, 0, 0], [0, f, 0, 0], [0, 0, -(far + near) / (far - near), -2 * far * near / (far - near)],
                             [0, 0, -1, 0]], dtype=torch.float32, device=self.c2w.device)
        return proj @ torch.linalg.inv(self.c2w)


def look_at_origin(position: torch.Tensor) -> torch.Tensor:
    """Camera-to-world matrices [N, 4, 4] for cameras at ``position`` [N, 3] looking at the origin, up +z."""
    back = F.normalize(position, dim=-1)
    up = torch.tensor([0.0, 0.0, 1.0], device=position.device).expand_as(position)
    right = F.normalize(torch.linalg.cross(up, back, dim=-1), dim=-1)
    true_up = torch.linalg.cross(back, right, dim=-1)
    c2w = torch.eye(4, device=position.device).repeat(len(position), 1, 1)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, true_up, back, position
    return c2w


def sample_cameras(num_prompts: int, config: CameraConfig = CameraConfig(), generator: torch.Generator | None = None,
                   device: str | torch.device = "cpu") -> Cameras:
    """``config.views`` cameras per prompt: one elevation and distance per prompt, azimuths evenly
    spaced from a random start (so the views of a prompt see it from all sides)."""
    views = config.views
    uniform = lambda *shape: torch.rand(shape, generator=generator)  # noqa: E731 - on the CPU: reproducible
    low, high = config.elevation_degrees
    elevation = torch.deg2rad(low + (high - low) * uniform(num_prompts)).repeat_interleave(views)
    start = uniform(num_prompts)
    azimuth = torch.deg2rad(((start[:, None] + torch.arange(views)) / views * 360.0 - 180.0).reshape(-1))
    fovy = math.radians(config.fovy_degrees)
    low, high = config.relative_distance
    distance = ((low + (high - low) * uniform(num_prompts)) / math.tan(fovy / 2)).repeat_interleave(views)
    position = distance[:, None] * torch.stack([torch.cos(elevation) * torch.cos(azimuth),
                                                torch.cos(elevation) * torch.sin(azimuth), torch.sin(elevation)], -1)
    return Cameras(look_at_origin(position.float()).to(device), fovy, distance.to(device), views)
