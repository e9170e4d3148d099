"""PETA, the Parameter-Efficient Triplane Adapter, on diffusers' UNet and VAE.

What the published checkpoint adds to Stable Diffusion (numerics: docs/CHECKPOINT.md §6):

* every UNet self-attention (``attn1``): a LoRA per projection *per plane* (six planes: xy/xz/yz for
  geometry, then for texture), and attention that runs jointly over the six planes of an object;
* every UNet cross-attention (``attn2``) and the VAE decoder's attention: ordinary LoRA;
* LoCON (a LoRA for convolutions) on every ResNet conv, shortcut and up/down-sampler conv;
* a new VAE output convolution that emits the feature planes instead of RGB.

The shared terms are ordinary LoRA on ``nn.Linear``/``nn.Conv2d``, so they go through ``peft`` exactly
as diffusers loads LoRA. Only the plane-specific LoRA and the joint six-plane attention have no
library equivalent and are written here.

The checkpoint names its adapter groups by an index (``...peft_layers.layers.<i>...``); the index is
the position in a fixed walk over the architecture (docs/CHECKPOINT.md §4), reproduced by ``adapter_slots``
from the module tree itself — never from a library's iteration order.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .config import NUM_PLANES

#: Common prefix of every adapter-group key in the checkpoint.
GROUP_PREFIX = "geometry.space_generator.peft_layers.layers."
#: The six plane-specific LoRA pairs of a self-attention, in the row order of a latent batch
#: (row 6b+p is plane p of object b). Checkpoint names: ``to_q_xy_lora_geo`` etc.
PLANES = (("xy", "geo"), ("xz", "geo"), ("yz", "geo"), ("xy", "tex"), ("xz", "tex"), ("yz", "tex"))
#: Projections of an attention in checkpoint naming -> attribute path on diffusers' ``Attention``.
PROJECTIONS = OrderedDict([("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")])
#: Adapter name under which the shared LoRA terms live in peft.
PEFT_ADAPTER_NAME = "triplane_turbo"

# Kinds of adapter group, as named in checkpoint_manifest.json.
SELF_ATTN = "unet_self_attn_hexa_v1"
CROSS_ATTN = "unet_cross_attn_vanilla"
VAE_ATTN = "vae_attn_basic"
UNET_LOCON = "unet_locon_vanilla_v1"
VAE_LOCON = "vae_locon_vanilla_v1"
VAE_CONV_OUT = "vae_conv_out_replacement"

HEADS = ("sdf_network", "feature_network", "deformation_network")


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the architecture; the message names the file and the first key."""


# --------------------------------------------------------------------------------------------------
# Where the adapter groups live
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AdapterSlot:
    """One adapter group: its index in the checkpoint, its kind and the module it attaches to."""

    index: int
    kind: str
    module_path: str  # "unet.<path>" or "vae.<path>", as in checkpoint_manifest.json
    module: nn.Module

    @property
    def prefix(self) -> str:
        return f"{GROUP_PREFIX}{self.index}."


def _is_conv(module) -> bool:
    # a plain Conv2d, or one already wrapped by peft (after attach_adapter)
    return isinstance(module, nn.Conv2d) or isinstance(getattr(module, "base_layer", None), nn.Conv2d)


def _resnet_and_sampler_convs(block: nn.Module, path: str) -> Iterator[tuple[str, nn.Module]]:
    """The convolutions that get LoCON in one UNet/VAE block, in the authors' order."""
    for r, resnet in enumerate(block.resnets):
        for name in ("conv1", "conv2", "conv_shortcut"):
            conv = getattr(resnet, name, None)
            if _is_conv(conv):
                yield f"{path}.resnets.{r}.{name}", conv
    for attr in ("downsamplers", "upsamplers"):
        for s, sampler in enumerate(getattr(block, attr, None) or []):
            conv = getattr(sampler, "conv", None)
            if _is_conv(conv):
                yield f"{path}.{attr}.{s}.conv", conv


