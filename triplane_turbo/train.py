"""Command line for PRD training, stage 1: ``python -m triplane_turbo.train --prompts FILE --steps N --output DIR``.

    python -m triplane_turbo.train --prompts furniture.txt --steps 3000 --output runs/furniture
    accelerate launch --multi_gpu --num_processes 8 -m triplane_turbo.train --prompts p.txt --steps 15000 --output runs/a
    python -m triplane_turbo.train --tiny --prompts p.txt --steps 3 --output /tmp/run   # CPU smoke test

Starts from the published adapter (or ``--adapter``), teaches it with Stable Diffusion 2.1 (the base
model, a frozen copy) and writes, under DIR: ``step-<n>/adapter.pth`` (the published key layout, so
``TriplaneTurboPipeline.from_pretrained(base, "DIR/adapter.pth")`` loads it) with the optimiser state
beside it, ``adapter.pth`` (the latest), ``log.jsonl`` (losses per step) and ``previews/step-<n>.png``.
The same command again continues from the newest ``step-<n>``.
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m triplane_turbo.train",
                                     description="Fine-tune the TriplaneTurbo adapter on your prompts with PRD "
                                                 "(stage 1: Stable Diffusion 2.1 as the teacher).")
    parser.add_argument("--prompts", type=Path, required=True, help="a UTF-8 text file, one prompt per line")
    parser.add_argument("--steps", type=int, required=True, help="train until this many iterations in total")
    parser.add_argument("--output", type=Path, required=True, help="the run's folder (created; resumed if it holds one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--prompts-per-step", type=int, default=2, help="prompts per iteration and process")
    parser.add_argument("--views", type=int, default=4, help="cameras per prompt and denoising step")
    parser.add_argument("--accumulate", type=int, default=1, help="iterations per optimiser step")
    parser.add_argument("--renderers", default="mesh,volume", help="comma-separated: mesh, volume")
    parser.add_argument("--save-every", type=int, default=500, help="checkpoint every N iterations (and at the end)")
    parser.add_argument("--keep", type=int, default=2, help="checkpoints kept (the newest; default 2)")
    parser.add_argument("--preview-every", type=int, default=500, help="a preview picture every N iterations (0: never)")
    cli.add_mesh_options(parser, resolution=96, texture="vertex", title="mesh (the preview pictures)")
    cli.add_model_options(parser, dtype_help="the teachers' precision (auto: float16 on a GPU, else float32); the "
                                             "adapter itself always trains in float32")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("steps", "prompts_per_step", "views", "accumulate", "save_every", "keep"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    renderers = tuple(r.strip() for r in args.renderers.split(",") if r.strip())
    if not renderers or set(renderers) - {"mesh", "volume"}:
        parser.error("--renderers takes mesh, volume or both")
    args.renderers = renderers
    return args


def read_prompt_file(path: Path) -> list[str]:
    from .inputs import clean_text

    prompts = [clean_text(line)[0] for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        prompts = read_prompt_file(args.prompts)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    from . import TriplaneTurboPipeline, WeightSources, hub
    from .config import GenerationConfig
    from .training import PRDTrainer, StableDiffusionTeacher, TrainConfig, latest_checkpoint
    from .training.config import TINY_TRAINING, CameraConfig

    try:
        device, use_cpu = cli.process_device(args.device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    auto = torch.float16 if device.type == "cuda" else torch.float32
    teacher_dtype = auto if args.dtype == "auto" else getattr(torch, args.dtype)
    config = TrainConfig(steps=args.steps, prompts_per_step=args.prompts_per_step, lr=args.lr, accumulate=args.accumulate,
                         seed=args.seed, renderers=args.renderers, cameras=CameraConfig(views=args.views),
                         **(TINY_TRAINING if args.tiny else {}))
    scratch = tempfile.TemporaryDirectory(prefix="triplane-turbo-train-") if args.tiny else None
    try:
        if args.tiny:
            from .tiny import write_tiny_model

            base_dir, adapter_file = write_tiny_model(scratch.name)  # before the process group: see batch.py
            weights = hub.ResolvedWeights(base_dir, adapter_file, "tiny")
            generation = GenerationConfig(latent_size=16)
        else:
            sources = WeightSources.resolve(args.base_model, args.adapter)
            weights = hub.resolve(sources.base_model, sources.adapter, sources.adapter_filename)
            generation = GenerationConfig()
        accelerator = Accelerator(cpu=use_cpu, gradient_accumulation_steps=1)
        pipe = TriplaneTurboPipeline.from_resolved(weights, device=device, dtype=torch.float32, fuse_lora=False,
                                                   config=generation)
        pipe.set_progress_bar_config(disable=True)
        teacher = StableDiffusionTeacher(weights.base_dir, device, teacher_dtype, config.guidance)
    except cli.loading_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    trainer = PRDTrainer(pipe, [teacher], config, accelerator)
    args.output.mkdir(parents=True, exist_ok=True)
    if (resume := latest_checkpoint(args.output)) is not None:
        trainer.load(resume)
        if accelerator.is_main_process:
            print(f"resuming from {resume} (step {trainer.step})", file=sys.stderr)
    rank_generator = torch.Generator()
    log = args.output / "log.jsonl"
    from tqdm.auto import tqdm

    bar = tqdm(total=args.steps, initial=trainer.step, desc="PRD", unit="step",
               disable=args.quiet or not accelerator.is_main_process)
    while trainer.step < args.steps:
        rank_generator.manual_seed(args.seed * 1_000_003 + trainer.step * 101 + accelerator.process_index)
        chosen = [prompts[int(i)] for i in torch.randint(len(prompts), (config.prompts_per_step,), generator=rank_generator)]
        start = time.perf_counter()
        losses = trainer.train_step(chosen)
        seconds = time.perf_counter() - start
        by_process = gather_object([chosen]) if accelerator.num_processes > 1 else [chosen]
        if accelerator.is_main_process:
            record = {"step": trainer.step, "seconds": round(seconds, 3), "prompts": by_process,
                      **{k: round(v, 6) for k, v in losses.items()}}
            with open(log, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{losses['total']:.4g}")
            if args.preview_every and trainer.step % args.preview_every == 0:
                save_preview(pipe, prompts[0], args.output / "previews" / f"step-{trainer.step:07d}.png", args)
        if trainer.step % args.save_every == 0 or trainer.step == args.steps:
            if accelerator.is_main_process:
                checkpoint = trainer.save(args.output)
                shutil.copyfile(checkpoint / "adapter.pth", args.output / ".adapter.pth.tmp")
                os.replace(args.output / ".adapter.pth.tmp", args.output / "adapter.pth")
                for old in sorted(args.output.glob("step-*"))[:-args.keep]:
                    shutil.rmtree(old)
            accelerator.wait_for_everyone()
    bar.close()
    in_sync = parameters_in_sync(trainer, accelerator)
    if accelerator.is_main_process:
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": trainer.step, "finished": True, "processes": accelerator.num_processes,
                                     "in_sync": in_sync}) + "\n")
        print(f"{args.output / 'adapter.pth'}: adapter after {trainer.step} steps "
              f"({accelerator.num_processes} process{'es' * (accelerator.num_processes > 1)})")
    if scratch is not None:
        scratch.cleanup()
    return 0


def parameters_in_sync(trainer, accelerator) -> bool:
    """Whether every process holds the same adapter (data parallel: they must)."""
    import torch

    checksum = torch.stack([p.detach().double().sum() for p in trainer.parameters]).sum().reshape(1).to(accelerator.device)
    gathered = accelerator.gather(checksum)
    return bool(torch.allclose(gathered, gathered[:1].expand_as(gathered), rtol=1e-9, atol=0))


def save_preview(pipe, prompt: str, path: Path, options: argparse.Namespace) -> None:
    """The current adapter's mesh for ``prompt`` (seed 0), as a preview picture."""
    import torch
    from PIL import Image

    from .preview import render_preview

    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        out = pipe(prompt, seed=0, mesh_resolution=options.resolution, texture=options.texture,
                   texture_size=options.texture_size, target_faces=options.faces)
    Image.fromarray(render_preview(out.meshes[0], out.textures[0], size=256)).save(path)


if __name__ == "__main__":
    sys.exit(main())
