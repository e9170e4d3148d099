"""MVDream's multi-view UNet, in the original (ldm) key layout, and the camera conditioning it takes.

The network is Stable Diffusion's UNet (ResBlocks and spatial transformers at three of four
resolutions, sinusoidal timestep embedding) with two changes:

* **3D self-attention**: in every transformer block, the self-attention of a frame attends to the
  tokens of all ``num_frames`` frames of its group (the views of one prompt), so that the views agree;
  the cross-attention to the text and the feed-forward stay per frame.
* **camera embedding**: the camera matrix of each frame, flattened to 16 numbers, goes through a
  small MLP (16 → 4C → 4C) whose output is added to the timestep embedding.

The published checkpoints store it in the ldm layout (``model.diffusion_model.input_blocks.1.1.
transformer_blocks.0.attn1.to_q.weight``, ``…camera_embed.0.weight``). This module implements that
layout directly, module for module, so that the published state dict loads with ``strict=True`` and
no key table: MVDream's ``sd-v2.1-base-4view.pt`` (config ``MVDREAM_SD21``, from MVDream's
``sd-v2-base.yaml``) and RichDreamer's normal-depth ``nd_mv_ema.ckpt`` (``RICHDREAMER_ND``, from its
``txtcond_mvsd-4-objaverse_finetune_wovae.yaml``: 8 heads, 1×1-convolution projections in the
transformers, a 768-wide CLIP-L context). ``ldm_checkpoint.unet_layout`` derives the expected key list
and shapes from a config without building the network; tests compare the two, and compare the layout
with diffusers' own ldm-to-diffusers converter.

Written from the published architecture (MVDream, RichDreamer), not copied from either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MultiViewUNetConfig:
    """The architecture of a multi-view UNet, in the terms of the ldm configs.

    Attributes:
        in_channels, out_channels: latent (or pixel) channels in and out.
        model_channels: C, the width of the first level; level i has C · channel_mult[i].
        channel_mult: width multipliers per level (one downsampling between levels).
        num_res_blocks: ResBlocks per level on the way down (one more per level on the way up).
        attention_resolutions: downsampling factors (1, 2, 4, …) whose levels get a transformer.
        num_head_channels: width of an attention head (MVDream: 64) ...
        num_heads: ... or a fixed number of heads (RichDreamer: 8); exactly one of the two is set.
        transformer_depth: transformer blocks per spatial transformer.
        context_dim: width of the text embeddings (OpenCLIP-H 1024, CLIP-L 768).
        use_linear_in_transformer: linear projections in/out of the transformers (else 1×1 convs).
        camera_dim: the flattened camera (a 4×4 matrix: 16).
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_head_channels: int | None = 64
    num_heads: int | None = None
    transformer_depth: int = 1
    context_dim: int = 1024
    use_linear_in_transformer: bool = True
    camera_dim: int = 16

    def __post_init__(self):
        if (self.num_head_channels is None) == (self.num_heads is None):
            raise ValueError("set exactly one of num_head_channels and num_heads")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    def heads(self, channels: int) -> int:
        """Attention heads of a transformer ``channels`` wide (the inner width is always ``channels``)."""
        return channels // self.num_head_channels if self.num_head_channels else self.num_heads


#: MVDream, ``sd-v2.1-base-4view`` (its ``sd-v2-base.yaml``): SD 2.1-base's UNet plus the camera MLP.
MVDREAM_SD21 = MultiViewUNetConfig()
#: RichDreamer's multi-view normal-depth model ``nd-mv`` (pixel space, 4 channels at 32², CLIP-L text).
RICHDREAMER_ND = MultiViewUNetConfig(num_head_channels=None, num_heads=8, context_dim=768,
                                     use_linear_in_transformer=False)


# ---------------------------------------------------------------------------------------------
# Building blocks, named as in the ldm checkpoints (the indices inside the nn.Sequential are keys)
# ---------------------------------------------------------------------------------------------
class GroupNorm32(nn.GroupNorm):
    """32-group norm computed in float32 whatever the weights' dtype (as ldm computes it: float16
    statistics over large feature maps are poor)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__(32, channels, eps=eps)

    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).type(x.dtype)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[N, dim] sinusoidal embedding of timesteps [N]: cosines first, then sines (ldm's order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(embedding, (0, dim % 2))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus the (timestep + camera) embedding, GroupNorm-SiLU-conv, residual."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        # index 2 is ldm's dropout (p = 0 in every published config): kept as a placeholder so that
        # the convolution keeps its key ``out_layers.3``
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Identity(),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Attention(nn.Module):
    """Multi-head attention of queries [B, L, C] on a context [B, M, D] (itself when None)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Identity())  # [1] was ldm's dropout (p = 0)

    def forward(self, x, context=None):
        context = x if context is None else context
        b = x.shape[0]
        q, k, v = (t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/√d_head, as ldm's
        return self.to_out(out.transpose(1, 2).reshape(b, x.shape[1], -1))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim))  # [1]: dropout

    def forward(self, x):
        return self.net(x)


