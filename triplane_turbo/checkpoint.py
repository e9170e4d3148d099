"""Reading and writing adapter checkpoints in the published container and key layout.

The published ``triplane_turbo_sd_v1.pth`` is a Lightning-style dict whose ``state_dict`` holds
``geometry.bbox``, the adapter groups (``geometry.space_generator.peft_layers.layers.<i>.…``) and the
three heads (``geometry.sdf_network`` etc.); ``adapter.expected_layout`` lists every key. Files are
read with ``torch.load(weights_only=True)``: plain tensors only, never arbitrary pickles.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch
from torch import nn

from .adapter import (CROSS_ATTN, GROUP_PREFIX, PEFT_ADAPTER_NAME, PLANES, PROJECTIONS, SELF_ATTN, UNET_LOCON,
                      VAE_ATTN, VAE_CONV_OUT, VAE_LOCON, AdapterSpec, CheckpointMismatchError, adapter_slots,
                      expected_layout)
from .fileio import atomic_path


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


def fields_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The heads' and box's part of a checkpoint, keyed as ``TriplaneFields`` names them."""
    prefix = "geometry."
    return {k[len(prefix):]: v for k, v in state_dict.items() if not k.startswith(GROUP_PREFIX)}


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


def save_checkpoint(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], global_step: int = 0) -> None:
    """Writes ``state_dict`` in the published container (a Lightning-style dict), atomically."""
    with atomic_path(path) as tmp:
        torch.save({"epoch": 0, "global_step": int(global_step), "pytorch-lightning_version": "2.0.0",
                    "state_dict": dict(state_dict)}, tmp)


__all__ = ["adapter_state_dict", "fields_state_dict", "read_checkpoint", "save_checkpoint"]
