"""MVDream as a PRD teacher: the four views of a prompt denoised together, camera-conditioned.

Follows the authors' guidance (theEricMa/TriplaneTurbo @bc047f3, ``custom/triplaneturbo/models/
guidance/richdreamer_mvdream_stablediffusion_asd_guidance.py``, ``_mv_grad_asd``, with
``configs/TriplaneTurbo_v1.yaml``). For the N = B·4 views of B prompts:

    z     = VAE(views resized to 256², in [−1, 1]) posterior sample × 0.18215          [N, 4, 32, 32]
    t     ~ U[min_step, 980), one per prompt, shared by its 4 views; min_step 500 → 20 over 20k steps
    z_t   = √ᾱ z + √(1−ᾱ) ε
    ε_c, ε_u = UNet(z_t, t, prompt | negative prompt, camera, 4 frames)
    ε̂     = ε_u + s (ε_c − ε_u),  s = 20 → 10 linearly over 20k steps
    x̂₁ = (z − √(1−ᾱ) ε̂)/√ᾱ,  x̂₂ = (z − √(1−ᾱ) ε_c)/√ᾱ     (ASD's second branch: t⁺ = t, so ε_c)
    g = (x̂₂ − x̂₁) / (mean|z − x̂₁| + 0.1)  per view ("dmd"),   loss = ½ Σ (z − sg(z − g))² / 4

so ∂loss/∂z = g / 4. The unconditional branch is the authors' long negative prompt, encoded like the
prompt by SD 2.1's text encoder (OpenCLIP-H, penultimate layer + final norm: diffusers' layout of it).

Weights: ``MVDream/MVDream`` on the Hub, ``sd-v2.1-base-4view.pt`` (ldm layout, see ``ldm_checkpoint``).
The UNet and the VAE come from that file (the VAE is SD 2.1's, frozen in MVDream's training; the authors
run the file's own); the text encoder is *not* read from it: the teacher takes SD 2.1's, already
loaded for the Stable Diffusion teacher — the authors do the same (they delete the file's encoder and
use SD 2.1's through their prompt processor), and the file's copy is the same frozen OpenCLIP-H.

This module also holds what RichDreamer's teacher shares: ``PromptEncoder`` and the "dmd" gradient.
"""

from __future__ import annotations

import tempfile
from abc import abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import ramp
from .ldm_checkpoint import (SD21_AUTOENCODER, LdmAutoencoderConfig, ldm_alphas_cumprod, load_autoencoder,
                             read_multiview_unet)
from .multiview_unet import MVDREAM_SD21, MultiViewUNet, MultiViewUNetConfig, normalize_camera
from .prompts import token_ids
from .teachers import Renders, Teacher

MVDREAM_REPO = "MVDream/MVDream"
MVDREAM_FILE = "sd-v2.1-base-4view.pt"
#: The authors' negative prompt for MVDream and RichDreamer (``configs/TriplaneTurbo_v1.yaml``).
NEGATIVE_PROMPT = ("ugly, bad anatomy, blurry, pixelated obscure, unnatural colors, poor lighting, dull, "
                   "and unclear, cropped, lowres, low quality, artifacts, duplicate, morbid, mutilated, "
                   "poorly drawn face, deformed, dehydrated, bad proportions")


@dataclass(frozen=True)
class MVDreamConfig:
    """The MVDream teacher, with the authors' values (``TriplaneTurbo_v1.yaml``, ``guidance.mv_*``)."""

    views: int = 4  # the frames MVDream denoises together (n_view)
    image_size: int = 256  # views are resized to this before the VAE (mv_image_size)
    guidance_scale: tuple[float, float] = (20.0, 10.0)  # CFG, linearly from, to ...
    guidance_until: int = 20_000  # ... over this many steps
    min_step: tuple[float, float] = (0.50, 0.02)  # fraction of T, linearly from, to ...
    min_step_until: int = 20_000  # ... over this many steps
    max_step: float = 0.98
    eps: float = 0.1  # in g = (x̂₂ − x̂₁) / (mean|z − x̂₁| + eps)
    negative_prompt: str = NEGATIVE_PROMPT
    weight: float = 1.0
    #: recompute the VAE encoder's activations in the backward pass (the authors' gradient_checkpoint)
    vae_gradient_checkpointing: bool = True


