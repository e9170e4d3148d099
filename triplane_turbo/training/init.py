"""A freshly initialised adapter, as the authors start training (``--from-scratch``).

Their initialisation (``custom/triplaneturbo/extern/few_step_triplane_dual_sd_modules.py``): every
LoRA and LoCON pair has ``down ~ N(0, (1/rank)²)`` and ``up = 0`` (so the adapted networks start as
Stable Diffusion itself); the new VAE output convolution (128 -> 64 channels, 3×3) and the three
bias-free heads (``get_mlp`` "VanillaMLP") keep torch's default initialisation; the box is [-1, 1]³.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import adapter as peta

#: The published adapter's hyper-parameters (``configs/TriplaneTurbo_v1.yaml``: ranks 16, output_dim
#: 64, heads with two hidden layers of 64).
PUBLISHED_SPEC = peta.AdapterSpec(self_rank=16, cross_rank=16, conv_rank=16, out_channels=64, mlp_hidden=(64, 64))


def fresh_adapter_state_dict(unet: nn.Module, vae: nn.Module, spec: peta.AdapterSpec = PUBLISHED_SPEC,
                             seed: int = 0) -> dict[str, torch.Tensor]:
    """An adapter checkpoint ``state_dict`` (published key layout) for the base ``unet``/``vae``
    (before PETA is attached), initialised as the authors'; the caller's random state is untouched."""
    layout = peta.expected_layout(peta.adapter_slots(unet, vae), spec)
    state: dict[str, torch.Tensor] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for key, (shape, _, kind) in layout.items():
            if key == "geometry.bbox":
                state[key] = torch.tensor([[-1.0] * 3, [1.0] * 3])
            elif key.endswith("down.weight"):
                state[key] = torch.randn(shape) / shape[0]  # std 1/rank
            elif key.endswith("up.weight"):
                state[key] = torch.zeros(shape)
            elif kind == peta.VAE_CONV_OUT and key.endswith("weight"):
                conv = nn.Conv2d(shape[1], shape[0], 3, padding=1)
                state[key], state[key[:-len("weight")] + "bias"] = conv.weight.detach(), conv.bias.detach()
            elif kind == peta.VAE_CONV_OUT:
                continue  # filled with its weight
            elif kind == "mlp_linear_no_bias":
                state[key] = nn.Linear(shape[1], shape[0], bias=False).weight.detach()
            else:
                raise ValueError(f"no initialisation rule for {key!r} ({kind})")
    return {key: state[key] for key in layout}


__all__ = ["PUBLISHED_SPEC", "fresh_adapter_state_dict"]
