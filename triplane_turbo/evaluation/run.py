"""Running an evaluation: prompts -> meshes (the batch machinery) -> views -> CLIP -> reports.

``evaluate_pipeline`` is the whole chain for a pipeline that is already loaded (the command line and
the trainer both call it). Everything it writes lives in ``out_dir``:

    meshes/            one OBJ per prompt and manifest.jsonl (``triplane_turbo.batch``: resumable)
    views/<key>/       <mesh>_<k>.png, view k of each mesh (<key>: the rendering settings)
    metrics.json       the numbers, per prompt and per view, with the settings and weights revisions
    metrics.md         the same as tables
    contact_sheet.png  every view, a row of them per prompt

A run that stops part-way is resumed by calling it again with the same folder: prompts with a
finished mesh are not generated again, views already written are not rendered again, and the CLIP
part (seconds) runs on everything each time. Under several processes (``state`` = accelerate's
``PartialState`` or ``Accelerator``) meshes and views are split between them and the main process
scores; the numbers do not depend on the split.
"""

from __future__ import annotations

import io
import logging
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..batch import run_split
from ..fileio import write_atomic
from ..manifest import PromptLine, line_seed, output_name, read_records
from . import report, views
from .clip import authors_float16_metrics, clip_metrics
from .protocol import EvalSettings, clip_text, dropped, prompt_lines, read_eval_prompts

logger = logging.getLogger(__name__)

MESHES, VIEWS = "meshes", "views"


class SingleProcess:
    """The part of accelerate's ``PartialState`` the evaluation uses, for one process."""

    is_main_process = True
    process_index = 0
    num_processes = 1

    def wait_for_everyone(self) -> None:
        pass

    @contextmanager
    def split_between_processes(self, items):
        yield items


@dataclass
class PromptJob:
    """One prompt of the evaluation: its line, the text CLIP reads, and its mesh (None if it failed)."""

    line: PromptLine
    text: str
    seed: int
    mesh: str | None = None  # file name under meshes/
    error: str | None = None
    seconds: float | None = None  # generation time per prompt, from the manifest


@dataclass
class EvalResult:
    """What ``evaluate_pipeline`` measured (``metrics`` is the content of ``metrics.json``)."""

    clip_score: float
    r_at_1: float
    r_at_5: float
    out_dir: Path
    metrics: dict = field(repr=False)

    @property
    def failed(self) -> list[int]:
        """Lines whose mesh could not be made (scored as blank white views)."""
        return self.metrics["failed_lines"]


def view_name(mesh_file: str, k: int, kind: str = "") -> str:
    return f"{Path(mesh_file).stem}_{k}{'_' + kind if kind else ''}.png"


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def resolve_lines(prompts) -> list[PromptLine]:
    """A prompt file (text or JSON library), a list of prompts, or ready ``PromptLine`` -> lines."""
    if isinstance(prompts, (str, Path)):
        return read_eval_prompts(prompts)
    prompts = list(prompts)
    if prompts and all(isinstance(p, PromptLine) for p in prompts):
        return prompts
    return prompt_lines(prompts)


def generate_meshes(pipe, lines: list[PromptLine], meshes_dir: Path, settings: EvalSettings, state, *,
                    batch_size: int = 1, workers: int = 0, progress: bool = False) -> list[PromptJob]:
    """Meshes for ``lines`` through the batch machinery (only those without a finished mesh), split
    across ``state``'s processes; returns every line's job once all processes are done. ``workers``:
    threads that bake UV textures (``batch.run_batch``)."""
    batch = settings.batch_settings()
    run_split(pipe, lines, meshes_dir, batch, state, base_seed=settings.seed, batch_size=batch_size, workers=workers,
              bar=progress)
    records = read_records(meshes_dir, batch)
    jobs = []
    for item in lines:
        seed = line_seed(settings.seed, item.line)
        job = PromptJob(item, clip_text(item.prompt, settings, getattr(item, "raw", None)), seed)
        record = records.get(item.line, {})
        expected = output_name(item.line, item.prompt, seed, batch)
        if record.get("status") == "ok" and record.get("file") == expected and (meshes_dir / expected).is_file():
            job.mesh, job.seconds = expected, record.get("seconds")
        else:
            job.error = record.get("error") or item.error or "no mesh"
        jobs.append(job)
    return jobs


def render_pending(jobs: list[PromptJob], meshes_dir: Path, views_dir: Path, settings: EvalSettings, state, *,
                   device=None, backend: str = "auto", progress: bool = False) -> float:
    """Write the views of every mesh that lacks some, split across processes; returns this process's
    rendering seconds per mesh (0 when it rendered none)."""
    if state.is_main_process:
        views_dir.mkdir(parents=True, exist_ok=True)
        for stale in views_dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
    state.wait_for_everyone()
    kinds = [""] + (["normal"] if settings.normals else [])
    todo = [job.mesh for job in jobs if job.mesh and not all(
        (views_dir / view_name(job.mesh, k, kind)).is_file() for k in range(settings.views) for kind in kinds)]
    state.wait_for_everyone()
    seconds, done = 0.0, 0
    with state.split_between_processes(todo) as mine:
        bar = _bar(len(todo), "views", progress and state.is_main_process)
        for mesh_file in mine:
            start = time.perf_counter()
            pictures = views.render_views(views.ViewMesh.load(meshes_dir / mesh_file), settings,
                                          device=device or "cpu", backend=backend)
            for k in range(settings.views):
                if pictures.normal is not None:
                    write_atomic(views_dir / view_name(mesh_file, k, "normal"), _png(pictures.normal[k]))
                write_atomic(views_dir / view_name(mesh_file, k), _png(pictures.rgb[k]))
            seconds += time.perf_counter() - start
            done += 1
            bar.update(state.num_processes)
        bar.close()
    state.wait_for_everyone()
    return seconds / done if done else 0.0


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="prompt", disable=not enabled)


