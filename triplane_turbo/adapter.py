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

import re
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


def read_checkpoint(path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a TriplaneTurbo ``.pth`` file, loaded safely on the CPU."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, truncated file, a pickle that is not plain tensors
        raise CheckpointMismatchError(f"{path}: not a readable TriplaneTurbo checkpoint ({exc})") from exc
    state_dict = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointMismatchError(f"{path}: expected a dict of tensors under 'state_dict'")
    return dict(state_dict)


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
        else:
            weights = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * attn.scale, dim=-1)
            out = torch.matmul(weights, v)
        out = out.transpose(1, 2).reshape(rows, n, -1).to(q.dtype)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)  # dropout, inactive at inference


# --------------------------------------------------------------------------------------------------
# Attaching and loading
# --------------------------------------------------------------------------------------------------

def _unalias_downsamplers(model: nn.Module) -> None:
    # diffusers registers a Downsample2D conv twice (`conv` and the legacy alias `Conv2d_0`); peft would
    # wrap only the first name while forward() calls `conv`. Drop the alias so `conv` is the one module.
    for module in model.modules():
        if getattr(module, "Conv2d_0", None) is not None and getattr(module, "conv", None) is module.Conv2d_0:
            del module.Conv2d_0


def _lora_config(targets: dict[str, int]):
    from peft import LoraConfig

    # One entry per module: rank r and alpha r, i.e. the authors' unscaled up(down(x)).
    pattern = {re.escape(name): r for name, r in targets.items()}
    any_rank = next(iter(targets.values()))
    return LoraConfig(r=any_rank, lora_alpha=any_rank, lora_dropout=0.0, bias="none",
                      target_modules=list(targets), rank_pattern=pattern, alpha_pattern=dict(pattern))


def attach_adapter(unet: nn.Module, vae: nn.Module, spec: AdapterSpec, attention_kernel: str = "sdpa") -> list[AdapterSlot]:
    """Put empty PETA modules into ``unet`` and ``vae`` (in place); returns the slots, by index."""
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import cast_adapter_dtype

    slots = adapter_slots(unet, vae)
    peft_targets: dict[str, dict[str, int]] = {"unet": {}, "vae": {}}
    for slot in slots:
        model_name, path = slot.module_path.split(".", 1)
        if slot.kind == SELF_ATTN:
            attn = slot.module
            attn.to_q = PlaneLoRALinear(attn.to_q, spec.self_rank)
            attn.to_k = PlaneLoRALinear(attn.to_k, spec.self_rank)
            attn.to_v = PlaneLoRALinear(attn.to_v, spec.self_rank)
            attn.to_out[0] = PlaneLoRALinear(attn.to_out[0], spec.self_rank, on_output=True)
            attn.set_processor(JointTriplaneAttnProcessor(attention_kernel))
        elif slot.kind in (CROSS_ATTN, VAE_ATTN):
            r = spec.cross_rank if slot.kind == CROSS_ATTN else spec.self_rank
            for attr in PROJECTIONS.values():
                peft_targets[model_name][f"{path}.{attr}"] = r
        elif slot.kind in (UNET_LOCON, VAE_LOCON):
            peft_targets[model_name][path] = spec.conv_rank
        elif slot.kind == VAE_CONV_OUT:
            old = slot.module
            vae.decoder.conv_out = nn.Conv2d(old.in_channels, spec.out_channels, 3, padding=1,
                                             device=old.weight.device, dtype=old.weight.dtype)
    for model_name, model in (("unet", unet), ("vae", vae)):
        _unalias_downsamplers(model)
        if peft_targets[model_name]:
            inject_adapter_in_model(_lora_config(peft_targets[model_name]), model, adapter_name=PEFT_ADAPTER_NAME)
            # peft creates the LoRA terms in the base layer's dtype; keep them float32 so that the
            # checkpoint's values survive on float16 base weights until they are merged.
            cast_adapter_dtype(model, PEFT_ADAPTER_NAME)
    return adapter_slots(unet, vae)


def _peft_key(path: str, proj_attr: str | None, ab: str) -> str:
    # peft's state-dict naming without the adapter name: "<module>.lora_A.weight"
    module = f"{path}.{proj_attr}" if proj_attr else path
    return f"{module}.lora_{ab}.weight"


