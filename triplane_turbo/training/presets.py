"""The authors' training configurations as presets (``--preset``): the values their config files set.

The authors' script (theEricMa/TriplaneTurbo @bc047f3, ``scripts/train/TriplaneTurbo_v1_Objaverse.sh``)
lists one command per GPU size, each on 8 GPUs:

* ``authors-80gb`` (lines 10-16): ``configs/TriplaneTurbo_v1.yaml`` as it is — 2 prompts × 4 views per
  GPU (``data.batch_size: 8``, line 8), no accumulation, 15k optimiser steps (``trainer.max_steps``,
  line 248), every schedule over 20k steps, RichDreamer's ``rd_plus_ratio: 0.1`` (line 192). These are
  this package's defaults.
* ``authors-98gb`` (lines 1-8): the same config with ``system.parallel_guidance=true``: the two
  renders of a step go through the teachers in one batched call, and the Stable Diffusion teacher
  reads a random view of the mesh render and the *opposite* view of the volume render
  (``sd_oppo_side: true``, line 183;
  ``richdreamer_mvdream_stablediffusion_asd_guidance.py:1677-1684``). Without it each render gets its own
  random view. (Here the teachers still run once per render: their batched call draws t per prompt
  and render and fresh noise for each, as separate calls do, so only the SD view pairing differs.)
* ``authors-48gb`` (lines 18-24): ``configs/TriplaneTurbo_v1_acc-2.yaml``: 1 prompt × 4 views per GPU
  (``batch_size: 4``, line 8), 2 iterations per optimiser step (``system.gradient_accumulation_steps:
  2``, line 60), 30k optimiser steps (line 248), every min-step, regulariser and colour-gradient
  schedule stretched to 40k steps (lines 139, 156, 165, 177, 226, 229), ``rd_plus_ratio: 0.`` (line
  192). MVDream's guidance-scale schedule stays at 20k steps (``mv_guidance_scale: [0, 20., 10.,
  20000]``, line 161, unchanged in that file).

Their schedules read Lightning's ``global_step``, which counts optimiser steps under their manual
optimisation (``opt.step()`` every ``gradient_accumulation_steps`` batches, system file lines 536-544),
as ours do.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .config import TrainConfig


@dataclass(frozen=True)
class Preset:
    """One of the authors' configurations (see the module docstring for the lines they come from).

    Attributes:
        steps: optimiser steps (``trainer.max_steps``).
        prompts_per_step: prompts per iteration and process (``data.batch_size`` / 4 views).
        accumulate: iterations per optimiser step (``system.gradient_accumulation_steps``).
        schedule_until: the end of every min-step (SD, MVDream, RichDreamer), regulariser (eikonal,
            sparsity) and colour-gradient schedule.
        rd_plus_ratio: RichDreamer's ASD t⁺ ratio.
        parallel_guidance: the SD teacher reads opposite views of the two renders.
    """

    name: str
    summary: str
    steps: int = 15_000
    prompts_per_step: int = 2
    accumulate: int = 1
    schedule_until: int = 20_000
    rd_plus_ratio: float = 0.1
    parallel_guidance: bool = False


PRESETS: dict[str, Preset] = {
    "authors-80gb": Preset("authors-80gb", "configs/TriplaneTurbo_v1.yaml, 8 GPUs of 80 GB (the defaults)"),
    "authors-98gb": Preset("authors-98gb", "configs/TriplaneTurbo_v1.yaml with system.parallel_guidance=true, "
                                           "8 GPUs of 98 GB", parallel_guidance=True),
    "authors-48gb": Preset("authors-48gb", "configs/TriplaneTurbo_v1_acc-2.yaml, 8 GPUs of 48 GB: 1 prompt per "
                                           "step, accumulation 2, 30k steps, schedules over 40k, rd_plus_ratio 0",
                           steps=30_000, prompts_per_step=1, accumulate=2, schedule_until=40_000, rd_plus_ratio=0.0),
}


def apply_preset(config: TrainConfig, preset: Preset) -> TrainConfig:
    """``config`` with the preset's steps, batch, accumulation, schedules and guidance mode (the
    teachers' own schedules: ``teacher_settings``)."""
    until = preset.schedule_until
    return replace(config, steps=preset.steps, prompts_per_step=preset.prompts_per_step,
                   accumulate=preset.accumulate, regularisers_until=until, parallel_guidance=preset.parallel_guidance,
                   volume=replace(config.volume, color_grad_until=until),
                   guidance=replace(config.guidance, min_step_until=until))


def teacher_settings(preset: Preset) -> dict[str, dict]:
    """The preset's values of the multi-view teachers' configs (``recipes.build_teachers(settings=...)``);
    the SD teacher reads ``TrainConfig.guidance``."""
    return {"mvdream": {"min_step_until": preset.schedule_until},
            "richdreamer": {"min_step_until": preset.schedule_until, "plus_ratio": preset.rd_plus_ratio}}


__all__ = ["PRESETS", "Preset", "apply_preset", "teacher_settings"]
