"""Reading the multi-view teachers' published checkpoints (original ldm layout) strictly.

Both files are the state dict of an ldm ``LatentDiffusion`` model:

=========================== =================================================================
``model.diffusion_model.*``  the multi-view UNet (``multiview_unet.MultiViewUNet``, loaded strictly)
``first_stage_model.*``      ldm's ``AutoencoderKL`` (MVDream: SD 2.1's VAE, loaded strictly into
                             diffusers' ``AutoencoderKL`` through diffusers' own ldm converter;
                             the normal-depth model: a 4-channel VAE its pixel-space teacher never uses)
``cond_stage_model.*``       the text encoder (OpenCLIP-H / CLIP-L); not read: the teachers take the
                             same encoder in diffusers/transformers layout, shared with other teachers
``betas``, ``alphas_cumprod``, …  the diffusion schedule ldm registers as buffers (checked, not used)
``model_ema.*``              EMA shadows, in a training checkpoint only (then they replace the UNet)
=========================== =================================================================

Anything else is an error naming the key. MVDream's ``sd-v2.1-base-4view.pt`` is the bare state dict
(MVDream's own loader reads it with ``strict=True``); RichDreamer's ``nd_mv_ema.ckpt`` wraps it in
``{"state_dict": …}``. Files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .multiview_unet import MVDREAM_SD21, MultiViewUNet, MultiViewUNetConfig


class Layout(dict):
    """Key -> shape of a state dict, written layer by layer (``linear``, ``conv``, ``norm``)."""

    def linear(self, name: str, out: int, inp: int, bias: bool = True) -> None:
        self[f"{name}.weight"] = (out, inp)
        if bias:
            self[f"{name}.bias"] = (out,)

    def conv(self, name: str, out: int, inp: int, k: int) -> None:
        self[f"{name}.weight"], self[f"{name}.bias"] = (out, inp, k, k), (out,)

    def norm(self, name: str, channels: int) -> None:
        self[f"{name}.weight"], self[f"{name}.bias"] = (channels,), (channels,)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
EMA_PREFIX = "model_ema."
#: The buffers ldm's ``register_schedule`` stores with every LatentDiffusion model.
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")
#: Other bookkeeping an ldm training run may leave in a state dict (fixed, not learned, here).
OTHER_LDM_KEYS = ("logvar", "scale_factor")


def ldm_alphas_cumprod(timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012) -> torch.Tensor:
    """ᾱ_t [T] of ldm's "linear" schedule (β linear in √β, computed in float64, stored as float32):
    what both teachers' configs (``linear_start 0.00085, linear_end 0.0120``) give."""
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def resolve_checkpoint(source: str | Path, filename: str) -> Path:
    """A local file, a local folder holding ``filename``, or a Hub repository id (downloaded, cached)."""
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        if not (path / filename).is_file():
            raise FileNotFoundError(f"{path} has no {filename}")
        return path / filename
    if str(source).count("/") != 1 or path.suffix in (".pt", ".ckpt", ".pth", ".safetensors"):
        raise FileNotFoundError(f"no checkpoint at {source}")
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id=str(source), filename=filename))


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in an ldm checkpoint file (bare, or under ``"state_dict"``), EMA weights applied."""
    try:  # memory-mapped: a 5 GB file is not copied into RAM before the tensors are moved
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # files in the legacy (non-zip) format cannot be memory-mapped
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return apply_ema(obj)


def apply_ema(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace the UNet's weights by their EMA shadows, where a training checkpoint has them.

    ldm's ``LitEma`` names the shadow of ``model.diffusion_model.a.b`` ``model_ema.diffusion_modelab``
    (dots removed); the published teachers are the EMA weights (RichDreamer's loader does the same).
    """
    shadows = {k[len(EMA_PREFIX):]: v for k, v in state_dict.items() if k.startswith(EMA_PREFIX)}
    if not shadows:
        return state_dict
    out = {k: v for k, v in state_dict.items() if not k.startswith(EMA_PREFIX)}
    for key in out:
        if key.startswith(UNET_PREFIX):
            shadow = key[len("model."):].replace(".", "")
            if shadow not in shadows:
                raise ValueError(f"the checkpoint has EMA weights but none for {key} (expected {EMA_PREFIX}{shadow})")
            out[key] = shadows[shadow]
    return out


