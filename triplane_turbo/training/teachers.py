"""Teachers: what turns rendered views into a loss. Here: Stable Diffusion 2.1 (score distillation)
and, for tests and sanity checks, a fixed target image; MVDream and RichDreamer's normal-depth model
implement the same interface in ``mvdream.py`` / ``richdreamer.py`` (``recipes.py`` finds them).
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .cameras import Cameras
from .config import GuidanceConfig, ramp
from .prompts import token_ids


@dataclass
class Renders:
    """What one renderer produced for a step: N = B·V views of B prompts, images row 0 at the top.

    Both renderers fill every field, with one convention, so that a teacher composites them the same
    way whichever renderer drew them: ``normal`` and ``depth`` are *premultiplied* by the coverage.
    Over a background b (e.g. RichDreamer's normal background (0.5, 0.5, 1)) a picture of the normals
    in camera space is ``(R·normal + opacity) / 2 + b · (1 − opacity)`` with R = ``camera_rotation()``
    (world -> camera); the distance is ``depth / opacity`` where opacity > 0. For the mesh path these
    equal the antialiased composites of the unpremultiplied images exactly (antialiasing is linear).

    Attributes:
        rgb: [N, 3, H, W] in [0, 1], composited over the background.
        opacity: [N, 1, H, W] coverage in [0, 1].
        cameras: the cameras of the N views (``views_per_prompt`` consecutive ones per prompt).
        renderer: "mesh" or "volume".
        normal: [N, 3, H, W] world-space unit surface normals (outward) times the opacity.
        depth: [N, 1, H, W] distance from the camera along the pixel's ray times the opacity.
            (Both renderers fill ``normal`` and ``depth``; None only in renders made by hand.)
        clip_depth: [N, 1, H, W] the mesh path's clip-space z times the opacity (what the authors'
            mesh renderer gives RichDreamer as its depth); None for the volume renderer.
        sd_views: [B] the view of each prompt the Stable Diffusion teacher reads (``parallel_guidance``:
            the volume render's is opposite the mesh render's); None: the teacher draws one.
    """

    rgb: torch.Tensor
    opacity: torch.Tensor
    cameras: Cameras
    renderer: str
    normal: torch.Tensor | None = None
    depth: torch.Tensor | None = None
    clip_depth: torch.Tensor | None = None
    sd_views: torch.Tensor | None = None

    def camera_rotation(self) -> torch.Tensor:
        """[N, 3, 3] world -> camera rotations (OpenGL camera axes: x right, y up, z backwards)."""
        return self.cameras.c2w[:, :3, :3].transpose(1, 2)

    def camera_normal(self) -> torch.Tensor:
        """[N, 3, H, W] the normals in each view's camera axes (still premultiplied by the opacity)."""
        return torch.einsum("nij,njhw->nihw", self.camera_rotation().to(self.normal), self.normal)