# ---------------------------------------------------------------------------------------------
# Shared with the RichDreamer teacher
# ---------------------------------------------------------------------------------------------
class PromptEncoder:
    """A frozen CLIP text encoder and its tokenizer: the per-token embeddings [B, 77, D] (the last
    hidden state), as the authors' prompt processors compute them, with a bounded cache.

    Pass the tokenizer and encoder another teacher already loaded to share them (SD 2.1's for the
    Stable Diffusion and MVDream teachers); ``from_pretrained`` loads a diffusers base model's.
    """

    def __init__(self, tokenizer, text_encoder, cache_size: int = 4096):
        self.tokenizer, self.text_encoder, self.cache_size = tokenizer, text_encoder, cache_size
        self.text_encoder.eval().requires_grad_(False)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @classmethod
    def from_pretrained(cls, base: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        **kwargs) -> "PromptEncoder":
        """The ``tokenizer``/``text_encoder`` of a diffusers model: a local folder or a Hub id
        (SD 2.1-base for MVDream, SD 1.5 for RichDreamer)."""
        from transformers import CLIPTextModel, CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", torch_dtype=dtype)
        return cls(tokenizer, text_encoder.to(device), **kwargs)

    @classmethod
    def tiny(cls, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             seed: int = 0) -> "PromptEncoder":
        """A tiny random CLIP text encoder (32 wide) with the tiny byte-level BPE vocabulary."""
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        from ..tiny import TINY_TEXT, write_tokenizer

        with tempfile.TemporaryDirectory(prefix="triplane-turbo-tokenizer-") as folder:
            write_tokenizer(Path(folder))
            tokenizer = CLIPTokenizer.from_pretrained(folder)
        with torch.random.fork_rng(devices=[]):  # transformers initialises from the global RNG
            torch.manual_seed(seed)
            text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **TINY_TEXT))
        return cls(tokenizer, text_encoder.to(device, dtype))

    @property
    def width(self) -> int:
        return self.text_encoder.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    def parameters(self) -> list[torch.Tensor]:
        return list(self.text_encoder.parameters())

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """[B, L, D] embeddings of ``prompts`` (L = the tokenizer's max length)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            # each prompt padded to the max length, then cut to it: the authors' tokenisation (a long
            # prompt loses its end-of-text token, as theirs does)
            ids = token_ids(self.tokenizer, missing, "slice")
            out = self.text_encoder(ids.to(self.device))[0]
            self._cache.update(zip(missing, out))
        for p in prompts:
            self._cache.move_to_end(p)
        embeddings = torch.stack([self._cache[p] for p in prompts])
        while len(self._cache) > self.cache_size:  # a 361k-prompt library would not fit in memory
            self._cache.popitem(last=False)
        return embeddings


def per_prompt(values: torch.Tensor, views: int) -> torch.Tensor:
    """[B, …] → [B·views, …]: one value per prompt, repeated for each of its views."""
    return values.repeat_interleave(views, dim=0)


def dmd_gradient(z: torch.Tensor, eps_guided: torch.Tensor, eps_second: torch.Tensor, alpha_bar: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """The authors' "dmd"-normalised ASD direction g [N, C, H, W] (float32, no gradient).

    x̂₁ = (z − σ ε̂)/α, x̂₂ = (z − σ ε₂)/α with α = √ᾱ_t, σ = √(1−ᾱ_t) of the *first* timestep t
    (also for a second branch predicted at t⁺, as the authors' code does), and z itself in place of
    z_t;
    g = (x̂₂ − x̂₁) / (mean over the view of |z − x̂₁| + eps). ``alpha_bar``: [N].
    """
    alpha_bar = alpha_bar.float().view(-1, 1, 1, 1)
    alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    z = z.detach().float()
    x1 = (z - sigma * eps_guided.float()) / alpha
    x2 = (z - sigma * eps_second.float()) / alpha
    weight = (z - x1).abs().mean(dim=(1, 2, 3), keepdim=True)
    return torch.nan_to_num((x2 - x1) / (weight + eps))


def asd_loss(z: torch.Tensor, grad: torch.Tensor, views: int) -> torch.Tensor:
    """½ Σ (z − sg(z − g))² / views: its gradient with respect to z is g / views."""
    z = z.float()
    return 0.5 * F.mse_loss(z, (z - grad).detach(), reduction="sum") / views


def timestep_bounds(step: int, min_step: tuple[float, float], until: int, max_step: float,
                    num_train_timesteps: int = 1000) -> tuple[int, int]:
    """[low, high) of the timesteps at ``step``: low annealed linearly, as the authors' update_step."""
    low = int(num_train_timesteps * ramp(step, min_step[0], min_step[1], until))
    return low, max(int(num_train_timesteps * max_step), low + 1)


def check_views(renders: Renders, prompts: list[str], views: int, who: str) -> None:
    if renders.cameras.views_per_prompt != views:
        raise ValueError(f"{who} denoises {views} views of a prompt together, got {renders.cameras.views_per_prompt}")
    if len(renders.cameras) != len(prompts) * views:
        raise ValueError(f"{who}: {len(renders.cameras)} views for {len(prompts)} prompts")


# ---------------------------------------------------------------------------------------------
# The teacher
# ---------------------------------------------------------------------------------------------
#: Tiny random models of the same kinds, for tests and ``--tiny`` runs (32-wide text, latents 16²).
TINY_MVDREAM_UNET = MultiViewUNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                        attention_resolutions=(1, 2), num_head_channels=16, context_dim=32)
TINY_AUTOENCODER = LdmAutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
TINY_MVDREAM = MVDreamConfig(image_size=32)