def _transformer_attentions(block: nn.Module, path: str) -> Iterator[tuple[str, str, nn.Module]]:
    for a, transformer in enumerate(getattr(block, "attentions", None) or []):
        for t, tblock in enumerate(transformer.transformer_blocks):
            base = f"{path}.attentions.{a}.transformer_blocks.{t}"
            yield SELF_ATTN, f"{base}.attn1", tblock.attn1
            if tblock.attn2 is not None:
                yield CROSS_ATTN, f"{base}.attn2", tblock.attn2


def _unet_blocks(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    # The authors' UNet registered down_blocks, up_blocks, then mid_block: the mid block comes last.
    blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    blocks.append(("mid_block", unet.mid_block))
    return blocks


def adapter_slots(unet: nn.Module, vae: nn.Module) -> list[AdapterSlot]:
    """All adapter groups of a UNet2DConditionModel + AutoencoderKL, in checkpoint index order.

    Works on any device, ``meta`` included (only the module tree is read).
    """
    if not unet.config.use_linear_projection:
        # With conv projections the authors' code would also have put LoCON on proj_in/proj_out.
        raise ValueError("TriplaneTurbo adapters exist only for UNets with use_linear_projection=True")
    found: list[tuple[str, str, nn.Module]] = []
    blocks = _unet_blocks(unet)
    for path, block in blocks:
        found += [(kind, f"unet.{p}", m) for kind, p, m in _transformer_attentions(block, path)]
    decoder = vae.decoder
    found += [(VAE_ATTN, f"vae.decoder.mid_block.attentions.{i}", a)
              for i, a in enumerate(decoder.mid_block.attentions) if a is not None]
    for path, block in blocks:
        found += [(UNET_LOCON, f"unet.{p}", m) for p, m in _resnet_and_sampler_convs(block, path)]
    # The VAE decoder registered up_blocks before mid_block (docs/CHECKPOINT.md §4, pass 4).
    vae_blocks = [(f"decoder.up_blocks.{i}", b) for i, b in enumerate(decoder.up_blocks)]
    vae_blocks.append(("decoder.mid_block", decoder.mid_block))
    for path, block in vae_blocks:
        found += [(VAE_LOCON, f"vae.{p}", m) for p, m in _resnet_and_sampler_convs(block, path)]
    found.append((VAE_CONV_OUT, "vae.decoder.conv_out", decoder.conv_out))
    return [AdapterSlot(i, kind, path, module) for i, (kind, path, module) in enumerate(found)]


# --------------------------------------------------------------------------------------------------
# Hyper-parameters, read from the checkpoint
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AdapterSpec:
    """Hyper-parameters of an adapter, all read from tensor shapes (``from_state_dict``).

    Published values: ranks 16/16/16, 64 output channels (32 per plane), MLPs with two hidden
    layers of 64 and no bias.
    """

    self_rank: int
    cross_rank: int
    conv_rank: int
    out_channels: int  # channels of the new VAE conv_out; each plane keeps half of them
    mlp_hidden: tuple[int, ...]  # hidden widths of each head (shared by the three heads)

    @property
    def plane_channels(self) -> int:
        return self.out_channels // 2

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], slots: list[AdapterSlot],
                        source: str = "checkpoint") -> "AdapterSpec":
        def shape_of(key: str) -> tuple[int, ...]:
            if key not in state_dict:
                raise CheckpointMismatchError(
                    f"{source}: missing key {key!r} needed by this architecture")
            return tuple(state_dict[key].shape)

        def first(kind: str) -> AdapterSlot | None:
            return next((s for s in slots if s.kind == kind), None)

        def rank(slot: AdapterSlot | None, pair: str) -> int:
            return shape_of(f"{slot.prefix}{pair}down.weight")[0] if slot else 0

        hidden = []
        n = 0  # heads are Linear, ReLU, Linear, ...: Linear layers sit at even indices
        while f"geometry.sdf_network.layers.{n + 2}.weight" in state_dict:
            hidden.append(shape_of(f"geometry.sdf_network.layers.{n}.weight")[0])
            n += 2
        return cls(
            self_rank=rank(first(SELF_ATTN), "to_q_xy_lora_geo."),
            cross_rank=rank(first(CROSS_ATTN), "to_q_lora."),
            conv_rank=rank(first(UNET_LOCON) or first(VAE_LOCON), ""),
            out_channels=shape_of(f"{first(VAE_CONV_OUT).prefix}weight")[0],
            mlp_hidden=tuple(hidden),
        )