def evaluate_pipeline(pipe, prompts, out_dir: str | Path, settings: EvalSettings = EvalSettings(), clip=None, *,
                      batch_size: int = 1, workers: int = 0, state=None, device=None, backend: str = "auto",
                      progress: bool = False, contact_sheet: bool = True,
                      info: dict | None = None) -> EvalResult | None:
    """Evaluate a loaded pipeline on ``prompts``: C.S., R@1 and R@5 with the paper's protocol.

    Args:
        pipe: a ``TriplaneTurboPipeline`` (any weights: the published ones, a checkpoint in training).
        prompts: a prompt file (text, or the authors' JSON library: its ``test`` list), a list of
            prompts, or ``PromptLine`` objects.
        out_dir: the evaluation's folder (created). Reusing it resumes: finished meshes and views are
            kept, so give each set of weights its own folder (e.g. ``run/eval/step-001000``).
        settings: the protocol (``EvalSettings()``: the paper's; ``EvalSettings.authors()``: their quirks).
        clip: a ``ClipScorer``; needed on the main process only (others may pass None).
        batch_size: prompts per pipeline call.
        workers: threads that bake UV textures (``texture="uv"``; see ``batch.run_batch``).
        state: accelerate's ``PartialState`` or ``Accelerator`` when several processes run this
            together (each generates and renders its share); None for one process.
        device: where views are rasterised (default: the pipeline's device).
        progress: progress bars on the main process.
        contact_sheet: also write ``contact_sheet.png``.
        info: anything JSON-serialisable to keep in ``metrics.json`` under "info" (e.g. the training step).
    Returns:
        On the main process an ``EvalResult`` (its ``metrics`` is what ``metrics.json`` holds); None
        on the others.
    """
    state = state or SingleProcess()
    out_dir = Path(out_dir)
    if state.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        if clip is None:
            raise ValueError("evaluate_pipeline needs a ClipScorer on the main process")
    lines = resolve_lines(prompts)
    kept = [item for item in lines if not dropped(item.prompt, settings)]
    lost = [item for item in lines if dropped(item.prompt, settings)]
    meshes_dir, views_dir = out_dir / MESHES, out_dir / VIEWS / settings.render_key()
    jobs = generate_meshes(pipe, kept, meshes_dir, settings, state, batch_size=batch_size, workers=workers,
                           progress=progress)
    device = device if device is not None else getattr(pipe, "device", "cpu")
    render_seconds = render_pending(jobs, meshes_dir, views_dir, settings, state, device=device, backend=backend,
                                    progress=progress)
    if not state.is_main_process:
        return None
    failed = [job for job in jobs if job.mesh is None]
    for job in failed:
        logger.warning("line %d (%r) has no mesh (%s): scored as blank views", job.line.line, job.line.prompt,
                       job.error)
    start = time.perf_counter()
    blank = views.blank_views(settings)
    images = [(_read_png(views_dir / view_name(job.mesh, k)) if job.mesh else blank[k])
              for job in jobs for k in range(settings.views)]
    texts = list(dict.fromkeys(job.text for job in jobs))  # unique texts, in line order
    index = {text: i for i, text in enumerate(texts)}
    targets = [index[job.text] for job in jobs for _ in range(settings.views)]
    image_features = clip.embed_images(images)
    text_features = clip.embed_texts(texts)
    scored = (authors_float16_metrics if settings.authors_precision else clip_metrics)(
        image_features, text_features, targets, settings.score_weight)
    clip_seconds = time.perf_counter() - start
    generation = [job.seconds for job in jobs if job.seconds is not None]
    timing = {"generate_seconds_per_prompt": statistics.median(generation) if generation else None,
              "render_seconds_per_prompt": round(render_seconds, 4) if render_seconds else None,
              "clip_seconds": round(clip_seconds, 3)}
    metrics = report.build_metrics(jobs, lost, scored, texts, settings, pipe, clip, out_dir, views_dir, timing)
    if info is not None:
        metrics["info"] = info
    report.write_reports(metrics, out_dir, sheet=contact_sheet)
    return EvalResult(metrics["clip_score"], metrics["r_at_1"], metrics["r_at_5"], out_dir, metrics)


__all__ = ["EvalResult", "MESHES", "PromptJob", "SingleProcess", "VIEWS", "evaluate_pipeline", "generate_meshes",
           "render_pending", "resolve_lines", "view_name"]