@dataclass
class LdmCheckpoint:
    """The groups of an ldm state dict (prefixes removed)."""

    unet: dict[str, torch.Tensor]
    vae: dict[str, torch.Tensor]
    text: dict[str, torch.Tensor]
    schedule: dict[str, torch.Tensor]

    @classmethod
    def split(cls, state_dict: dict[str, torch.Tensor], source: str = "the checkpoint") -> "LdmCheckpoint":
        groups = cls({}, {}, {}, {})
        for key, value in state_dict.items():
            for prefix, group in ((UNET_PREFIX, groups.unet), (VAE_PREFIX, groups.vae), (TEXT_PREFIX, groups.text)):
                if key.startswith(prefix):
                    group[key[len(prefix):]] = value
                    break
            else:
                if key not in SCHEDULE_BUFFERS + OTHER_LDM_KEYS:
                    raise ValueError(f"unexpected key in {source}: {key!r} (not part of an ldm multi-view model)")
                groups.schedule[key] = value
        if not groups.unet:
            raise ValueError(f"{source} has no {UNET_PREFIX}* tensors: not an ldm diffusion checkpoint")
        return groups

    def check_schedule(self, alphas_cumprod: torch.Tensor, source: str = "the checkpoint") -> None:
        """The stored ᾱ must be the schedule the teacher computes (a different model otherwise)."""
        stored = self.schedule.get("alphas_cumprod")
        if stored is not None and (stored.shape != alphas_cumprod.shape
                                   or not torch.allclose(stored.float(), alphas_cumprod, atol=1e-6)):
            raise ValueError(f"{source}: its alphas_cumprod is not ldm's linear schedule "
                             "(0.00085 → 0.012, 1000 steps)")


def check_layout(state_dict: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], what: str) -> None:
    """Raise, naming the first key, unless ``state_dict`` has exactly ``expected``'s keys and shapes."""
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise ValueError(f"{what}: missing key {missing[0]!r} ({len(missing)} missing)")
    unexpected = [k for k in state_dict if k not in expected]
    if unexpected:
        raise ValueError(f"{what}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)")
    for key, shape in expected.items():
        if tuple(state_dict[key].shape) != tuple(shape):
            raise ValueError(f"{what}: {key!r} has shape {tuple(state_dict[key].shape)}, expected {tuple(shape)}")


def load_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> nn.Module:
    """Load every tensor into ``module`` (possibly built on the meta device: tensors are assigned)."""
    check_layout(state_dict, {k: tuple(v.shape) for k, v in module.state_dict().items()}, what)
    module.load_state_dict(state_dict, strict=True, assign=True)
    return module


# ---------------------------------------------------------------------------------------------
# The first stage (VAE)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LdmAutoencoderConfig:
    """ldm's ``AutoencoderKL`` (``ddconfig`` and ``embed_dim``); defaults: SD 2.1's, as in MVDream's
    ``sd-v2-base.yaml`` (no attention at any resolution but the middle blocks')."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    out_ch: int = 3
    z_channels: int = 4
    embed_dim: int = 4
    scale_factor: float = 0.18215

    def diffusers_config(self) -> dict:
        """The same network as diffusers' ``AutoencoderKL`` config (diffusers ties z to embed_dim)."""
        if self.z_channels != self.embed_dim:
            raise ValueError("diffusers' AutoencoderKL needs z_channels == embed_dim")
        levels = len(self.ch_mult)
        return dict(in_channels=self.in_channels, out_channels=self.out_ch, latent_channels=self.embed_dim,
                    block_out_channels=[self.ch * m for m in self.ch_mult], layers_per_block=self.num_res_blocks,
                    down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
                    norm_num_groups=32, act_fn="silu", scaling_factor=self.scale_factor)


