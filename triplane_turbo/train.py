"""Command line for PRD training: ``python -m triplane_turbo.train --prompts SOURCE --steps N --output DIR``.

    python -m triplane_turbo.train --prompts furniture.txt --steps 3000 --output runs/furniture
    accelerate launch --multi_gpu --num_processes 8 -m triplane_turbo.train --prompts ZhiyuanthePony/TriplaneTrubo \\
        --from-scratch --steps 15000 --output runs/a
    python -m triplane_turbo.train --tiny --recipe sd --prompts p.txt --steps 3 --output /tmp/run   # CPU smoke test

Fine-tunes the published adapter (or ``--adapter``; ``--from-scratch``: a freshly initialised one, as
the authors train) with the teachers of ``--recipe`` (default ``authors-v1``: MVDream + RichDreamer's
normal-depth model + SD 2.1, weight 1 each) or ``--teachers``/``--teacher-weights``, and writes,
under DIR: ``checkpoints/checkpoint_<n>/`` (accelerate's ``save_state``: optimiser, RNG states, the
trained tensors and ``adapter.pth`` in the published layout; the newest ``--keep`` are kept),
``adapter.pth`` (the latest: ``TriplaneTurboPipeline.from_pretrained(base, "DIR/adapter.pth")`` loads
it), ``log.jsonl`` (every loss of every iteration), ``previews/step-<n>.png`` and, with TensorBoard
installed, ``logs/`` (loss curves and previews). The same command again continues from the newest
complete checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import cli

logger = logging.getLogger(__name__)

#: Optimiser steps of the authors' full run (``trainer.max_steps`` in configs/TriplaneTurbo_v1.yaml):
#: where the schedules of a fine-tuning run of the published adapter start by default.
AUTHORS_RUN_STEPS = 15_000
#: Optimiser steps of learning-rate warm-up when fine-tuning (the optimiser state starts empty).
FINE_TUNE_WARMUP = 100


def build_parser() -> argparse.ArgumentParser:
    from .training.presets import PRESETS
    from .training.recipes import DEFAULT_RECIPE, RECIPES, TEACHER_NAMES

    parser = argparse.ArgumentParser(prog="python -m triplane_turbo.train",
                                     description="Train the TriplaneTurbo adapter on your prompts with PRD "
                                                 "(Progressive Rendering Distillation from 2D teachers).")
    parser.add_argument("--prompts", required=True,
                        help="a text file (one prompt per line), a JSON prompt library ({\"train\": [...]}), or a "
                             "Hub dataset id[:file] (the authors' captions: ZhiyuanthePony/TriplaneTrubo)")
    parser.add_argument("--steps", type=int, default=None,
                        help="train until this many optimiser steps in total (required unless --preset gives it)")
    parser.add_argument("--output", type=Path, required=True, help="the run's folder (created; resumed if it holds one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts-per-step", type=int, default=None,
                        help="prompts per iteration and process (default 2, or the preset's)")
    parser.add_argument("--views", type=int, default=4, help="cameras per prompt and denoising step")
    parser.add_argument("--accumulate", type=int, default=None, help="iterations per optimiser step (default 1, "
                                                                     "or the preset's)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="; ".join(f"{p.name}: {p.summary}" for p in PRESETS.values()) + " (explicit options win)")
    parser.add_argument("--parallel-guidance", action="store_true",
                        help="the authors' parallel_guidance (their 98 GB command): the SD teacher reads opposite "
                             "views of the mesh and the volume render")
    parser.add_argument("--renderers", default="mesh,volume", help="comma-separated: mesh, volume")
    parser.add_argument("--save-every", type=int, default=500, help="checkpoint every N optimiser steps (and at the end)")
    parser.add_argument("--keep", type=int, default=2, help="checkpoints kept (the newest; default 2)")
    parser.add_argument("--preview-every", type=int, default=500,
                        help="a preview picture every N optimiser steps (0: never)")
    evaluation = parser.add_argument_group("evaluation (the paper's CLIP score and R@1, python -m triplane_turbo.evaluate)")
    evaluation.add_argument("--eval-every", type=int, default=0,
                            help="evaluate every N optimiser steps, into DIR/eval/step-<n>/ (0: never)")
    evaluation.add_argument("--eval-prompts", type=Path, default=None,
                            help="the evaluation's prompts: a text file or the authors' JSON library (its test list)")
    evaluation.add_argument("--clip", default=None,
                            help="CLIP model (default openai/clip-vit-base-patch32; --tiny: a tiny random one)")
    teach = parser.add_argument_group("teachers")
    teach.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                       help="; ".join(f"{r.name}: {r.summary}" for r in RECIPES.values()) + f" (default {DEFAULT_RECIPE})")
    teach.add_argument("--teachers", default=None, help=f"instead of a recipe: comma-separated, from {', '.join(TEACHER_NAMES)}")
    teach.add_argument("--teacher-weights", default=None, help="the teachers' loss weights, comma-separated (default 1 each)")
    teach.add_argument("--mvdream-weights", default=None, help="MVDream's weights: Hub id or local path")
    teach.add_argument("--richdreamer-weights", default=None,
                       help="RichDreamer's normal-depth weights (nd_mv_ema.ckpt, published on ModelScope): local path "
                            "or Hub id")
    teach.add_argument("--richdreamer-text-encoder", default=None,
                       help="SD 1.5 (Hub id or folder) whose CLIP-L text encoder RichDreamer reads "
                            "(default sd-legacy/stable-diffusion-v1-5)")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--lr", type=float, default=2e-4, help="the adapter's learning rate (Adan, as the authors)")
    optim.add_argument("--background-lr", type=float, default=2e-4, help="the learned background's learning rate")
    optim.add_argument("--optimizer", choices=("adan", "adamw"), default="adan")
    optim.add_argument("--from-scratch", action="store_true",
                       help="start from a freshly initialised adapter (the authors' initialisation) instead of "
                            "fine-tuning the published one")
    optim.add_argument("--schedule-start", type=int, default=None,
                       help="the schedules' step at the start (default: the end of the authors' run, "
                            f"{AUTHORS_RUN_STEPS}, when fine-tuning; 0 from scratch)")
    optim.add_argument("--warmup", type=int, default=None,
                       help=f"optimiser steps of learning-rate warm-up (default {FINE_TUNE_WARMUP} when fine-tuning, "
                            "0 from scratch)")
    optim.add_argument("--no-background", action="store_true", help="a plain white background instead of the learned one")
    sizes = parser.add_argument_group("render sizes (smaller: less GPU memory)")
    sizes.add_argument("--image-size", type=int, default=None, help="mesh renders' side (default 512)")
    sizes.add_argument("--grid", type=int, default=None, help="the mesh path's marching-cubes grid (default 128)")
    sizes.add_argument("--rays", type=int, default=None, help="volume renders' side (default 128)")
    sizes.add_argument("--global-rays", type=int, default=None,
                       help="the volume renderer's whole-view pass side (default 42; 0: every ray at full size)")
    sizes.add_argument("--patch-rays", type=int, default=None, help="its full-resolution patch side (default 40)")
    sizes.add_argument("--samples", type=int, default=None, help="stratified samples per ray (default 128)")
    sizes.add_argument("--importance-samples", type=int, default=None, help="importance samples per ray (default 64)")
    sizes.add_argument("--teacher-size", type=int, default=None, help="the SD teacher's image side (default 512)")
    cli.add_mesh_options(parser, resolution=96, texture="vertex", title="mesh (the preview pictures)")
    cli.add_model_options(parser, dtype_help="every teacher's precision (auto: the authors' per teacher, see "
                                             "--teacher-dtypes); the adapter itself always trains in float32")
    teach.add_argument("--teacher-dtypes", default=None,
                       help="per teacher, e.g. sd=float16,mvdream=float32 (default, as the authors on a GPU: SD 2.1 in "
                            "float16, MVDream and RichDreamer in float32; everything float32 on the CPU)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    from .training.presets import PRESETS
    from .training.recipes import DEFAULT_RECIPE, RECIPES, parse_teachers, teacher_dtypes

    parser = build_parser()
    args = parser.parse_args(argv)
    args.preset_values = preset = PRESETS.get(args.preset)
    defaults = {"prompts_per_step": 2, "accumulate": 1}  # a preset's values, else the authors' v1 run's
    if preset is not None:
        defaults = {name: getattr(preset, name) for name in ("steps", "prompts_per_step", "accumulate")}
    for name, value in defaults.items():
        if getattr(args, name) is None:  # given explicitly: it wins
            setattr(args, name, value)
    if args.steps is None:
        parser.error("--steps is required (or a --preset that gives it)")
    for name in ("steps", "prompts_per_step", "views", "accumulate", "save_every", "keep"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("image_size", "grid", "rays", "samples", "teacher_size"):
        if getattr(args, name) is not None and getattr(args, name) < 2:
            parser.error(f"--{name.replace('_', '-')} must be at least 2")
    for name in ("global_rays", "patch_rays", "importance_samples", "schedule_start", "warmup", "preview_every",
                 "eval_every"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative")
    renderers = tuple(r.strip() for r in args.renderers.split(",") if r.strip())
    if not renderers or set(renderers) - {"mesh", "volume"}:
        parser.error("--renderers takes mesh, volume or both")
    args.renderers = renderers
    if args.eval_every and args.eval_prompts is None:
        parser.error("--eval-every needs --eval-prompts")
    if args.recipe and args.teachers:
        parser.error("--recipe and --teachers exclude each other")
    if args.teacher_weights and not args.teachers:
        parser.error("--teacher-weights goes with --teachers")
    try:
        args.teacher_specs = parse_teachers(args.teachers, args.teacher_weights) if args.teachers \
            else RECIPES[args.recipe or DEFAULT_RECIPE].teachers
        teacher_dtypes([spec.name for spec in args.teacher_specs], "cuda", args.teacher_dtypes)
    except ValueError as exc:
        parser.error(str(exc))
    # the authors' recipes slice long prompts as their prompt processors; ``sd`` keeps the end token
    args.prompt_tokens = "slice" if args.teachers else RECIPES[args.recipe or DEFAULT_RECIPE].prompt_tokens
    return args


def train_config(args: argparse.Namespace):
    """The run's ``TrainConfig`` from the command line (``--tiny``: sizes for a CPU)."""
    from dataclasses import replace

    from .training import TrainConfig
    from .training.config import TINY_TRAINING, BackgroundConfig, CameraConfig, OptimizerConfig
    from .training.presets import apply_preset

    base = TrainConfig(**TINY_TRAINING) if args.tiny else TrainConfig()
    if args.preset_values is not None:
        base = apply_preset(base, args.preset_values)
    volume = replace(base.volume, **{k: v for k, v in dict(
        rays=args.rays, global_rays=args.global_rays, patch_rays=args.patch_rays, coarse_samples=args.samples,
        fine_samples=args.importance_samples).items() if v is not None})
    mesh = replace(base.mesh, **{k: v for k, v in dict(image=args.image_size, grid=args.grid).items() if v is not None})
    guidance = replace(base.guidance, prompt_tokens=args.prompt_tokens,
                       **({"image_size": args.teacher_size} if args.teacher_size else {}))
    fine_tuning = not args.from_scratch
    warmup = args.warmup if args.warmup is not None else (FINE_TUNE_WARMUP if fine_tuning else 0)
    schedule_start = args.schedule_start if args.schedule_start is not None else (AUTHORS_RUN_STEPS if fine_tuning else 0)
    return replace(base, steps=args.steps, prompts_per_step=args.prompts_per_step, accumulate=args.accumulate,
                   schedule_start=schedule_start, seed=args.seed, renderers=args.renderers,
                   parallel_guidance=args.parallel_guidance or base.parallel_guidance, prompt_tokens=args.prompt_tokens,
                   learned_background=not args.no_background, cameras=CameraConfig(views=args.views),
                   optimizer=OptimizerConfig(name=args.optimizer, lr=args.lr, warmup=warmup),
                   background=replace(base.background if args.tiny else BackgroundConfig(), lr=args.background_lr),
                   volume=volume, mesh=mesh, guidance=guidance)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    from .training.prompts import read_prompts
    from .training.recipes import TeacherUnavailableError, teacher_sources

    sources = {"mvdream": args.mvdream_weights, "richdreamer": args.richdreamer_weights,
               "richdreamer-text": args.richdreamer_text_encoder}
    try:
        teacher_sources(args.teacher_specs, sources, args.tiny)  # every teacher's module and weights named
        prompts = read_prompts(args.prompts)
    except TeacherUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, gather_object

    from .training import PRDTrainer, build_teachers, latest_checkpoint
    from .training.monitor import (Evaluation, log_image, save_preview, tensorboard_installed, tracker_config,
                                   truncate_log)
    from .training.prd import ddp_kwargs

    device, use_cpu = cli.process_device(args.device)
    teacher_dtype = resolve_teacher_dtypes(args, device.type)
    config = train_config(args)
    trackers = "tensorboard" if tensorboard_installed() else None
    scratch = tempfile.TemporaryDirectory(prefix="triplane-turbo-train-") if args.tiny else None
    try:
        weights, spec = resolve_weights(args, scratch)  # before the process group (see batch.py)
    except cli.loading_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    accelerator = Accelerator(cpu=use_cpu, log_with=trackers, kwargs_handlers=[ddp_kwargs(config)],
                              project_config=ProjectConfiguration(project_dir=str(args.output), logging_dir=str(
                                  args.output / "logs"), automatic_checkpoint_naming=True, total_limit=args.keep))
    try:
        pipe = load_pipeline(args, weights, spec, device)
        teachers = build_teachers(args.teacher_specs, base_dir=weights.base_dir, device=device, dtype=teacher_dtype,
                                  guidance=config.guidance, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                  sources=sources, tiny=args.tiny, settings=teacher_settings(args))
    except (*cli.loading_errors(), TeacherUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    trainer = PRDTrainer(pipe, teachers, config, accelerator)
    args.output.mkdir(parents=True, exist_ok=True)
    log = args.output / "log.jsonl"
    if (resume := latest_checkpoint(args.output)) is not None:
        trainer.load_state(resume)
        if accelerator.is_main_process:
            truncate_log(log, trainer.iteration)  # iterations after the checkpoint are done again
            print(f"resuming from {resume} (step {trainer.optimizer_steps})", file=sys.stderr)
    accelerator.init_trackers("prd", config=tracker_config(args, config))
    evaluation = Evaluation(args, accelerator, scratch) if args.eval_every else None
    prompt_generator = torch.Generator()
    from tqdm.auto import tqdm

    bar = tqdm(total=args.steps, initial=trainer.optimizer_steps, desc="PRD", unit="step",
               disable=args.quiet or not accelerator.is_main_process)
    while trainer.optimizer_steps < args.steps:
        prompt_generator.manual_seed((args.seed * 1_000_003 + trainer.iteration) * 101 + accelerator.process_index)
        chosen = [prompts[int(i)] for i in torch.randint(len(prompts), (config.prompts_per_step,), generator=prompt_generator)]
        start = time.perf_counter()
        schedule_step = trainer.schedule_step
        losses = trainer.train_step(chosen)
        seconds = time.perf_counter() - start
        by_process = gather_object([chosen]) if accelerator.num_processes > 1 else [chosen]
        stepped = trainer.iteration % config.accumulate == 0
        if accelerator.is_main_process:
            record = {"iteration": trainer.iteration, "step": trainer.optimizer_steps, "schedule_step": schedule_step,
                      "seconds": round(seconds, 3), "prompts": by_process, **{k: round(v, 6) for k, v in losses.items()}}
            with open(log, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            accelerator.log({f"loss/{k}": v for k, v in losses.items()} | {"seconds": seconds}, step=trainer.iteration)
            if stepped:
                bar.update(1)
            bar.set_postfix(loss=f"{losses['total']:.4g}")
            if stepped and args.preview_every and trainer.optimizer_steps % args.preview_every == 0:
                image = save_preview(pipe, prompts[0], args.output / "previews" / f"step-{trainer.optimizer_steps:07d}.png",
                                     args)
                log_image(accelerator, image, trainer.iteration)
        if evaluation is not None and stepped and trainer.optimizer_steps % args.eval_every == 0:
            evaluation.run(pipe, trainer, log)
        if stepped and (trainer.optimizer_steps % args.save_every == 0 or trainer.optimizer_steps == args.steps):
            checkpoint = trainer.save_state()
            if accelerator.is_main_process:
                shutil.copyfile(checkpoint / "adapter.pth", args.output / ".adapter.pth.tmp")
                os.replace(args.output / ".adapter.pth.tmp", args.output / "adapter.pth")
            accelerator.wait_for_everyone()
    bar.close()
    in_sync = parameters_in_sync(trainer, accelerator)
    accelerator.end_training()
    if accelerator.is_main_process:
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": trainer.optimizer_steps, "finished": True,
                                     "processes": accelerator.num_processes, "in_sync": in_sync}) + "\n")
        print(f"{args.output / 'adapter.pth'}: adapter after {trainer.optimizer_steps} steps "
              f"({accelerator.num_processes} process{'es' * (accelerator.num_processes > 1)})")
    if scratch is not None:
        scratch.cleanup()
    return 0