def load_adapter_weights(unet: nn.Module, vae: nn.Module, slots: list[AdapterSlot],
                         state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Copy the adapter groups of a checked checkpoint into the attached modules.

    The shared LoRA/LoCON terms are converted once to peft's key names and loaded with
    ``set_peft_model_state_dict``; every adapter parameter must be filled, or this raises.
    """
    from peft import set_peft_model_state_dict

    peft_sd: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "vae": {}}
    filled: set[int] = set()

    def copy(param: torch.Tensor, value: torch.Tensor, plane: int | None = None) -> None:
        with torch.no_grad():
            (param if plane is None else param[plane]).copy_(value.to(dtype=param.dtype))
        filled.add(id(param))

    for slot in slots:
        model_name, path = slot.module_path.split(".", 1)
        sd = {k[len(slot.prefix):]: v for k, v in state_dict.items() if k.startswith(slot.prefix)}
        if slot.kind == SELF_ATTN:
            for p, (plane, half) in enumerate(PLANES):
                for proj, attr in PROJECTIONS.items():
                    layer = slot.module.get_submodule(attr)
                    copy(layer.down, sd[f"{proj}_{plane}_lora_{half}.down.weight"], p)
                    copy(layer.up, sd[f"{proj}_{plane}_lora_{half}.up.weight"], p)
        elif slot.kind in (CROSS_ATTN, VAE_ATTN):
            for proj, attr in PROJECTIONS.items():
                peft_sd[model_name][_peft_key(path, attr, "A")] = sd[f"{proj}_lora.down.weight"]
                peft_sd[model_name][_peft_key(path, attr, "B")] = sd[f"{proj}_lora.up.weight"]
        elif slot.kind in (UNET_LOCON, VAE_LOCON):
            peft_sd[model_name][_peft_key(path, None, "A")] = sd["down.weight"]
            peft_sd[model_name][_peft_key(path, None, "B")] = sd["up.weight"]
        elif slot.kind == VAE_CONV_OUT:
            copy(slot.module.weight, sd["weight"])
            copy(slot.module.bias, sd["bias"])
    for model_name, model in (("unet", unet), ("vae", vae)):
        result = set_peft_model_state_dict(model, peft_sd[model_name], adapter_name=PEFT_ADAPTER_NAME)
        if result.unexpected_keys:
            raise CheckpointMismatchError(f"{source}: peft did not place {result.unexpected_keys[0]!r}")
        names = dict(model.named_parameters())
        for key in peft_sd[model_name]:
            filled.add(id(names[key.replace(".weight", f".{PEFT_ADAPTER_NAME}.weight")]))
    for model_name, model in (("unet", unet), ("vae", vae)):
        for name, param in adapter_parameters(model):
            if id(param) not in filled:
                raise CheckpointMismatchError(f"{source}: nothing in the file fills {model_name}.{name}")


def adapter_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The parameters PETA added to ``model`` (plane LoRA, peft LoRA/LoCON, the new conv_out)."""
    for name, param in model.named_parameters():
        if ".lora_" in name or name.endswith((".down", ".up")) or name.startswith("decoder.conv_out."):
            yield name, param


def fuse_shared_lora(model: nn.Module) -> None:
    """Merge every peft LoRA/LoCON term into its base layer and drop the wrapper (once, at load).

    ``W' = W + up·down`` (for LoCON, ``up`` is 1×1 so the merged kernel keeps the conv's shape):
    the forward pass then costs what the base model costs. The plane-specific LoRA cannot be merged
    (each plane would need its own full weight) and stays a batched low-rank product.

    Half-precision base weights (the fp16 download) are merged in float32 one layer at a time and
    rounded once: peft would add the delta in the base dtype, and casting the whole model up first
    would double its memory.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, BaseTunerLayer):
                base = child.get_base_layer()
                dtype = base.weight.dtype
                child.to(torch.float32)
                child.merge()
                setattr(module, child_name, base.to(dtype))


# --------------------------------------------------------------------------------------------------
# Writing a checkpoint (the inverse of loading)
# --------------------------------------------------------------------------------------------------

def adapter_state_dict(unet: nn.Module, vae: nn.Module, fields: nn.Module, spec: AdapterSpec) -> "OrderedDict[str, torch.Tensor]":
    """The adapter of an *unfused* pipeline as a checkpoint ``state_dict``, in the published layout.

    The exact inverse of ``load_adapter_weights`` (plus the heads and ``geometry.bbox``): keys, shapes
    and order are those of ``expected_layout``, values float32 on the CPU. A pipeline whose shared
    LoRA was fused into the base weights cannot be written back (the terms are no longer separate).
    """
    slots = adapter_slots(unet, vae)
    layout = expected_layout(slots, spec)
    values: dict[str, torch.Tensor] = {f"geometry.{k}": v for k, v in fields.state_dict().items()}
    for slot in slots:
        m = slot.module
        put = lambda name, tensor: values.__setitem__(slot.prefix + name, tensor)  # noqa: E731
        if slot.kind == SELF_ATTN:
            for p, (plane, half) in enumerate(PLANES):
                for proj, attr in PROJECTIONS.items():
                    layer = m.get_submodule(attr)
                    put(f"{proj}_{plane}_lora_{half}.down.weight", layer.down[p])
                    put(f"{proj}_{plane}_lora_{half}.up.weight", layer.up[p])
        elif slot.kind in (CROSS_ATTN, VAE_ATTN, UNET_LOCON, VAE_LOCON):
            targets = PROJECTIONS.items() if slot.kind in (CROSS_ATTN, VAE_ATTN) else [("", None)]
            for proj, attr in targets:
                layer = m.get_submodule(attr) if attr else m
                if not hasattr(layer, "lora_A"):
                    raise ValueError(f"{slot.module_path}: the shared LoRA was fused into the base weights; load "
                                     f"the pipeline with fuse_lora=False to write its adapter")
                name = f"{proj}_lora." if proj else ""
                put(f"{name}down.weight", layer.lora_A[PEFT_ADAPTER_NAME].weight)
                put(f"{name}up.weight", layer.lora_B[PEFT_ADAPTER_NAME].weight)
        elif slot.kind == VAE_CONV_OUT:
            put("weight", m.weight)
            put("bias", m.bias)
    missing = [k for k in layout if k not in values]
    if missing or len(values) != len(layout):
        raise CheckpointMismatchError(f"cannot write the adapter: {missing[:1] or 'extra keys'} do not match the layout")
    return OrderedDict((k, values[k].detach().to("cpu", torch.float32).clone()) for k in layout)


def save_checkpoint(path, state_dict: dict[str, torch.Tensor], global_step: int = 0) -> None:
    """Writes ``state_dict`` in the published container (a Lightning-style dict), atomically."""
    import os
    import tempfile
    from pathlib import Path

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"epoch": 0, "global_step": int(global_step), "pytorch-lightning_version": "2.0.0",
                    "state_dict": dict(state_dict)}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