SD21_AUTOENCODER = LdmAutoencoderConfig()


def autoencoder_layout(config: LdmAutoencoderConfig = SD21_AUTOENCODER) -> dict[str, tuple[int, ...]]:
    """Every tensor of ldm's ``AutoencoderKL`` (keys without ``first_stage_model.``) and its shape,
    derived from the config as ldm's Encoder/Decoder lay it out."""
    c = config
    layout = Layout()
    conv, norm = layout.conv, layout.norm

    def resnet(p, cin, cout):
        norm(f"{p}.norm1", cin)
        conv(f"{p}.conv1", cout, cin, 3)
        norm(f"{p}.norm2", cout)
        conv(f"{p}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{p}.nin_shortcut", cout, cin, 1)

    def middle(p, ch):
        resnet(f"{p}.mid.block_1", ch, ch)
        norm(f"{p}.mid.attn_1.norm", ch)
        for name in ("q", "k", "v", "proj_out"):
            conv(f"{p}.mid.attn_1.{name}", ch, ch, 1)
        resnet(f"{p}.mid.block_2", ch, ch)

    widths = [c.ch * m for m in c.ch_mult]
    conv("encoder.conv_in", c.ch, c.in_channels, 3)
    ch = c.ch
    for level, width in enumerate(widths):
        for i in range(c.num_res_blocks):
            resnet(f"encoder.down.{level}.block.{i}", ch, width)
            ch = width
        if level != len(widths) - 1:
            conv(f"encoder.down.{level}.downsample.conv", ch, ch, 3)
    middle("encoder", ch)
    norm("encoder.norm_out", ch)
    conv("encoder.conv_out", 2 * c.z_channels, ch, 3)
    conv("decoder.conv_in", widths[-1], c.z_channels, 3)
    ch = widths[-1]
    middle("decoder", ch)
    for level in reversed(range(len(widths))):
        for i in range(c.num_res_blocks + 1):
            resnet(f"decoder.up.{level}.block.{i}", ch, widths[level])
            ch = widths[level]
        if level != 0:
            conv(f"decoder.up.{level}.upsample.conv", ch, ch, 3)
    norm("decoder.norm_out", ch)
    conv("decoder.conv_out", c.out_ch, ch, 3)
    conv("quant_conv", 2 * c.embed_dim, 2 * c.z_channels, 1)
    conv("post_quant_conv", c.z_channels, c.embed_dim, 1)
    return dict(layout)


def load_autoencoder(state_dict: dict[str, torch.Tensor], config: LdmAutoencoderConfig = SD21_AUTOENCODER,
                     source: str = "the checkpoint"):
    """diffusers' ``AutoencoderKL`` holding an ldm first stage (keys without ``first_stage_model.``).

    The ldm keys are checked against ``autoencoder_layout`` (strict, naming the first mismatch), renamed
    by diffusers' own converter (``convert_ldm_vae_checkpoint``, the one its single-file loading of SD
    checkpoints uses) and loaded strictly.
    """
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    check_layout(state_dict, autoencoder_layout(config), f"{source}, {VAE_PREFIX}*")
    diffusers_config = config.diffusers_config()
    converted = convert_ldm_vae_checkpoint({VAE_PREFIX + k: v for k, v in state_dict.items()}, diffusers_config)
    with torch.device("meta"):
        vae = AutoencoderKL(**diffusers_config)
    return load_strict(vae, converted, f"{source}, {VAE_PREFIX}* converted to diffusers")