def teacher_settings(args: argparse.Namespace) -> dict[str, dict]:
    """The multi-view teachers' config values a ``--preset`` sets (none without one)."""
    from .training.presets import teacher_settings as preset_settings

    return preset_settings(args.preset_values) if args.preset_values is not None else {}


def resolve_teacher_dtypes(args: argparse.Namespace, device_type: str) -> dict:
    """Each teacher's dtype: the authors' (float16 SD 2.1, float32 MVDream and RichDreamer) on CUDA,
    float32 elsewhere; ``--dtype`` sets every teacher's, ``--teacher-dtypes`` single ones."""
    from .training.recipes import teacher_dtypes

    names = [spec.name for spec in args.teacher_specs]
    dtypes = teacher_dtypes(names, device_type, None if args.dtype == "auto" else args.dtype)
    if args.teacher_dtypes and "=" not in args.teacher_dtypes:
        return teacher_dtypes(names, device_type, args.teacher_dtypes)
    if args.teacher_dtypes:
        named = teacher_dtypes(names, device_type, args.teacher_dtypes)
        given = {item.partition("=")[0].strip() for item in args.teacher_dtypes.split(",")}
        dtypes.update({name: dtype for name, dtype in named.items() if name in given})
    return dtypes


def resolve_weights(args: argparse.Namespace, scratch):
    """The weights on disk (downloaded if needed; ``--tiny``: written to ``scratch``) and the adapter's
    hyper-parameters for ``--from-scratch``."""
    from . import WeightSources, hub
    from .adapter import AdapterSpec
    from .training.init import PUBLISHED_SPEC

    if args.tiny:
        from .tiny import ADAPTER_RANKS, write_tiny_model

        base_dir, adapter_file = write_tiny_model(scratch.name)
        return hub.ResolvedWeights(base_dir, adapter_file, "tiny"), AdapterSpec(out_channels=16, mlp_hidden=(16, 16),
                                                                                **ADAPTER_RANKS)
    sources = WeightSources.resolve(args.base_model, args.adapter)
    if args.from_scratch:  # the base model only
        base_dir, variant = hub.resolve_base_model(sources.base_model)
        return hub.ResolvedWeights(base_dir, base_dir, "scratch", variant), PUBLISHED_SPEC
    return hub.resolve(sources.base_model, sources.adapter, sources.adapter_filename), PUBLISHED_SPEC


