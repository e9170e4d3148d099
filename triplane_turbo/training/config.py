"""Typed configuration of PRD training, with the authors' values as defaults.

Sources: the authors' ``configs/TriplaneTurbo_v1.yaml`` and the code it configures (theEricMa/
TriplaneTurbo @bc047f3); see docs/TRAINING.md for what each value does and what is left out.
Schedules (``*_until``) count optimiser steps, as the authors' (Lightning's ``global_step``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


def ramp(step: int, start_value: float, end_value: float, end_step: int, start_step: int = 0) -> float:
    """A value moving linearly from ``start_value`` (at ``start_step``) to ``end_value`` (at ``end_step``)."""
    if step <= start_step:
        return start_value
    if step >= end_step:
        return end_value
    return start_value + (end_value - start_value) * (step - start_step) / (end_step - start_step)


@dataclass(frozen=True)
class CameraConfig:
    """Cameras per prompt and step: ``views`` azimuths evenly spaced from a random start, one random
    elevation and distance per prompt, looking at the origin, up +z."""

    views: int = 4
    elevation_degrees: tuple[float, float] = (0.0, 30.0)
    fovy_degrees: float = 60.0
    #: distance / (1 / tan(fovy / 2)): 0.8-1.0 gives 1.39-1.73 world units at 60°.
    relative_distance: tuple[float, float] = (0.8, 1.0)


@dataclass(frozen=True)
class VolumeConfig:
    """The NeuS volume renderer: fixed sharpness, proposal + importance samples, global + patch rays."""

    inv_s: float = 100.0  # exp(10 * 0.4605): fixed, not learned
    near: float = 0.1
    far: float = 4.0
    coarse_samples: int = 128
    fine_samples: int = 64
    #: the proposal pass's NeuS step (None: the authors' render_step_size, 1.732 · 2 · radius /
    #: fine_samples with radius 1: 0.054 at 64; threestudio's neus_volume_renderer.py:84-86)
    proposal_step: float | None = None
    rays: int = 128  # the image side the loss sees
    global_rays: int = 42  # the whole view, rendered at 42² and upsampled ...
    patch_rays: int = 40  # ... with one 40² full-resolution patch pasted in (same place in every view)
    #: the plain background where no learned background is given (evaluation, tests)
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    #: the colour field's gradient through this renderer, scaled from 1 down to 0.01 over 20k steps
    #: (texture is learned mostly through the mesh path); the forward value is unchanged
    color_grad_scale: tuple[float, float] = (1.0, 0.01)
    color_grad_until: int = 20_000

    @property
    def proposal_step_size(self) -> float:
        """The step the proposal pass's opacity assumes (``proposal_step``, else the authors' rule)."""
        if self.proposal_step is not None:
            return self.proposal_step
        return 1.732 * 2 * 1.0 / max(self.fine_samples, 1)


@dataclass(frozen=True)
class MeshConfig:
    """The mesh path: marching cubes on a grid, rasterised; SDF and deformation gradients shrunk."""

    grid: int = 128
    image: int = 512
    grad_scale: float = 0.001  # geometry is learned mostly through the volume renderer
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)  # where no learned background is given
    #: an SDF without a zero crossing on the grid gets one, as the authors' renderer does (after
    #: InstantMesh): the centre grid point is pushed below zero and a two-point border shell above
    force_surface: bool = True
    #: nvdiffrast's silhouette antialiasing (visibility gradients at silhouettes)
    antialias: bool = True
    #: when no view of an object sees its surface, its whole first view counts as covered (the
    #: authors' ``mask[:1] = True``), so the colour field still gets a gradient
    empty_view_fallback: bool = True


@dataclass(frozen=True)
class BackgroundConfig:
    """The learned, text-conditioned background (the authors' hash-grid environment map)."""

    levels: int = 8
    features_per_level: int = 2
    log2_table: int = 19
    base_resolution: int = 4
    level_scale: float = 1.8114473285278132  # finest level 256
    hidden: int = 64
    eval_color: tuple[float, float, float] = (1.0, 1.0, 1.0)
    lr: float = 2e-4


@dataclass(frozen=True)
class OptimizerConfig:
    """Adan as the authors (no weight decay, no scheduler, no clipping); "adamw" for comparison."""

    name: str = "adan"
    lr: float = 2e-4
    betas: tuple[float, ...] = (0.98, 0.92, 0.99)
    eps: float = 1e-15
    weight_decay: float = 0.0
    #: optimiser steps of linear learning-rate warm-up (0: none, as the authors from scratch; the
    #: command line uses a short one when fine-tuning a trained adapter with a fresh optimiser state)
    warmup: int = 0


@dataclass(frozen=True)
class GuidanceConfig:
    """The Stable Diffusion teacher's score distillation ("dmd"-normalised ASD)."""

    guidance_scale: float = 7.5
    image_size: int = 512
    min_step: tuple[float, float] = (0.50, 0.02)  # fraction of T, annealed linearly ...
    min_step_until: int = 20_000  # ... over this many steps
    max_step: float = 0.98
    eps: float = 0.1  # in g = (x̂₂ − x̂₁) / (mean|z − x̂₁| + eps)
    weight: float = 1.0
    #: how prompts become tokens ("slice": the authors', "truncate": keeps the end token; prompts.token_ids)
    prompt_tokens: str = "slice"


@dataclass(frozen=True)
class TrainConfig:
    """One PRD run."""

    steps: int = 15_000  # optimiser steps (the authors' max_steps)
    prompts_per_step: int = 2
    accumulate: int = 1  # iterations per optimiser step
    #: the schedules' step at the start of training: they read ``schedule_start + optimiser steps``
    #: (the command line starts at the end of the authors' run when fine-tuning the published adapter)
    schedule_start: int = 0
    seed: int = 0
    renderers: tuple[str, ...] = ("mesh", "volume")
    eikonal: tuple[float, float] = (1.0, 0.0)  # weight from, to ...
    sparsity: tuple[float, float] = (1.0, 0.0)
    regularisers_until: int = 20_000  # ... over this many steps
    gradient_checkpointing: bool = True
    #: the learned background in both renderers (False: the renderers' plain white)
    learned_background: bool = True
    #: how prompts become tokens for the generator and the background ("slice": the authors' prompt
    #: processors, a long prompt loses its end token; "truncate": the tokenizer's; prompts.token_ids)
    prompt_tokens: str = "slice"
    #: the authors' ``parallel_guidance`` (their 98 GB command): the SD teacher reads a random view of
    #: the mesh render and the opposite view of the volume render (``training.presets``)
    parallel_guidance: bool = False
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    background: BackgroundConfig = field(default_factory=BackgroundConfig)
    cameras: CameraConfig = field(default_factory=CameraConfig)
    volume: VolumeConfig = field(default_factory=VolumeConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)


#: Latent side of each plane when training the tiny model (--tiny; the tiny demo generates at 16): 8²
#: latents, 16² planes, a quarter of the pixels for the UNet and the decoder to push gradients through.
TINY_TRAINING_LATENT = 8

#: Sizes small enough for the tiny model on a CPU (tests, --tiny): same code, fewer pixels and samples.
TINY_TRAINING = dict(
    volume=VolumeConfig(coarse_samples=16, fine_samples=8, rays=24, global_rays=12, patch_rays=8),
    mesh=MeshConfig(grid=24, image=32),
    guidance=GuidanceConfig(image_size=64),
    background=BackgroundConfig(levels=4, log2_table=12, hidden=16),
)