class MultiViewTeacher(Teacher):
    """What MVDream and RichDreamer's teachers share: one t per prompt for its views, one
    camera-conditioned multi-view UNet pass per branch (prompt, negative prompt, and the prompt at t⁺
    where the teacher uses one) and the "dmd"-normalised ASD loss.

    Subclasses set ``unet``, ``text``, ``config`` (``views``, ``negative_prompt``, ``eps``,
    ``weight``, the timestep bounds), ``device``, ``alphas_cumprod`` and ``label``, and say how
    renders become the model's input (``latents``), how cameras become its condition (``camera``),
    the guidance scale at a step and the second timestep.
    """

    label = "multi-view teacher"

    @abstractmethod
    def latents(self, renders: Renders, generator: torch.Generator | None = None) -> torch.Tensor:
        """[N, C, h, w] the model's input made from the renders (differentiable in them)."""

    @abstractmethod
    def camera(self, cameras) -> torch.Tensor:
        """[N, 16] the UNet's camera condition."""

    @abstractmethod
    def guidance_scale(self, step: int) -> float:
        """The classifier-free guidance scale at training step ``step``."""

    def second_timestep(self, t: torch.Tensor, min_step: int, generator) -> torch.Tensor | None:
        """t⁺ [P] for timesteps t [P] (None: t⁺ = t)."""
        return None

    def loss(self, renders, prompts, step, generator=None):
        cfg, views = self.config, self.config.views
        check_views(renders, prompts, views, self.label)
        x = self.latents(renders, generator)
        noise = torch.randn(x.shape, generator=generator).to(self.device)
        low, high = timestep_bounds(step, cfg.min_step, cfg.min_step_until, cfg.max_step)
        t = torch.randint(low, high, (len(prompts),), generator=generator)
        t_second = self.second_timestep(t, low, generator)
        t_second = None if t_second is None else per_prompt(t_second, views).to(self.device)
        grad = self.gradient(x, noise, per_prompt(t, views).to(self.device), t_second,
                             self.camera(renders.cameras).to(self.device), prompts, self.guidance_scale(step))
        return cfg.weight * asd_loss(x, grad, views)

    def gradient(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, t_second: torch.Tensor | None,
                 camera: torch.Tensor, prompts: list[str], guidance_scale: float) -> torch.Tensor:
        """The distillation gradient [N, C, h, w] at x [N, C, h, w] for timesteps t [N] (and t⁺;
        None: t⁺ = t, whose branch is then the prompt's own ε), cameras [N, 16]; no graph."""
        views = self.config.views
        alpha_bar = self.alphas_cumprod[t]

        def noised(a: torch.Tensor) -> torch.Tensor:
            return a.sqrt().view(-1, 1, 1, 1) * x + (1 - a).sqrt().view(-1, 1, 1, 1) * noise

        with torch.no_grad():
            cond = per_prompt(self.text(prompts), views)
            uncond = per_prompt(self.text([self.config.negative_prompt] * len(prompts)), views)
            inputs, steps, context = [noised(alpha_bar)] * 2, [t, t], [cond, uncond]
            if t_second is not None:
                inputs, steps, context = inputs + [noised(self.alphas_cumprod[t_second])], steps + [t_second], \
                    context + [cond]
            eps = self.unet(torch.cat(inputs), torch.cat(steps), torch.cat(context).to(self.device),
                            camera=torch.cat([camera] * len(inputs)), num_frames=views).float().chunk(len(inputs))
            eps_guided = eps[1] + guidance_scale * (eps[0] - eps[1])
            return dmd_gradient(x, eps_guided, eps[-1] if t_second is not None else eps[0], alpha_bar, self.config.eps)


