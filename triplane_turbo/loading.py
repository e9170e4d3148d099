"""Loading: Stable Diffusion's components and the adapter file become a TriplaneTurbo pipeline.

``apply_peta(unet, vae, state_dict)`` is the adapter surgery in one call: read the hyper-parameters
from the file's shapes, check every key, attach PETA's modules (plane LoRA and joint attention written
here; the shared LoRA/LoCON through peft, as diffusers loads LoRA), fill them, optionally fuse the
shared terms, and build the heads. ``components_from_resolved`` reads the base model from disk.
``TriplaneTurboPipeline.from_pretrained`` / ``from_resolved`` / ``from_components`` are thin
wrappers around these.
"""

from __future__ import annotations

import re
import warnings

import torch
from torch import nn

from . import hub
from .adapter import (CROSS_ATTN, PEFT_ADAPTER_NAME, PLANES, PROJECTIONS, SELF_ATTN, UNET_LOCON, VAE_ATTN,
                      VAE_CONV_OUT, VAE_LOCON, AdapterSlot, AdapterSpec, CheckpointMismatchError,
                      JointTriplaneAttnProcessor, PlaneLoRALinear, adapter_parameters, adapter_slots,
                      check_state_dict, expected_layout)
from .checkpoint import fields_state_dict, read_checkpoint
from .config import GenerationConfig
from .triplane import TriplaneFields


# --------------------------------------------------------------------------------------------------
# The adapter surgery
# --------------------------------------------------------------------------------------------------

def apply_peta(unet: nn.Module, vae: nn.Module, state_dict: dict[str, torch.Tensor], *,
               source: str = "adapter state dict", fuse_lora: bool = True, attention_kernel: str = "sdpa",
               sphere_radius: float = 0.5) -> tuple[AdapterSpec, TriplaneFields]:
    """Put the adapter of ``state_dict`` (checkpoint key names, ``geometry.…``) into ``unet`` and
    ``vae`` in place, and build its heads; returns (its hyper-parameters, the heads on the UNet's
    device, float32).

    Raises ``CheckpointMismatchError`` naming the first key that does not fit the architecture.
    """
    slots = adapter_slots(unet, vae)
    spec = AdapterSpec.from_state_dict(state_dict, slots, source)
    check_state_dict(state_dict, expected_layout(slots, spec), source)
    slots = attach_adapter(unet, vae, spec, attention_kernel)
    load_adapter_weights(unet, vae, slots, state_dict, source)
    fields = TriplaneFields(spec.plane_channels, spec.mlp_hidden, sphere_radius)
    fields.load_state_dict(fields_state_dict(state_dict), strict=True)
    fields.to(unet.device)
    if fuse_lora:
        fuse_shared_lora(unet)
        fuse_shared_lora(vae)
    return spec, fields


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
# Building a pipeline's parts
# --------------------------------------------------------------------------------------------------

def components_from_resolved(weights: hub.ResolvedWeights) -> dict:
    """The base model's tokenizer, text encoder, UNet, VAE decoder and DDIM scheduler read from
    ``weights.base_dir``, in the precision of its files (float16 for the "fp16" variant)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    base = weights.base_dir
    with warnings.catch_warnings():  # SD ships a PNDM config; DDIM reads the same fields
        warnings.simplefilter("ignore")
        scheduler = DDIMScheduler.from_pretrained(base, subfolder="scheduler")
    load = dict(variant=weights.variant)
    half = torch.float16 if weights.variant == "fp16" else torch.float32
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", torch_dtype=half, **load)
    vae.encoder = None  # only the decoder is used
    vae.quant_conv = None
    return dict(tokenizer=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
                text_encoder=CLIPTextModel.from_pretrained(base, subfolder="text_encoder", dtype=half, **load),
                unet=UNet2DConditionModel.from_pretrained(base, subfolder="unet", torch_dtype=half, **load),
                vae=vae, scheduler=scheduler)


def adapt_components(tokenizer, text_encoder, unet, vae, scheduler, adapter_state_dict: dict, *,
                     source: str = "adapter state dict", fuse_lora: bool = True, attention_kernel: str = "sdpa",
                     channels_last: bool = True, config: GenerationConfig = GenerationConfig()) -> dict:
    """``apply_peta`` on built base components; returns the pipeline constructor's arguments.

    Refuses a scheduler that does not predict epsilon (the adapter was trained on SD 2.1-base).
    """
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise hub.IncompatibleBaseModelError(
            f"the scheduler predicts {prediction!r}; the TriplaneTurbo adapter was trained on the "
            f"epsilon-predicting Stable Diffusion 2.1-base")
    spec, fields = apply_peta(unet, vae, adapter_state_dict, source=source, fuse_lora=fuse_lora,
                              attention_kernel=attention_kernel, sphere_radius=config.sphere_radius)
    for module in (text_encoder, unet, vae, fields):
        module.eval().requires_grad_(False)
    if channels_last:
        # NHWC convolutions: oneDNN on the CPU (~1.2x on these networks) and cuDNN's tensor-core
        # kernels prefer them; the activations follow the weights' layout. Same numbers.
        for module in (unet, vae):
            nn.Module.to(module, memory_format=torch.channels_last)
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, vae=vae, scheduler=scheduler,
                fields=fields, spec=spec, config=config)


def adapted_from_resolved(weights: hub.ResolvedWeights, **options) -> dict:
    """The pipeline constructor's arguments for weights on disk: the adapter file is read and
    checked first (cheap), then the base model (gigabytes); ``options`` as ``adapt_components``."""
    state_dict = read_checkpoint(weights.adapter_file)
    parts = adapt_components(**components_from_resolved(weights), adapter_state_dict=state_dict,
                             source=str(weights.adapter_file), **options)
    return {**parts, "revision": weights.revision}


__all__ = ["adapt_components", "adapted_from_resolved", "apply_peta", "attach_adapter", "components_from_resolved",
           "fuse_shared_lora", "load_adapter_weights"]
