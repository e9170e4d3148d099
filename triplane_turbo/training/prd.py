"""Progressive Rendering Distillation: the adapter trained from prompts, with 2D teachers.

One iteration (``PRDTrainer.train_step``), as the authors' code runs it:

    latent ← N(0, I)                                  [6P, 4, h, w] for P prompts
    for each t in the inference timesteps [999, 749, 499, 249]:
        x_t  = add_noise(latent, fresh ε, t)          (step 0: pure noise)
        ε̂    = UNet + PETA (x_t, t, prompt)            with gradients into the adapter
        x̂₀   = the scheduler's pred_original_sample
        triplane = VAE decoder + PETA (x̂₀)            unscaled, as at inference
        renders  = mesh and volume renderers over the learned background, new cameras every step
        loss_t = (weighted teacher losses + regularisers) / 4;  backward now
        latent = x̂₀.detach()                          no gradient crosses from one step to the one before
    one optimiser step (Adan) every ``accumulate`` iterations

Data parallel through accelerate: ``PRDModel`` (the trainable modules; its forward is one denoising
step, renders and losses included) goes through ``accelerator.prepare`` (torch DDP), the first three
backward passes of an iteration run under ``accelerator.no_sync`` and the fourth synchronises the
accumulated gradients (with ``accumulate`` > 1 only the last backward before the optimiser step
does). Checkpoints are ``accelerator.save_state`` folders (optimiser, RNG states, the step counters)
holding the trainable weights and, beside them, the adapter in the published layout.

Schedules (the teachers' timesteps and guidance, the regularisers' weights, the colour gradient's
scale) read the *schedule step*: ``config.schedule_start`` plus the optimiser steps taken.

Only the adapter trains (plane LoRA, shared LoRA/LoCON, the VAE's new output conv, the three heads),
plus the learned background; Stable Diffusion's own weights and the teachers' are frozen. The pipeline
must be loaded with ``fuse_lora=False`` (the shared LoRA stays a separate, trainable term) in float32.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ..adapter import adapter_parameters
from ..checkpoint import adapter_state_dict, save_checkpoint
from .background import LearnedBackground
from .cameras import sample_cameras
from .config import OptimizerConfig, TrainConfig, ramp
from .mesh import MeshRenderer
from .optim import Adan
from .prompts import token_ids
from .teachers import Renders, Teacher
from .volume import NeuSRenderer

logger = logging.getLogger(__name__)

#: Files of a checkpoint folder besides accelerate's own.
TRAINABLE_FILE = "trainable.pt"  # every trained tensor (adapter, heads, background), for resuming
ADAPTER_FILE = "adapter.pth"  # the adapter in the published layout (``from_pretrained`` loads it)
COMPLETE_FILE = "complete"  # written last: a folder without it was interrupted


class PRDModel(nn.Module):
    """The trainable modules of a run (UNet and VAE with their adapter, the heads, the background), so
    that accelerate can wrap them for data parallelism; ``forward`` is the trainer's denoising step."""

    def __init__(self, pipe, background: LearnedBackground | None, step):
        super().__init__()
        self.unet, self.vae, self.fields = pipe.unet, pipe.vae, pipe.fields
        self.background = background
        object.__setattr__(self, "_step", step)  # a bound method of the trainer, not a submodule

    def forward(self, x_t: torch.Tensor, t: torch.Tensor):
        return self._step(x_t, t)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Every trained tensor, keyed by its name in this module, on the CPU."""
        return {name: p.detach().cpu().clone() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        trainable = {name: p for name, p in self.named_parameters() if p.requires_grad}
        missing = sorted(set(trainable) - set(state))
        extra = sorted(set(state) - set(trainable))
        if missing or extra:
            raise ValueError(f"{source}: the trained tensors do not match this run "
                             f"({'missing ' + missing[0] if missing else 'unexpected ' + extra[0]})")
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(state[name])


class TrainerState:
    """The counters a checkpoint restores (registered with ``accelerator.register_for_checkpointing``)."""

    def __init__(self):
        self.iteration = 0
        self.optimizer_steps = 0

    def state_dict(self) -> dict[str, int]:
        return {"iteration": self.iteration, "optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.iteration, self.optimizer_steps = int(state["iteration"]), int(state["optimizer_steps"])


def make_optimizer(groups: list[dict], config: OptimizerConfig) -> torch.optim.Optimizer:
    """Adan with the authors' betas and eps (default), or AdamW for comparison."""
    if config.name == "adan":
        return Adan(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay)
    if config.name == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas[:2]), eps=config.eps,
                                 weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimiser {config.name!r} (adan, adamw)")