class MultiViewTransformerBlock(nn.Module):
    """Self-attention across the frames of a group, cross-attention to the text, feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.attn1 = Attention(dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context, num_frames: int):
        """x: [B·F, L, C] tokens of F frames per group; context: [B·F, M, D]."""
        n, length, channels = x.shape
        # the 3D self-attention: the L tokens of the F frames of a group form one sequence of F·L
        grouped = x.reshape(n // num_frames, num_frames * length, channels)
        grouped = self.attn1(self.norm1(grouped)) + grouped
        x = grouped.reshape(n, length, channels)
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer3D(nn.Module):
    """GroupNorm, projection in, transformer blocks over the H·W tokens, projection out, residual."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, linear: bool):
        super().__init__()
        self.linear = linear
        self.norm = GroupNorm32(channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [MultiViewTransformerBlock(channels, heads, context_dim) for _ in range(depth)])
        self.proj_out = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)

    def forward(self, x, context, num_frames: int):
        b, c, h, w = x.shape
        tokens = self.norm(x)
        if not self.linear:
            tokens = self.proj_in(tokens)
        tokens = tokens.flatten(2).transpose(1, 2)
        if self.linear:
            tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context, num_frames)
        if self.linear:
            tokens = self.proj_out(tokens)
        tokens = tokens.transpose(1, 2).reshape(b, c, h, w)
        if not self.linear:
            tokens = self.proj_out(tokens)
        return tokens + x


class EmbedSequential(nn.ModuleList):
    """One entry of ``input_blocks``/``output_blocks``: layers fed what each needs (ldm's keys ``.0``, ``.1``)."""

    def forward(self, h, emb, context, num_frames: int):
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialTransformer3D):
                h = layer(h, context, num_frames)
            else:
                h = layer(h)
        return h


class MultiViewUNet(nn.Module):
    """MVDream's ``MultiViewUNetModel``: an ε-predicting UNet over groups of ``num_frames`` views.

    Its ``state_dict`` has exactly the keys of the published checkpoints' ``model.diffusion_model.*``
    (prefix removed); see ``unet_layout``. Weights are initialised by PyTorch's defaults (nothing is
    zeroed, unlike ldm's training init), so that tiny random models give non-trivial outputs.
    """

    def __init__(self, config: MultiViewUNetConfig = MVDREAM_SD21):
        super().__init__()
        self.config = c = config
        emb = c.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(c.model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.camera_embed = nn.Sequential(nn.Linear(c.camera_dim, emb), nn.SiLU(), nn.Linear(emb, emb))

        def transformer(channels):
            return SpatialTransformer3D(channels, c.heads(channels), c.transformer_depth, c.context_dim,
                                        c.use_linear_in_transformer)

        self.input_blocks = nn.ModuleList([EmbedSequential([nn.Conv2d(c.in_channels, c.model_channels, 3, padding=1)])])
        skips, ch, ds = [c.model_channels], c.model_channels, 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers = [ResBlock(ch, emb, mult * c.model_channels)]
                ch = mult * c.model_channels
                if ds in c.attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(EmbedSequential(layers))
                skips.append(ch)
            if level != len(c.channel_mult) - 1:
                self.input_blocks.append(EmbedSequential([Downsample(ch)]))
                skips.append(ch)
                ds *= 2
        self.middle_block = EmbedSequential([ResBlock(ch, emb, ch), transformer(ch), ResBlock(ch, emb, ch)])
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), emb, mult * c.model_channels)]
                ch = mult * c.model_channels
                if ds in c.attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(layers))
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(ch, c.out_channels, 3, padding=1))

    @property
    def dtype(self) -> torch.dtype:
        return self.out[2].weight.dtype

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                camera: torch.Tensor | None = None, num_frames: int = 1) -> torch.Tensor:
        """Predicted noise [N, out, H, W] for inputs [N, in, H, W] (N = groups × ``num_frames``, the
        frames of a group consecutive), timesteps [N], text context [N, 77, D] and cameras [N, 16]
        (``normalize_camera``'s layout; None: no camera term). H, W divisible by 2^(levels − 1)."""
        if x.shape[0] % num_frames:
            raise ValueError(f"a batch of {x.shape[0]} is not a whole number of {num_frames}-frame groups")
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(self.dtype))
        if camera is not None:
            emb = emb + self.camera_embed(camera.to(self.dtype))
        h, context = x.to(self.dtype), context.to(self.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context, num_frames)
            skips.append(h)
        h = self.middle_block(h, emb, context, num_frames)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, num_frames)
        return self.out(h)


# ---------------------------------------------------------------------------------------------
# Cameras
# ---------------------------------------------------------------------------------------------
def normalize_camera(c2w: torch.Tensor) -> torch.Tensor:
    """MVDream's camera condition: [N, 16] from camera-to-world matrices [N, 4, 4].

    ``c2w`` is threestudio's layout, which ``training.cameras`` shares (columns right, up, back,
    position; world z up; MVDream was trained in this "Blender" frame, so no axis change is needed).
    Each camera's position is scaled onto the unit sphere — every camera by its own distance (MVDream's
    ``normalize_camera``: the model sees directions, not distances) — and the matrix is flattened row by
    row. The input is not modified.
    """
    camera = c2w.reshape(-1, 4, 4).clone()
    translation = camera[:, :3, 3]
    camera[:, :3, 3] = translation / (translation.norm(dim=1, keepdim=True) + 1e-8)
    return camera.reshape(-1, 16)
