"""Progressive Rendering Distillation, stage 1: the adapter trained from prompts, with 2D teachers.

One iteration (``PRDTrainer.train_step``), as the authors' code runs it:

    latent ← N(0, I)                                  [6P, 4, h, w] for P prompts
    for each t in the inference timesteps [999, 749, 499, 249]:
        x_t  = add_noise(latent, fresh ε, t)          (step 0: pure noise)
        ε̂    = UNet + PETA (x_t, t, prompt)            with gradients into the adapter
        x̂₀   = the scheduler's pred_original_sample
        triplane = VAE decoder + PETA (x̂₀)            unscaled, as at inference
        renders  = mesh and volume renderers, new cameras for every step
        loss_t = (teacher losses + regularisers) / 4;  backward now
        latent = x̂₀.detach()                          no gradient crosses from one step to the one before
    one optimiser step (every ``accumulate`` iterations); gradients averaged across processes

Only the adapter trains (plane LoRA, shared LoRA/LoCON, the VAE's new output conv, the three heads);
Stable Diffusion's own weights and the teacher's are frozen. The pipeline must be loaded with
``fuse_lora=False`` (the shared LoRA stays a separate, trainable term) in float32.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch

from ..adapter import adapter_parameters, adapter_slots
from ..checkpoint import adapter_state_dict, fields_state_dict, read_checkpoint, save_checkpoint
from ..loading import load_adapter_weights
from .cameras import sample_cameras
from .config import TrainConfig, ramp
from .mesh import MeshRenderer
from .teachers import Renders, Teacher
from .volume import NeuSRenderer

logger = logging.getLogger(__name__)


class PRDTrainer:
    """Trains a pipeline's adapter with PRD; see the module docstring.

    Args:
        pipe: a ``TriplaneTurboPipeline`` loaded with ``fuse_lora=False``, float32.
        teachers: the teachers whose losses are summed (stage 1: ``StableDiffusionTeacher``).
        config: the run's settings.
        accelerator: an ``accelerate.Accelerator`` (data parallel across its processes), or None.
    """

    def __init__(self, pipe, teachers: list[Teacher], config: TrainConfig = TrainConfig(), accelerator=None):
        if not any(".lora_A." in name for name, _ in pipe.unet.named_parameters()):
            raise ValueError("load the pipeline with fuse_lora=False to train its adapter")
        if pipe.dtype != torch.float32:
            raise ValueError(f"train in float32 (the authors' precision), not {pipe.dtype}")
        self.pipe, self.teachers, self.config, self.accelerator = pipe, teachers, config, accelerator
        self.step = 0
        self.device = pipe.device
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.generator = torch.Generator()
        pipe.fields.twice_differentiable = True  # the eikonal term differentiates the SDF's gradient
        for module in (pipe.text_encoder, pipe.unet, pipe.vae, pipe.fields):
            module.requires_grad_(False)
        for model in (pipe.unet, pipe.vae):
            for _, param in adapter_parameters(model):
                param.requires_grad_(True)
        pipe.fields.requires_grad_(True)
        if config.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
            pipe.vae.enable_gradient_checkpointing()
        self.parameters = [p for m in (pipe.unet, pipe.vae, pipe.fields) for p in m.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=config.lr, betas=config.betas,
                                           weight_decay=config.weight_decay)
        self.volume = NeuSRenderer(config.volume)
        self.mesh = MeshRenderer(config.mesh)

    # -- one iteration -----------------------------------------------------------------------------
    def timesteps(self) -> torch.Tensor:
        """The unrolled steps: the inference timesteps, [999, 749, 499, 249] for 4 steps."""
        return self.pipe.timesteps(self.pipe.config.num_steps)

    def regulariser_weights(self) -> tuple[float, float]:
        c = self.config
        return (ramp(self.step, *c.eikonal, c.regularisers_until), ramp(self.step, *c.sparsity, c.regularisers_until))

    def train_step(self, prompts: list[str]) -> dict[str, float]:
        """One PRD iteration over ``prompts`` (and an optimiser step every ``accumulate`` iterations).

        Returns the losses of the iteration, summed over the denoising steps.
        """
        pipe, cfg = self.pipe, self.config
        # Noise, cameras, sample jitter and the teacher's timesteps come from (seed, process, step):
        # each process draws its own, and a resumed run draws what the uninterrupted one would have.
        self.generator.manual_seed(((cfg.seed * 1_000_003 + self.rank) * 1_000_033 + self.step) % 2**63)
        with torch.no_grad():
            context = pipe.plane_context(pipe.encode_prompt(prompts).clone())  # [6P, 77, D], no gradient
        scheduler = pipe.scheduler_for(pipe.config.num_steps)
        steps = self.timesteps()
        latent = torch.randn((6 * len(prompts), pipe.unet.config.in_channels, pipe.config.latent_size,
                              pipe.config.latent_size), generator=self.generator).to(self.device)
        eikonal_weight, sparsity_weight = self.regulariser_weights()
        totals: dict[str, float] = {}
        for t in steps:
            noise = torch.randn(latent.shape, generator=self.generator).to(self.device)
            x_t = scheduler.add_noise(latent, noise, t.view(1))
            eps = pipe.predict_noise(x_t, t, context)
            x0 = scheduler.step(eps, int(t), x_t).pred_original_sample
            triplane = pipe.latents_to_triplane(x0).float()
            cameras = sample_cameras(len(prompts), cfg.cameras, self.generator, self.device)
            losses = self._losses(triplane, cameras, prompts, eikonal_weight, sparsity_weight)
            loss = sum(losses.values()) / (len(steps) * cfg.accumulate)
            if self.accelerator is not None:
                self.accelerator.backward(loss)
            else:
                loss.backward()
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + float(value.detach())
            latent = x0.detach()
        self.step += 1
        if self.step % cfg.accumulate == 0:
            self._average_gradients()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        totals["total"] = sum(totals.values())
        return totals

    def _losses(self, triplane, cameras, prompts, eikonal_weight, sparsity_weight) -> dict[str, torch.Tensor]:
        fields, losses = self.pipe.fields, {}
        for renderer in self.config.renderers:
            if renderer == "mesh":
                out = self.mesh.render(fields, triplane, cameras)
                renders = Renders(out.rgb, out.opacity, cameras, "mesh")
            elif renderer == "volume":
                out = self.volume.render(fields, triplane, cameras, self.generator, self.step)
                renders = Renders(out.rgb, out.opacity, cameras, "volume", out.normal, out.depth)
                if eikonal_weight:
                    losses["eikonal"] = eikonal_weight * ((out.sdf_gradients.norm(dim=-1) - 1) ** 2).mean()
                if sparsity_weight:
                    losses["sparsity"] = sparsity_weight * (out.opacity ** 2 + 0.01).sqrt().mean()
            else:
                raise ValueError(f"unknown renderer {renderer!r}")
            for teacher in self.teachers:
                losses[f"{teacher.name}/{renderer}"] = teacher.loss(renders, prompts, self.step, self.generator)
        return losses

    def _average_gradients(self) -> None:
        """Data parallel: every process ends the iteration with the mean of all processes' gradients
        (one all-reduce of all gradients, flattened into one buffer)."""
        if self.accelerator is None or self.accelerator.num_processes == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.parameters]
        flat = self.accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
        for param, piece in zip(self.parameters, flat.split([g.numel() for g in grads])):
            param.grad = piece.view_as(param).clone()

    # -- checkpoints -------------------------------------------------------------------------------
    def adapter_state_dict(self):
        """The adapter in the published layout (``from_pretrained(base, file)`` loads it)."""
        pipe = self.pipe
        return adapter_state_dict(pipe.unet, pipe.vae, pipe.fields, pipe.spec)

    def save(self, folder: str | os.PathLike) -> Path:
        """``folder/step-<n>/``: ``adapter.pth`` (published layout) and ``trainer.pt`` (optimiser state and
        step count), written to a temporary folder first and renamed, so a kill leaves no half."""
        folder = Path(folder)
        final = folder / f"step-{self.step:07d}"
        staging = folder / f".step-{self.step:07d}.partial"
        staging.mkdir(parents=True, exist_ok=True)
        save_checkpoint(staging / "adapter.pth", self.adapter_state_dict(), self.step)
        torch.save({"step": self.step, "optimizer": self.optimizer.state_dict()}, staging / "trainer.pt")
        (staging / "config.json").write_text(json.dumps(asdict(self.config), indent=1))
        if final.exists():
            import shutil

            shutil.rmtree(final)
        os.replace(staging, final)
        return final

    def load(self, checkpoint: str | os.PathLike) -> None:
        """Continue from ``save``'s folder: adapter weights, optimiser state, step count."""
        checkpoint = Path(checkpoint)
        state = read_checkpoint(checkpoint / "adapter.pth")
        pipe = self.pipe
        slots = adapter_slots(pipe.unet, pipe.vae)
        load_adapter_weights(pipe.unet, pipe.vae, slots, state, str(checkpoint))
        pipe.fields.load_state_dict(fields_state_dict(state))
        trainer = torch.load(checkpoint / "trainer.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(trainer["optimizer"])
        self.step = int(trainer["step"])


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The newest complete ``step-<n>`` folder under ``folder``, if any."""
    found = sorted(Path(folder).glob("step-*/trainer.pt"))
    return found[-1].parent if found else None