class MVDreamTeacher(MultiViewTeacher):
    """MVDream (``sd-v2.1-base-4view``) as a teacher; see the module docstring for the loss.

    Args:
        unet: the multi-view UNet (``MultiViewUNet``), weights loaded.
        vae: SD 2.1's VAE as a diffusers ``AutoencoderKL`` (the one in MVDream's file).
        text: SD 2.1's text encoder (``PromptEncoder``), shared with the Stable Diffusion teacher.
        config: the authors' values by default.
        device, dtype: where the UNet and VAE run (float16 on CUDA); the text encoder stays as given.
    """

    name, label = "mvdream", "MVDream"

    def __init__(self, unet: MultiViewUNet, vae, text: PromptEncoder, config: MVDreamConfig = MVDreamConfig(),
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        if text.width != unet.config.context_dim:
            raise ValueError(f"the text encoder is {text.width} wide, the UNet expects {unet.config.context_dim}")
        self.config, self.device, self.dtype = config, torch.device(device), dtype
        self.unet, self.vae, self.text = unet, vae, text
        for module in (unet, vae):
            torch.nn.Module.to(module, self.device, dtype)
            module.eval().requires_grad_(False)
        if config.vae_gradient_checkpointing:
            vae.enable_gradient_checkpointing()
        self.alphas_cumprod = ldm_alphas_cumprod().to(self.device)

    @classmethod
    def from_pretrained(cls, text: PromptEncoder, checkpoint: str | Path = MVDREAM_REPO,
                        filename: str = MVDREAM_FILE, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, config: MVDreamConfig = MVDreamConfig(),
                        unet_config: MultiViewUNetConfig = MVDREAM_SD21,
                        vae_config: LdmAutoencoderConfig = SD21_AUTOENCODER) -> "MVDreamTeacher":
        """Read ``sd-v2.1-base-4view.pt`` (a local file or folder, or a Hub id) strictly: the UNet and
        the VAE from it, the text encoder given (see the module docstring)."""
        unet, groups, path = read_multiview_unet(checkpoint, filename, unet_config)
        vae = load_autoencoder(groups.vae, vae_config, str(path))
        return cls(unet, vae, text, config, device, dtype)

    @classmethod
    def tiny(cls, text: PromptEncoder | None = None, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, config: MVDreamConfig = TINY_MVDREAM,
             seed: int = 0) -> "MVDreamTeacher":
        """Tiny random models of every kind (UNet, VAE, text encoder unless given), offline."""
        from diffusers import AutoencoderKL

        text = text or PromptEncoder.tiny(device, dtype, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = MultiViewUNet(replace(TINY_MVDREAM_UNET, context_dim=text.width))
            vae = AutoencoderKL(**TINY_AUTOENCODER.diffusers_config())
        return cls(unet, vae, text, config, device, dtype)

    def frozen_parameters(self):
        return [*self.unet.parameters(), *self.vae.parameters(), *self.text.parameters()]

    def guidance_scale(self, step: int) -> float:
        return ramp(step, *self.config.guidance_scale, self.config.guidance_until)

    def latents(self, renders: Renders, generator: torch.Generator | None = None) -> torch.Tensor:
        """z [N, 4, s/8, s/8] (float32, differentiable in ``renders.rgb``): each view resized to
        ``image_size``² and encoded, a posterior sample × the VAE's scaling factor."""
        size = self.config.image_size
        images = F.interpolate(renders.rgb, (size, size), mode="bilinear", align_corners=False)
        posterior = self.vae.encode((images * 2 - 1).to(self.device, self.dtype)).latent_dist
        sample = torch.randn(posterior.mean.shape, generator=generator).to(self.device, self.dtype)
        return ((posterior.mean + posterior.std * sample) * self.vae.config.scaling_factor).float()

    def camera(self, cameras) -> torch.Tensor:
        # t⁺ = t for MVDream in the published config (mv_plus_ratio 0): the second branch is ε_c
        return normalize_camera(cameras.c2w)