def ddp_kwargs(config: TrainConfig):
    """accelerate's DDP settings for a run: buffers never change (no broadcast each forward); without
    the mesh renderer the deformation head gets no gradient, which DDP must be told."""
    from accelerate.utils import DistributedDataParallelKwargs

    return DistributedDataParallelKwargs(broadcast_buffers=False,
                                         find_unused_parameters="mesh" not in config.renderers)


class PRDTrainer:
    """Trains a pipeline's adapter with PRD; see the module docstring.

    Args:
        pipe: a ``TriplaneTurboPipeline`` loaded with ``fuse_lora=False``, float32.
        teachers: the teachers whose losses are summed (weighted: ``recipes.build_teachers``).
        config: the run's settings.
        accelerator: an ``accelerate.Accelerator`` (data parallel across its processes, checkpoints),
            or None (one process, no checkpoints).
    """

    def __init__(self, pipe, teachers: list[Teacher], config: TrainConfig = TrainConfig(), accelerator=None):
        if not any(".lora_A." in name for name, _ in pipe.unet.named_parameters()):
            raise ValueError("load the pipeline with fuse_lora=False to train its adapter")
        if pipe.dtype != torch.float32:
            raise ValueError(f"train in float32 (the authors' precision), not {pipe.dtype}")
        self.pipe, self.teachers, self.config, self.accelerator = pipe, teachers, config, accelerator
        self.state = TrainerState()
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
        self.background = None
        if config.learned_background:
            with torch.random.fork_rng(devices=[]):  # its initialisation comes from the seed alone
                torch.manual_seed(config.seed)
                self.background = LearnedBackground(pipe.text_encoder.config.hidden_size, config.background)
            self.background.to(self.device).train()
        self.model = PRDModel(pipe, self.background, self._denoising_step)
        self.parameters = [p for m in (pipe.unet, pipe.vae, pipe.fields) for p in m.parameters() if p.requires_grad]
        groups = [{"params": self.parameters, "lr": config.optimizer.lr}]
        if self.background is not None:
            groups.append({"params": list(self.background.parameters()), "lr": config.background.lr})
        self.optimizer = make_optimizer(groups, config.optimizer)
        self._base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.volume = NeuSRenderer(config.volume)
        self.mesh = MeshRenderer(config.mesh)
        self._inputs: dict = {}
        if accelerator is not None:
            self.model, self.optimizer = accelerator.prepare(self.model, self.optimizer)
            accelerator.register_for_checkpointing(self.state)
            accelerator.register_save_state_pre_hook(self._save_hook)
            accelerator.register_load_state_pre_hook(self._load_hook)

    # -- counters ----------------------------------------------------------------------------------
    @property
    def iteration(self) -> int:
        return self.state.iteration

    @property
    def optimizer_steps(self) -> int:
        return self.state.optimizer_steps

    @property
    def schedule_step(self) -> int:
        """What the schedules read: the configured start plus the optimiser steps taken."""
        return self.config.schedule_start + self.state.optimizer_steps

    @property
    def trainable_parameters(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    # -- one iteration -----------------------------------------------------------------------------
    def timesteps(self) -> torch.Tensor:
        """The unrolled steps: the inference timesteps, [999, 749, 499, 249] for 4 steps."""
        return self.pipe.timesteps(self.pipe.config.num_steps)

    def regulariser_weights(self) -> tuple[float, float]:
        c, step = self.config, self.schedule_step
        return ramp(step, *c.eikonal, c.regularisers_until), ramp(step, *c.sparsity, c.regularisers_until)

    def learning_rate_factor(self) -> float:
        """Linear warm-up over ``optimizer.warmup`` optimiser steps (1 without one)."""
        warmup = self.config.optimizer.warmup
        return min(1.0, (self.state.optimizer_steps + 1) / warmup) if warmup else 1.0

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """SD 2.1's text encoder: the per-token embeddings [P, 77, D] (the UNet's context) and the
        pooled embedding [P, D] (the background's condition, as the authors' ``text_embed_bg``); the
        tokens as ``config.prompt_tokens`` says (the authors' recipes: sliced, as their processors)."""
        pipe = self.pipe
        ids = token_ids(pipe.tokenizer, prompts, self.config.prompt_tokens)
        out = pipe.text_encoder(ids.to(self.device))
        return out.last_hidden_state.clone(), out.pooler_output.clone()

    def train_step(self, prompts: list[str]) -> dict[str, float]:
        """One PRD iteration over ``prompts`` (and an optimiser step every ``accumulate`` iterations).

        Returns the losses of the iteration, summed over the denoising steps.
        """
        pipe, cfg, accelerator = self.pipe, self.config, self.accelerator
        # Noise, cameras, sample jitter and the teachers' timesteps come from (seed, process, iteration):
        # each process draws its own, and a resumed run draws what the uninterrupted one would have.
        self.generator.manual_seed(((cfg.seed * 1_000_003 + self.rank) * 1_000_033 + self.state.iteration) % 2**63)
        hidden, pooled = self.encode_prompts(prompts)
        context = pipe.plane_context(hidden)  # [6P, 77, D], no gradient
        scheduler = pipe.scheduler_for(pipe.config.num_steps)
        steps = self.timesteps()
        latent = torch.randn((6 * len(prompts), pipe.unet.config.in_channels, pipe.config.latent_size,
                              pipe.config.latent_size), generator=self.generator).to(self.device)
        eikonal_weight, sparsity_weight = self.regulariser_weights()
        background = self.background.bind(pooled) if self.background is not None else None
        self._inputs = dict(context=context, prompts=prompts, scheduler=scheduler, background=background,
                            weights=(eikonal_weight, sparsity_weight), schedule_step=self.schedule_step)
        optimizer_step = (self.state.iteration + 1) % cfg.accumulate == 0
        totals: dict[str, float] = {}
        for i, t in enumerate(steps):
            noise = torch.randn(latent.shape, generator=self.generator).to(self.device)
            x_t = scheduler.add_noise(latent, noise, t.view(1))
            # DDP: only the last backward before an optimiser step all-reduces the (accumulated) gradients
            sync = optimizer_step and i == len(steps) - 1
            no_sync = accelerator.no_sync(self.model) if accelerator is not None and not sync else contextlib.nullcontext()
            with no_sync:
                losses, x0 = self.model(x_t, t)
                loss = sum(losses.values()) / (len(steps) * cfg.accumulate)
                if accelerator is not None:
                    accelerator.backward(loss)
                else:
                    loss.backward()
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + float(value.detach())
            latent = x0.detach()
        self._inputs = {}
        self.state.iteration += 1
        if optimizer_step:
            factor = self.learning_rate_factor()
            for group, base in zip(self.optimizer.param_groups, self._base_lrs):
                group["lr"] = base * factor
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.state.optimizer_steps += 1
        totals["total"] = sum(totals.values())
        return totals

    def _denoising_step(self, x_t: torch.Tensor, t: torch.Tensor):
        """PRDModel's forward: x_t -> ε̂ -> x̂₀ -> triplane -> renders -> losses (and x̂₀)."""
        pipe, inputs = self.pipe, self._inputs
        eps = pipe.predict_noise(x_t, t, inputs["context"])
        x0 = inputs["scheduler"].step(eps, int(t), x_t).pred_original_sample
        triplane = pipe.latents_to_triplane(x0).float()
        cameras = sample_cameras(len(inputs["prompts"]), self.config.cameras, self.generator, self.device)
        return self._losses(triplane, cameras), x0

    def _losses(self, triplane, cameras) -> dict[str, torch.Tensor]:
        fields, inputs, losses = self.pipe.fields, self._inputs, {}
        eikonal_weight, sparsity_weight = inputs["weights"]
        step, prompts, background = inputs["schedule_step"], inputs["prompts"], inputs["background"]
        sd_views = {}
        if self.config.parallel_guidance:
            # the authors' parallel guidance (richdreamer_mvdream_stablediffusion_asd_guidance.py:1677-1684,
            # sd_oppo_side): SD reads a random view of the mesh render and the opposite one of the volume render
            views = cameras.views_per_prompt
            first = torch.randint(0, views, (len(prompts),), generator=self.generator)
            sd_views = {"mesh": first, "volume": (first + views // 2) % views}
        for renderer in self.config.renderers:
            if renderer == "mesh":
                out = self.mesh.render(fields, triplane, cameras, background)
            elif renderer == "volume":
                out = self.volume.render(fields, triplane, cameras, self.generator, step, background)
                if eikonal_weight:
                    losses["eikonal"] = eikonal_weight * ((out.sdf_gradients.norm(dim=-1) - 1) ** 2).mean()
                if sparsity_weight:
                    losses["sparsity"] = sparsity_weight * (out.opacity ** 2 + 0.01).sqrt().mean()
            else:
                raise ValueError(f"unknown renderer {renderer!r}")
            renders = Renders(out.rgb, out.opacity, cameras, renderer, out.normal, out.depth,
                              getattr(out, "clip_depth", None), sd_views.get(renderer))
            for teacher in self.teachers:
                losses[f"{teacher.name}/{renderer}"] = teacher.loss(renders, prompts, step, self.generator)
        return losses

    # -- checkpoints -------------------------------------------------------------------------------
    def adapter_state_dict(self):
        """The adapter in the published layout (``from_pretrained(base, file)`` loads it)."""
        pipe = self.pipe
        return adapter_state_dict(pipe.unet, pipe.vae, pipe.fields, pipe.spec)

    def _unwrapped(self) -> PRDModel:
        return self.accelerator.unwrap_model(self.model) if self.accelerator is not None else self.model

    def _save_hook(self, models, weights, output_dir) -> None:
        # accelerate would write the whole UNet and VAE (gigabytes of frozen weights): write the
        # trained tensors instead, and the published adapter beside them. (``models`` is the
        # accelerator's own list here: only its weights entry is dropped.)
        unwrapped = [self.accelerator.unwrap_model(m) for m in models]
        if self._unwrapped() in unwrapped:
            weights.pop(unwrapped.index(self._unwrapped()))
        if self.accelerator.is_main_process:
            torch.save(self._unwrapped().trainable_state_dict(), Path(output_dir) / TRAINABLE_FILE)
            save_checkpoint(Path(output_dir) / ADAPTER_FILE, self.adapter_state_dict(), self.state.optimizer_steps)

    def _load_hook(self, models, input_dir) -> None:
        unwrapped = [self.accelerator.unwrap_model(m) for m in models]
        if self._unwrapped() in unwrapped:
            models.pop(unwrapped.index(self._unwrapped()))
        path = Path(input_dir) / TRAINABLE_FILE
        state = torch.load(path, map_location="cpu", weights_only=True)
        self._unwrapped().load_trainable_state_dict(state, str(path))

    def save_state(self) -> Path:
        """``accelerator.save_state``: a numbered folder under ``<project>/checkpoints`` (the oldest
        beyond the total limit removed) with the optimiser, RNG states and counters, the trained
        tensors and the published adapter; marked complete once every process has written."""
        if self.accelerator is None:
            raise RuntimeError("checkpoints need an accelerate.Accelerator")
        folder = Path(self.accelerator.save_state())
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            (folder / COMPLETE_FILE).write_text(f"{self.state.optimizer_steps}\n")
        self.accelerator.wait_for_everyone()
        return folder

    def load_state(self, folder: str | os.PathLike) -> None:
        """Continue from ``save_state``'s folder: weights, optimiser, RNG states, counters; later
        saves continue its numbering. Folders after it (a save that a kill interrupted) are removed
        first: accelerate would count them against the total limit, delete the good checkpoints to
        make room, then refuse to write over them."""
        if self.accelerator is None:
            raise RuntimeError("checkpoints need an accelerate.Accelerator")
        folder = Path(folder)
        if self.accelerator.is_main_process:
            for later in folder.parent.glob("checkpoint_*"):
                if checkpoint_number(later) > checkpoint_number(folder):
                    shutil.rmtree(later)
        self.accelerator.wait_for_everyone()
        self.accelerator.load_state(str(folder))
        self.accelerator.project_configuration.iteration = checkpoint_number(folder) + 1


def checkpoint_number(folder: Path) -> int:
    return int(Path(folder).name.rsplit("_", 1)[-1])


def latest_checkpoint(project_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``checkpoints/checkpoint_<n>`` folder under ``project_dir``, if any."""
    root = Path(project_dir) / "checkpoints"
    found = [p for p in root.glob("checkpoint_*") if (p / COMPLETE_FILE).is_file()] if root.is_dir() else []
    return max(found, key=checkpoint_number) if found else None