class Teacher(ABC):
    """Maps a step's renders of some prompts to a scalar loss (gradients flow into ``renders``)."""

    name: str = "teacher"

    @abstractmethod
    def loss(self, renders: Renders, prompts: list[str], step: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """A scalar for the renders of ``prompts``; ``step`` is the schedule step (the run's optimiser
        steps plus its ``schedule_start``), which the teacher's own schedules read."""

    def frozen_parameters(self) -> list[torch.Tensor]:
        """The teacher's own weights (they must not change): none by default."""
        return []


class FixedImageTeacher(Teacher):
    """Pulls every view towards one target image (mean squared error): a check that gradients from
    the renders reach the adapter, not a way to learn shapes."""

    name = "fixed-image"

    def __init__(self, target: torch.Tensor, weight: float = 1.0):
        self.target, self.weight = target, weight  # [3, H, W] in [0, 1]

    def loss(self, renders, prompts, step, generator=None):
        target = F.interpolate(self.target[None].to(renders.rgb), renders.rgb.shape[-2:], mode="bilinear",
                               align_corners=False)
        return self.weight * ((renders.rgb - target) ** 2).mean()


class StableDiffusionTeacher(Teacher):
    """Stable Diffusion 2.1-base as the teacher, with the authors' "dmd"-normalised score distillation.

    For each prompt one of its views (chosen at random) is resized to ``image_size``² and encoded by
    the VAE (a posterior sample × 0.18215): z. With t ~ U[min_step, max_step) (min_step annealed from
    500 to 20 over 20k steps), fresh noise ε, z_t = √ᾱ z + √(1−ᾱ) ε, and the UNet's predictions with the
    prompt (ε_c) and with the empty prompt (ε_u)::

        ε̂ = ε_u + 7.5 (ε_c − ε_u)
        x̂₁ = (z − √(1−ᾱ) ε̂) / √ᾱ,   x̂₂ = (z − √(1−ᾱ) ε_c) / √ᾱ      (the clean z, as the authors' code)
        g = (x̂₂ − x̂₁) / (mean|z − x̂₁| + 0.1),   loss = ½ Σ (z − sg(z − g))²

    so that ∂loss/∂z = g. (ASD's second timestep t⁺ is t for this teacher in the published config.)
    The teacher's weights never change; its UNet runs without gradients.
    """

    name = "stable-diffusion"

    def __init__(self, base_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 config: GuidanceConfig = GuidanceConfig(), *, text_encoder=None, tokenizer=None):
        """``text_encoder``/``tokenizer``: an already-loaded SD 2.1 text encoder to share (the
        pipeline's: the same frozen weights), instead of loading a second copy."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        base = Path(base_dir)
        self.config, self.device, self.dtype = config, torch.device(device), dtype
        self.tokenizer = tokenizer or CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
        self.shares_text_encoder = text_encoder is not None
        self.text_encoder = text_encoder or CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
        self.unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
        self.vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
        if scheduler.config.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError("the Stable Diffusion teacher needs an epsilon-predicting model (SD 2.1-base)")
        self.alphas_cumprod = scheduler.alphas_cumprod.to(self.device)
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        own = (self.unet, self.vae) if self.shares_text_encoder else (self.text_encoder, self.unet, self.vae)
        for module in own:
            torch.nn.Module.to(module, self.device, dtype)
            module.eval().requires_grad_(False)
        self._embeddings: dict[str, torch.Tensor] = {}

    def frozen_parameters(self):
        return [p for m in (self.text_encoder, self.unet, self.vae) for p in m.parameters()]

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        """[B, 77, D] text embeddings, cached per prompt (tokens: ``config.prompt_tokens``)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._embeddings]
        if missing:
            ids = token_ids(self.tokenizer, missing, self.config.prompt_tokens)
            out = self.text_encoder(ids.to(self.text_encoder.device))[0]
            self._embeddings.update(zip(missing, out.to(self.device, self.dtype)))
        return torch.stack([self._embeddings[p] for p in prompts])

    def min_step(self, step: int) -> int:
        start, end = self.config.min_step
        return int(self.num_train_timesteps * ramp(step, start, end, self.config.min_step_until))

    def loss(self, renders, prompts, step, generator=None):
        cfg = self.config
        views = renders.cameras.views_per_prompt
        chosen = renders.sd_views.cpu() if renders.sd_views is not None else \
            torch.randint(0, views, (len(prompts),), generator=generator)
        chosen = chosen + torch.arange(len(prompts)) * views
        images = F.interpolate(renders.rgb[chosen.to(renders.rgb.device)], (cfg.image_size, cfg.image_size),
                               mode="bilinear", align_corners=False)
        posterior = self.vae.encode((images * 2 - 1).to(self.dtype)).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(self.device, self.dtype)
        z = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(
            self.device, self.dtype)) * self.vae.config.scaling_factor
        low, high = self.min_step(step), int(self.num_train_timesteps * cfg.max_step)
        t = torch.randint(low, max(high, low + 1), (len(prompts),), generator=generator).to(self.device)
        alpha_bar = self.alphas_cumprod[t].to(z.dtype).view(-1, 1, 1, 1)
        alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        with torch.no_grad():
            z_t = alpha * z.detach() + sigma * noise
            context = torch.cat([self.embed([""] * len(prompts)), self.embed(prompts)]).to(self.dtype)
            eps = self.unet(torch.cat([z_t, z_t]), torch.cat([t, t]), encoder_hidden_states=context).sample
            eps_uncond, eps_cond = eps.chunk(2)
            eps_guided = eps_uncond + cfg.guidance_scale * (eps_cond - eps_uncond)
            x1 = (z.detach() - sigma * eps_guided) / alpha
            x2 = (z.detach() - sigma * eps_cond) / alpha
            weight = (z.detach() - x1).abs().mean(dim=(1, 2, 3), keepdim=True)
            g = torch.nan_to_num((x2 - x1) / (weight + cfg.eps))
        target = (z - g).detach()
        return cfg.weight * 0.5 * F.mse_loss(z.float(), target.float(), reduction="sum")