def _mlp_shapes(name: str, in_dim: int, hidden: tuple[int, ...], out_dim: int):
    dims = (in_dim, *hidden, out_dim)
    for i in range(len(dims) - 1):
        yield f"geometry.{name}.layers.{2 * i}.weight", (dims[i + 1], dims[i])


def _unwrapped(module: nn.Module) -> nn.Module:
    """The base layer under PETA's or peft's LoRA wrapper (the module itself if unwrapped)."""
    return getattr(module, "base", None) or getattr(module, "base_layer", None) or module


def expected_layout(slots: list[AdapterSlot], spec: AdapterSpec) -> "OrderedDict[str, tuple[tuple[int, ...], str, str]]":
    """Every tensor a checkpoint for this architecture holds: key -> (shape, module path, kind).

    In file order: ``geometry.bbox``, the adapter groups by index, then the SDF, colour and
    deformation MLPs — the order of the published file.
    """
    layout: OrderedDict[str, tuple[tuple[int, ...], str, str]] = OrderedDict()
    layout["geometry.bbox"] = ((2, 3), "geometry.bbox", "bbox_buffer")
    for slot in slots:
        add = lambda name, shape: layout.__setitem__(  # noqa: E731
            slot.prefix + name, (tuple(shape), slot.module_path, slot.kind))
        m = slot.module
        if slot.kind == SELF_ATTN:
            for plane, half in _planes_in_registration_order():
                for proj, attr in PROJECTIONS.items():
                    lin = _unwrapped(m.get_submodule(attr))
                    # the hexa output LoRA acts on the projected output (docs/CHECKPOINT.md §6.4)
                    d_in = lin.out_features if proj == "to_out" else lin.in_features
                    add(f"{proj}_{plane}_lora_{half}.down.weight", (spec.self_rank, d_in))
                    add(f"{proj}_{plane}_lora_{half}.up.weight", (lin.out_features, spec.self_rank))
        elif slot.kind in (CROSS_ATTN, VAE_ATTN):
            r = spec.cross_rank if slot.kind == CROSS_ATTN else spec.self_rank  # VAE uses the self rank
            for proj, attr in PROJECTIONS.items():
                lin = _unwrapped(m.get_submodule(attr))
                add(f"{proj}_lora.down.weight", (r, lin.in_features))
                add(f"{proj}_lora.up.weight", (lin.out_features, r))
        elif slot.kind in (UNET_LOCON, VAE_LOCON):
            m = _unwrapped(m)
            add("down.weight", (spec.conv_rank, m.in_channels, *m.kernel_size))
            add("up.weight", (m.out_channels, spec.conv_rank, 1, 1))
        elif slot.kind == VAE_CONV_OUT:
            add("weight", (spec.out_channels, m.in_channels, 3, 3))
            add("bias", (spec.out_channels,))
    c = spec.plane_channels
    for name, in_dim, out_dim in (("sdf_network", c, 1), ("feature_network", 3 * c, 3),
                                  ("deformation_network", c, 3)):
        for key, shape in _mlp_shapes(name, in_dim, spec.mlp_hidden, out_dim):
            layout[key] = (shape, key.rsplit(".", 1)[0], "mlp_linear_no_bias")
    return layout


def _planes_in_registration_order():
    # Inside a group the authors registered xy-geo, xy-tex, xz-geo, xz-tex, yz-geo, yz-tex.
    for plane in ("xy", "xz", "yz"):
        for half in ("geo", "tex"):
            yield plane, half


