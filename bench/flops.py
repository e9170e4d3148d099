#!/usr/bin/env python
"""Network arithmetic of one generation, counted by torch.utils.flop_counter on the meta device.

The full SD-2.1-base UNet with the joint six-plane self-attention, over six latent planes, and the
VAE decoder with the adapter's 64-channel output convolution. Nothing is allocated or downloaded;
the count is the floor any implementation of the same numerics must compute (LoRA terms are merged
or low-rank and add well under 1 %). Divide by a machine's measured matrix-multiply rate for the
fastest time it could possibly take.

    python bench/flops.py [--latent-size 32] [--steps 4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def count(latent_size: int = 32, steps: int = 4) -> dict[str, float]:
    """FLOPs (multiply and add counted separately) of one UNet pass, the VAE decode and the total."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from triplane_turbo import config as cfg
    from triplane_turbo.adapter import JointTriplaneAttnProcessor

    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg.SD21_UNET_CONFIG)
        vae = AutoencoderKL(**cfg.SD21_VAE_CONFIG)
        vae.decoder.conv_out = torch.nn.Conv2d(vae.decoder.conv_out.in_channels,
                                               cfg.PUBLISHED_ADAPTER["out_channels"], 3, padding=1)
        latents = torch.zeros(cfg.NUM_PLANES, 4, latent_size, latent_size)
        context = torch.zeros(cfg.NUM_PLANES, 77, cfg.SD21_UNET_CONFIG["cross_attention_dim"])
        timestep = torch.tensor(999)
    for block in unet.modules():
        if getattr(block, "is_cross_attention", None) is False:  # every attn1: joint over the six planes
            block.set_processor(JointTriplaneAttnProcessor())
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            unet(latents, timestep, encoder_hidden_states=context)
        unet_flops = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            vae.decode(latents)
        vae_flops = counter.get_total_flops()
    return {"unet_pass": unet_flops, "vae_decode": vae_flops, "total": steps * unet_flops + vae_flops}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/flops.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--latent-size", type=int, default=32, help="side of each latent plane (default: 32)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps (default: 4)")
    args = parser.parse_args(argv)
    flops = count(args.latent_size, args.steps)
    print(f"UNet pass over the six planes: {flops['unet_pass'] / 1e12:.2f} TFLOP; VAE decode: "
          f"{flops['vae_decode'] / 1e12:.2f} TFLOP; one generation ({args.steps} steps): {flops['total'] / 1e12:.2f} TFLOP")
    return 0


if __name__ == "__main__":
    sys.exit(main())
