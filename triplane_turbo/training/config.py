"""Typed configuration of PRD training, stage 1, with the authors' values as defaults.

Sources: the authors' ``configs/TriplaneTurbo_v1.yaml`` and the code it configures (theEricMa/
TriplaneTurbo @bc047f3); see docs/TRAINING.md for what each value does and what stage 1 leaves out.
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
    rays: int = 128  # the image side the loss sees
    global_rays: int = 42  # the whole view, rendered at 42² and upsampled ...
    patch_rays: int = 40  # ... with one 40² full-resolution patch pasted in (same place in every view)
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    #: the colour field's gradient through this renderer, scaled from 1 down to 0.01 over 20k steps
    #: (texture is learned mostly through the mesh path); the forward value is unchanged
    color_grad_scale: tuple[float, float] = (1.0, 0.01)
    color_grad_until: int = 20_000


@dataclass(frozen=True)
class MeshConfig:
    """The mesh path: marching cubes on a grid, rasterised; SDF and deformation gradients shrunk."""

    grid: int = 128
    image: int = 512
    grad_scale: float = 0.001  # geometry is learned mostly through the volume renderer
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)


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


@dataclass(frozen=True)
class TrainConfig:
    """One PRD run (stage 1)."""

    steps: int = 15_000
    prompts_per_step: int = 2
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    accumulate: int = 1  # iterations per optimiser step
    seed: int = 0
    renderers: tuple[str, ...] = ("mesh", "volume")
    eikonal: tuple[float, float] = (1.0, 0.0)  # weight from, to ...
    sparsity: tuple[float, float] = (1.0, 0.0)
    regularisers_until: int = 20_000  # ... over this many steps
    gradient_checkpointing: bool = True
    cameras: CameraConfig = field(default_factory=CameraConfig)
    volume: VolumeConfig = field(default_factory=VolumeConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)


#: Sizes small enough for the tiny model on a CPU (tests, --tiny): same code, fewer pixels and samples.
TINY_TRAINING = dict(
    volume=VolumeConfig(coarse_samples=16, fine_samples=8, rays=24, global_rays=12, patch_rays=8),
    mesh=MeshConfig(grid=24, image=32),
    guidance=GuidanceConfig(image_size=64),
)