def check_state_dict(state_dict: dict[str, torch.Tensor], layout: dict, source: str) -> None:
    """Fail loudly, naming the first differing key, unless the file matches ``layout`` exactly."""
    for key, (shape, _, _) in layout.items():
        if key not in state_dict:
            raise CheckpointMismatchError(f"{source}: missing key {key!r} (expected shape {list(shape)})")
        if tuple(state_dict[key].shape) != shape:
            raise CheckpointMismatchError(
                f"{source}: key {key!r} has shape {list(state_dict[key].shape)}, "
                f"the architecture expects {list(shape)}")
    extra = [k for k in state_dict if k not in layout]
    if extra:
        raise CheckpointMismatchError(
            f"{source}: unexpected key {extra[0]!r} (and {len(extra) - 1} more) not used by this architecture")


# --------------------------------------------------------------------------------------------------
# The hand-written part: plane-specific LoRA and joint six-plane attention
# --------------------------------------------------------------------------------------------------

class PlaneLoRALinear(nn.Module):
    """A Linear layer plus one LoRA pair per plane, applied to rows ``6b + p`` with plane p's pair.

    ``down`` is [P, r, in], ``up`` is [P, out, r]; all planes run in one batched product.
    With ``on_output=True`` the LoRA reads the *projected* output, ``y + up(down(y))`` — the
    authors' quirk for the self-attention output projection.
    """

    def __init__(self, base: nn.Linear, rank: int, num_planes: int = NUM_PLANES, on_output: bool = False):
        super().__init__()
        self.base = base
        self.on_output = on_output
        self.num_planes = num_planes
        d_in = base.out_features if on_output else base.in_features
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.down = nn.Parameter(torch.zeros(num_planes, rank, d_in, **kw))
        self.up = nn.Parameter(torch.zeros(num_planes, base.out_features, rank, **kw))

    def plane_lora(self, x: torch.Tensor) -> torch.Tensor:
        """x [P·B, N, C] -> the per-plane low-rank term [P·B, N, out]."""
        rows, n, c = x.shape
        if rows % self.num_planes:
            raise ValueError(f"plane LoRA needs a multiple of {self.num_planes} rows, got {rows}")
        x = x.reshape(rows // self.num_planes, self.num_planes, n, c)
        h = torch.matmul(x, self.down.transpose(1, 2))  # [B, P, N, r]
        return torch.matmul(h, self.up.transpose(1, 2)).reshape(rows, n, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.plane_lora(y if self.on_output else x)


class JointTriplaneAttnProcessor:
    """Self-attention in which every plane of an object attends to the tokens of all its planes.

    ``hidden_states`` is [6B, N, C]; the six rows of an object are concatenated along the token axis
    ([B, 6N, C]), attended with ordinary multi-head attention and split back. ``kernel="sdpa"`` uses
    PyTorch's fused scaled-dot-product attention; ``"math"`` spells out softmax(QKᵀ/√d)V as the
    authors' code does (kept for the benchmark's baseline).
    """

    def __init__(self, kernel: str = "sdpa", num_planes: int = NUM_PLANES):
        if kernel not in ("sdpa", "math"):
            raise ValueError(f"unknown attention kernel {kernel!r}")
        self.kernel = kernel
        self.num_planes = num_planes

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            raise ValueError("joint triplane attention is self-attention on [6B, N, C] tokens only")
        rows, n, c = hidden_states.shape
        b = rows // self.num_planes
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        heads = attn.heads
        split = lambda t: t.reshape(b, self.num_planes * n, heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        if self.kernel == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        else:  # as diffusers' get_attention_scores, which the authors' processor calls: heads in the batch
            q, k, v = (t.reshape(b * heads, self.num_planes * n, -1) for t in (q, k, v))
            scores = torch.baddbmm(torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype, device=q.device),
                                   q, k.transpose(1, 2), beta=0, alpha=attn.scale)
            out = torch.bmm(scores.softmax(dim=-1), v).reshape(b, heads, self.num_planes * n, -1)
        out = out.transpose(1, 2).reshape(rows, n, -1).to(q.dtype)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)  # dropout, inactive at inference


def adapter_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The parameters PETA added to ``model`` (plane LoRA, peft LoRA/LoCON, the new conv_out)."""
    for name, param in model.named_parameters():
        if ".lora_" in name or name.endswith((".down", ".up")) or name.startswith("decoder.conv_out."):
            yield name, param