# ---------------------------------------------------------------------------------------------
# The key layout, derived from a config alone
# ---------------------------------------------------------------------------------------------
def unet_layout(config: MultiViewUNetConfig = MVDREAM_SD21) -> dict[str, tuple[int, ...]]:
    """Every tensor of the ldm-layout state dict (without ``model.diffusion_model.``) and its shape,
    derived from the architecture config as ldm's ``MultiViewUNetModel`` lays it out.

    Independent of ``MultiViewUNet`` (which is built from modules): the tests compare the two.
    """
    c, emb = config, config.time_embed_dim
    layout = Layout()
    linear, conv, norm = layout.linear, layout.conv, layout.norm

    def resblock(p, cin, cout):
        norm(f"{p}.in_layers.0", cin)
        conv(f"{p}.in_layers.2", cout, cin, 3)
        linear(f"{p}.emb_layers.1", cout, emb)
        norm(f"{p}.out_layers.0", cout)
        conv(f"{p}.out_layers.3", cout, cout, 3)
        if cin != cout:
            conv(f"{p}.skip_connection", cout, cin, 1)

    def transformer(p, ch):
        norm(f"{p}.norm", ch)
        projection = (lambda n: linear(n, ch, ch)) if c.use_linear_in_transformer else (lambda n: conv(n, ch, ch, 1))
        projection(f"{p}.proj_in")
        for d in range(c.transformer_depth):
            b = f"{p}.transformer_blocks.{d}"
            for attn, kv in (("attn1", ch), ("attn2", c.context_dim)):
                linear(f"{b}.{attn}.to_q", ch, ch, bias=False)
                linear(f"{b}.{attn}.to_k", ch, kv, bias=False)
                linear(f"{b}.{attn}.to_v", ch, kv, bias=False)
                linear(f"{b}.{attn}.to_out.0", ch, ch)
            linear(f"{b}.ff.net.0.proj", 8 * ch, ch)  # GEGLU: value and gate, 4 · ch each
            linear(f"{b}.ff.net.2", ch, 4 * ch)
            for i in (1, 2, 3):
                norm(f"{b}.norm{i}", ch)
        projection(f"{p}.proj_out")

    linear("time_embed.0", emb, c.model_channels)
    linear("time_embed.2", emb, emb)
    linear("camera_embed.0", emb, c.camera_dim)
    linear("camera_embed.2", emb, emb)
    conv("input_blocks.0.0", c.model_channels, c.in_channels, 3)
    skips, ch, ds, index = [c.model_channels], c.model_channels, 1, 1
    widths = [m * c.model_channels for m in c.channel_mult]
    for level, width in enumerate(widths):
        for _ in range(c.num_res_blocks):
            resblock(f"input_blocks.{index}.0", ch, width)
            ch = width
            if ds in c.attention_resolutions:
                transformer(f"input_blocks.{index}.1", ch)
            skips.append(ch)
            index += 1
        if level != len(widths) - 1:
            conv(f"input_blocks.{index}.0.op", ch, ch, 3)
            skips.append(ch)
            index += 1
            ds *= 2
    resblock("middle_block.0", ch, ch)
    transformer("middle_block.1", ch)
    resblock("middle_block.2", ch, ch)
    index = 0
    for level in reversed(range(len(widths))):
        for i in range(c.num_res_blocks + 1):
            resblock(f"output_blocks.{index}.0", ch + skips.pop(), widths[level])
            ch, sub = widths[level], 1
            if ds in c.attention_resolutions:
                transformer(f"output_blocks.{index}.1", ch)
                sub = 2
            if level and i == c.num_res_blocks:
                conv(f"output_blocks.{index}.{sub}.conv", ch, ch, 3)
                ds //= 2
            index += 1
    norm("out.0", ch)
    conv("out.2", c.out_channels, ch, 3)
    return dict(layout)




def read_multiview_unet(checkpoint: str | Path, filename: str, config: MultiViewUNetConfig) -> tuple[MultiViewUNet, "LdmCheckpoint", Path]:
    """A multi-view UNet read strictly from an ldm checkpoint (a local file or folder, or a Hub id),
    its schedule checked; returns (the UNet, on the CPU; the checkpoint's key groups; the file)."""
    path = resolve_checkpoint(checkpoint, filename)
    groups = LdmCheckpoint.split(read_checkpoint(path), str(path))
    groups.check_schedule(ldm_alphas_cumprod(), str(path))
    with torch.device("meta"):
        unet = MultiViewUNet(config)
    load_strict(unet, groups.unet, f"{path}, model.diffusion_model.*")
    return unet, groups, path
