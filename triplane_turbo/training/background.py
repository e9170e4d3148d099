"""The learned background of PRD training: a text-conditioned environment map over ray directions.

As the authors' background module (``multi_prompt_neural_environment_hashgrid_map_background.py``
with ``hypernetwork.py``): a ray direction d (unit) is mapped to (d + 1) / 2 in [0, 1]³ and encoded
by a multi-resolution hash grid (8 levels × 2 features, 2^19 entries per level, base resolution 4,
level scale 1.8114 so that the finest level is 256); a small hypernetwork turns the prompt's pooled
text embedding (SD 2.1's CLIP pooled output, 1024-d) into the weights W [16, 3] of a bias-free
linear read-out, and the colour is ``sigmoid(enc(d) · W) · 1.002 − 0.001`` (their "sigmoid-mipnerf").
The hypernetwork is Linear(1024 → 64, no bias) → LayerNorm → SiLU → Linear(64 → 48), Xavier-normal
weights and zero biases. At evaluation (``.eval()``) the background is plain white.

Torch only (tiny-cuda-nn, which the authors use, is not on PyPI): the hash grid follows its scheme
(per-level resolution ⌈base·scale^l⌉ + 1 with a half-cell offset, a dense table where the level
fits, else the spatial hash with primes (1, 2654435761, 805459861), trilinear interpolation, entries
initialised in U(−1e-4, 1e-4)); values are not bit-identical to tiny-cuda-nn's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..triplane import color_activation
from .config import BackgroundConfig

#: tiny-cuda-nn's spatial-hash primes (the first dimension is not scrambled).
HASH_PRIMES = (1, 2654435761, 805459861)


class HashGridEncoding(nn.Module):
    """Multi-resolution hash encoding of points in [0, 1]³ -> [..., levels × features]."""

    def __init__(self, levels: int = 8, features: int = 2, log2_table: int = 19, base_resolution: int = 4,
                 level_scale: float = 1.8114473285278132):
        super().__init__()
        self.levels, self.features = levels, features
        scales, sizes, offsets, dense = [], [], [0], []
        for level in range(levels):
            scale = base_resolution * level_scale ** level - 1.0
            resolution = math.ceil(scale) + 1
            fits = resolution ** 3 <= 2 ** log2_table
            size = resolution ** 3 if fits else 2 ** log2_table
            size = (size + 7) // 8 * 8  # tiny-cuda-nn rounds each level's table up to 8 entries
            scales.append(scale)
            sizes.append(resolution)
            dense.append(fits)
            offsets.append(offsets[-1] + size)
        self.scales, self.resolutions, self.dense, self.offsets = scales, sizes, dense, offsets
        self.table = nn.Parameter(torch.empty(offsets[-1], features).uniform_(-1e-4, 1e-4))

    @property
    def out_dim(self) -> int:
        return self.levels * self.features

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """Points [..., 3] in [0, 1] -> features [..., levels · features] (float32)."""
        x = points.reshape(-1, 3).float()
        out = []
        corners = torch.tensor([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], device=x.device)  # [8, 3]
        for level in range(self.levels):
            position = x * self.scales[level] + 0.5  # tiny-cuda-nn's half-cell offset
            cell = position.floor()
            frac = position - cell  # [P, 3]
            vertex = cell.long()[:, None, :] + corners  # [P, 8, 3]
            weight = torch.where(corners.bool(), frac[:, None, :], 1 - frac[:, None, :]).prod(-1)  # [P, 8]
            resolution, size = self.resolutions[level], self.offsets[level + 1] - self.offsets[level]
            if self.dense[level]:
                v = vertex.clamp(0, resolution - 1)
                index = v[..., 0] + resolution * (v[..., 1] + resolution * v[..., 2])
            else:
                index = torch.zeros_like(vertex[..., 0])
                for dim, prime in enumerate(HASH_PRIMES):
                    index = index ^ (vertex[..., dim] * prime)
                index = index % size
            values = self.table[self.offsets[level] + index]  # [P, 8, F]
            out.append((weight[..., None] * values).sum(1))
        return torch.cat(out, -1).reshape(*points.shape[:-1], self.out_dim)


class LearnedBackground(nn.Module):
    """The authors' text-conditioned environment map; see the module docstring.

    Args:
        text_dim: size of the pooled text embedding (1024 for SD 2.1).
        config: encoding and hypernetwork sizes, the evaluation colour.
    """

    def __init__(self, text_dim: int, config: BackgroundConfig = BackgroundConfig()):
        super().__init__()
        self.config = config
        self.encoding = HashGridEncoding(config.levels, config.features_per_level, config.log2_table,
                                         config.base_resolution, config.level_scale)
        hidden = config.hidden
        self.hypernet = nn.Sequential(nn.Linear(text_dim, hidden, bias=False), nn.LayerNorm(hidden), nn.SiLU(),
                                      nn.Linear(hidden, self.encoding.out_dim * 3))
        for layer in (self.hypernet[0], self.hypernet[3]):
            nn.init.xavier_normal_(layer.weight)
        nn.init.zeros_(self.hypernet[3].bias)

    def forward(self, directions: torch.Tensor, text_embedding: torch.Tensor) -> torch.Tensor:
        """Colours [B, R, 3] of unit directions [B, R, 3] for B prompts' pooled embeddings [B, D]
        (white, ``config.eval_color``, in evaluation mode)."""
        if not self.training:
            return directions.new_tensor(self.config.eval_color).expand(*directions.shape[:-1], 3)
        b = directions.shape[0]
        weights = self.hypernet(text_embedding.float()).reshape(b, self.encoding.out_dim, 3)
        features = self.encoding((F.normalize(directions, dim=-1) + 1) / 2).reshape(b, -1, self.encoding.out_dim)
        return color_activation(torch.bmm(features, weights)).reshape(*directions.shape[:-1], 3)

    def bind(self, text_embedding: torch.Tensor):
        """The background of B prompts as a function of directions [B, R, 3] -> colours [B, R, 3]
        (what the renderers take)."""
        return lambda directions: self(directions, text_embedding)


def constant_background(color: tuple[float, float, float]):
    """A plain background: directions [B, R, 3] -> ``color`` everywhere."""
    return lambda directions: directions.new_tensor(color).expand(*directions.shape[:-1], 3)


__all__ = ["HashGridEncoding", "LearnedBackground", "constant_background"]
