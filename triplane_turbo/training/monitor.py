"""What a training run writes for people to watch it: ``log.jsonl`` (kept consistent across a resume),
the trackers (TensorBoard when installed: loss curves, previews, scores), preview pictures, and the
paper's evaluation every N steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path


def truncate_log(log: Path, iteration: int) -> None:
    """Drops the records of iterations after ``iteration`` (logged before an interruption)."""
    if not log.is_file():
        return
    kept = []
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by the interruption
            continue
        if record.get("iteration", 0) <= iteration and "finished" not in record:
            kept.append(line)
    log.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def tensorboard_installed() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def tracker_config(args: argparse.Namespace, config) -> dict:
    """The run's settings as flat scalars (what trackers store as hyper-parameters)."""
    return {"teachers": ",".join(f"{s.name}:{s.weight:g}" for s in args.teacher_specs), "steps": config.steps,
            "accumulate": config.accumulate, "prompts_per_step": config.prompts_per_step, "lr": config.optimizer.lr,
            "optimizer": config.optimizer.name, "schedule_start": config.schedule_start,
            "from_scratch": bool(args.from_scratch), "learned_background": config.learned_background,
            "image_size": config.mesh.image, "grid": config.mesh.grid, "rays": config.volume.rays, "seed": config.seed}


def log_image(accelerator, image, step: int) -> None:
    """A preview picture ([H, W, 3] uint8) to the trackers that take images."""
    for tracker in accelerator.trackers:
        if hasattr(tracker, "log_images"):
            tracker.log_images({"preview": image[None]}, step=step, dataformats="NHWC")


def save_preview(pipe, prompt: str, path: Path, options: argparse.Namespace):
    """The current adapter's mesh for ``prompt`` (seed 0) as a preview picture; returns it [H, W, 3]."""
    import torch
    from PIL import Image

    from ..preview import render_preview

    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        out = pipe(prompt, seed=0, mesh_resolution=options.resolution, texture=options.texture,
                   texture_size=options.texture_size, target_faces=options.faces)
    image = render_preview(out.meshes[0], out.textures[0], size=256)
    Image.fromarray(image).save(path)
    return image


class Evaluation:
    """The paper's evaluation every ``--eval-every`` optimiser steps, with the evaluation command's
    code (``triplane_turbo.evaluation``): CLIP loaded once on the main process, meshes made and
    rendered by every process, the scores logged (log.jsonl and the trackers) and kept under
    DIR/eval/step-<n>/ (the generated meshes, as at inference: no learned background)."""

    def __init__(self, args: argparse.Namespace, accelerator, scratch):
        from ..evaluation import ClipScorer, EvalSettings

        self.args, self.accelerator = args, accelerator
        self.settings = EvalSettings(mesh_resolution=40, image_size=64) if args.tiny else EvalSettings()
        self.clip = None
        if accelerator.is_main_process:
            source = args.clip
            if source is None and args.tiny:
                from ..tiny import write_tiny_clip

                source = write_tiny_clip(Path(scratch.name) / "clip")
            self.clip = ClipScorer.from_pretrained(source, device=accelerator.device)

    def run(self, pipe, trainer, log: Path) -> None:
        from ..evaluation import evaluate_pipeline

        step = trainer.optimizer_steps
        result = evaluate_pipeline(pipe, self.args.eval_prompts, self.args.output / "eval" / f"step-{step:07d}",
                                   self.settings, self.clip, state=self.accelerator, info={"step": step})
        if result is None:  # another process: the main one scores and logs
            return
        scores = {"eval/clip_score": result.clip_score, "eval/r_at_1": result.r_at_1, "eval/r_at_5": result.r_at_5}
        self.accelerator.log(scores, step=trainer.iteration)
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, "iteration": trainer.iteration,
                                     **{k.split("/")[1]: round(v, 4) for k, v in scores.items()}}) + "\n")


__all__ = ["Evaluation", "log_image", "save_preview", "tensorboard_installed", "tracker_config", "truncate_log"]