def load_pipeline(args: argparse.Namespace, weights, spec, device):
    """The float32 pipeline to train (unfused LoRA): the published adapter, ``--adapter``, or with
    ``--from-scratch`` a freshly initialised one."""
    import torch

    from . import TriplaneTurboPipeline
    from .config import GenerationConfig
    from .loading import components_from_resolved
    from .training.config import TINY_TRAINING_LATENT
    from .training.init import fresh_adapter_state_dict

    generation = GenerationConfig(latent_size=TINY_TRAINING_LATENT) if args.tiny else GenerationConfig()
    if args.from_scratch:
        parts = components_from_resolved(weights)
        fresh = fresh_adapter_state_dict(parts["unet"], parts["vae"], spec, args.seed)
        pipe = TriplaneTurboPipeline.from_components(**parts, adapter_state_dict=fresh, source="fresh adapter",
                                                     fuse_lora=False, config=generation)
        pipe.to(device, torch.float32)
    else:
        pipe = TriplaneTurboPipeline.from_resolved(weights, device=device, dtype=torch.float32, fuse_lora=False,
                                                   config=generation)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parameters_in_sync(trainer, accelerator) -> bool:
    """Whether every process holds the same adapter and background (data parallel: they must)."""
    import torch

    checksum = torch.stack([p.detach().double().sum() for p in trainer.trainable_parameters]).sum().reshape(1)
    gathered = accelerator.gather(checksum.to(accelerator.device))
    return bool(torch.allclose(gathered, gathered[:1].expand_as(gathered), rtol=1e-9, atol=0))


if __name__ == "__main__":
    sys.exit(main())
