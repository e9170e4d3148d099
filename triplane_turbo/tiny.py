"""Tiny random models in Hub layout, for tests and the offline ``--tiny`` demo.

``write_tiny_model(folder)`` writes a miniature Stable Diffusion (diffusers layout: UNet, VAE,
CLIP text encoder, a byte-level BPE vocabulary written here, the SD-2.1 scheduler config) and an
adapter in the exact container format of the published ``triplane_turbo_sd_v1.pth``, so that the
real loading code runs on it. The shapes it produces are meaningless, but the path is the real one.
The SDF head is scaled down so that the sphere prior dominates: the mesh is a closed, coloured blob.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import torch

from . import adapter as peta

TINY_UNET = dict(
    sample_size=32, in_channels=4, out_channels=4, block_out_channels=[16, 32, 32],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    layers_per_block=1, attention_head_dim=[2, 4, 4], cross_attention_dim=32, norm_num_groups=8,
    use_linear_projection=True,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 32], layers_per_block=1,
    down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8,
    sample_size=64,
)
TINY_TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
    hidden_act="gelu", projection_dim=32, bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
#: Stable Diffusion 2.1-base's scheduler config, verbatim (a PNDM config; the pipeline builds DDIM).
SD21_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}
#: Merges of the tiny vocabulary: enough to show BPE at work on common prompt words.
TINY_MERGES = ["t h", "th e</w>", "a n", "o r", "e r</w>", "i n", "in g</w>", "o n", "e n", "a r"]
ADAPTER_RANKS = dict(self_rank=4, cross_rank=4, conv_rank=4)


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes used by GPT-2/CLIP byte-level BPE, in CLIP's order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


def write_tokenizer(folder: Path) -> None:
    """A CLIP tokenizer folder: byte symbols, the same with ``</w>``, a few merges, the specials."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in TINY_MERGES]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(TINY_MERGES) + "\n")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!",
                "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**specials, "model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}))


def write_tiny_base(folder: Path, seed: int = 0, fp16_variant: bool = False):
    """A tiny SD-style base model in diffusers layout; returns (unet, vae) as written.

    With ``fp16_variant`` the float16 weight files (``*.fp16.safetensors``) are written beside the
    float32 ones, as in the Hub repositories of Stable Diffusion. The caller's random state is left
    as it was: the weights come from ``seed`` alone.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):  # diffusers and transformers initialise from the global RNG
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_UNET)
        vae = AutoencoderKL(**TINY_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(_byte_symbols()) * 2 + len(TINY_MERGES) + 2,
                                                    **TINY_TEXT))
    for name, model in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        model.save_pretrained(folder / name)
        if fp16_variant:
            torch.nn.Module.to(copy.deepcopy(model), torch.float16).save_pretrained(folder / name, variant="fp16")
    write_tokenizer(folder / "tokenizer")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD21_SCHEDULER))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}))
    return unet, vae


def random_adapter_state_dict(unet, vae, spec: peta.AdapterSpec, seed: int = 0,
                              sdf_scale: float = 0.02, deformation_scale: float = 0.05) -> dict[str, torch.Tensor]:
    """Random tensors for every key a checkpoint of this architecture holds, in file order.

    The last layers of the SDF and deformation heads are scaled by ``sdf_scale`` and
    ``deformation_scale`` so that the sphere prior dominates and the mesh stays a clean blob.
    """
    g = torch.Generator().manual_seed(seed)
    layout = peta.expected_layout(peta.adapter_slots(unet, vae), spec)
    state_dict = {}
    for key, (shape, _, kind) in layout.items():
        if key == "geometry.bbox":
            state_dict[key] = torch.tensor([[-1.0] * 3, [1.0] * 3])
            continue
        fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
        std = (2.0 / fan_in) ** 0.5 if kind.startswith("mlp") else (0.5 / fan_in) ** 0.5
        value = torch.randn(shape, generator=g) * std
        if key.endswith("bias"):
            value = value * 0.1
        last_layer = 2 * len(spec.mlp_hidden)
        if key == f"geometry.sdf_network.layers.{last_layer}.weight":
            value = value * sdf_scale
        if key == f"geometry.deformation_network.layers.{last_layer}.weight":
            value = value * deformation_scale
        state_dict[key] = value
    return state_dict


def write_tiny_model(folder: str | Path, seed: int = 0, fp16_variant: bool = False) -> tuple[Path, Path]:
    """Write a tiny base model and adapter under ``folder``; returns (base_dir, adapter_file)."""
    folder = Path(folder)
    base_dir, adapter_file = folder / "base", folder / "adapter" / "triplane_turbo_sd_v1.pth"
    unet, vae = write_tiny_base(base_dir, seed, fp16_variant)
    out_channels = 16  # 8 channels per plane
    spec = peta.AdapterSpec(out_channels=out_channels, mlp_hidden=(16, 16), **ADAPTER_RANKS)
    state_dict = random_adapter_state_dict(unet, vae, spec, seed)
    adapter_file.parent.mkdir(parents=True, exist_ok=True)
    # The published container: a Lightning-style dict around the state dict.
    torch.save({"epoch": 0, "global_step": 0, "pytorch-lightning_version": "2.0.0", "state_dict": state_dict},
               adapter_file)
    return base_dir, adapter_file


def tiny_pipeline(device=None, dtype=None, latent_size: int = 16, **kwargs):
    """A pipeline on a freshly written tiny model (written to a temporary folder, removed after loading).

    ``latent_size`` 16 (32×32 planes) keeps a CPU generation around a second; the loading path is
    the real one.
    """
    from .config import GenerationConfig
    from .pipeline import TriplaneTurboPipeline

    kwargs.setdefault("config", GenerationConfig(latent_size=latent_size))
    with tempfile.TemporaryDirectory(prefix="triplane-turbo-tiny-") as tmp:
        base_dir, adapter_file = write_tiny_model(tmp)
        pipe = TriplaneTurboPipeline.from_pretrained(str(base_dir), str(adapter_file), device=device, dtype=dtype,
                                                     **kwargs)
    pipe.revision = "tiny"
    return pipe


#: A miniature CLIP (ViT with 32-pixel patches on 224² inputs, as ViT-B/32, but 32 wide and 2 deep).
TINY_CLIP_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=77)
TINY_CLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        image_size=224, patch_size=32)
#: OpenAI CLIP's preprocessing, as ``openai/clip-vit-base-patch32`` publishes it.
CLIP_PREPROCESSOR = {"crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
                     "do_normalize": True, "do_rescale": True, "do_resize": True,
                     "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
                     "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
                     "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 224}}


def write_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """A tiny random CLIP in transformers' layout (model, this module's tokenizer, OpenAI's image
    preprocessing) under ``folder``, for the evaluation's tests and its ``--tiny`` run; returns the folder.

    The weights come from ``seed`` alone (the caller's random state is left as it was).
    """
    from transformers import CLIPConfig, CLIPModel

    folder = Path(folder)
    write_tokenizer(folder)
    vocab = json.loads((folder / "vocab.json").read_text())
    text = dict(TINY_CLIP_TEXT, vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["!"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=TINY_CLIP_VISION, projection_dim=16))
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(CLIP_PREPROCESSOR, indent=2))
    return folder
