"""Batch generation: a prompt file in, a folder of meshes and a manifest out; resumable; on one
process or many through accelerate.

    python -m triplane_turbo.batch prompts.txt --out meshes/
    accelerate launch --num_processes 4 --multi_gpu -m triplane_turbo.batch prompts.txt --out meshes/

* One mesh per non-blank line, named after its line and a hash, with one record per line in a
  manifest kept per process and merged at the end (``manifest.py``).
* The same command again skips lines that have an ``ok`` record whose file exists, and does the rest
  (split afresh across however many processes run it).
* Bad lines never stop the batch: blank lines are skipped, control characters removed, lines over
  1,000 characters get an error record; a CUDA out-of-memory error halves the batch and retries.
* With UV textures, ``--workers`` threads bake and write the meshes while the networks make the next
  batch (on the CPU with one prompt per call; larger batches there bake side by side between calls).
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from . import cli
from .config import MAX_SEED
from .export import FORMATS
from .manifest import (MANIFEST, BatchSettings, PromptLine, RankManifest, line_seed, make_record,  # noqa: F401
                       merge_manifest, output_name, pending_lines, read_prompts, read_records)

logger = logging.getLogger(__name__)

# -------------------------------------------------------------------------------------------------
# Generating
# -------------------------------------------------------------------------------------------------

@dataclass
class BatchStats:
    ok: int = 0
    errors: int = 0
    seconds: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)

    @property
    def meshes_per_second(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


class _Finisher:
    """Writes each generated mesh (texture bake, export, record): in line, or on ``workers`` threads.
    Torch, numpy and the encoders release the GIL for their heavy parts, so the threads run in parallel.

    With ``overlap`` the threads bake one batch while the networks make the next; at most
    ``2 · workers`` meshes wait, which bounds the memory they hold. Without it the threads bake a
    batch's meshes side by side and the next batch waits for them. ``run_batch`` overlaps when the
    networks run on an accelerator, and on the CPU for one prompt per call (the networks then get the
    cores the threads leave); batches of several prompts on the CPU take turns, since the batched
    networks use every core well and much of a bake is single-threaded numpy (two bakes on one core
    each beat one on two: 0.23 s against 0.29 s per mesh, measured on 2 cores). Each thread runs
    torch's CPU operations on one core (``torch.set_num_threads`` is per thread with OpenMP, the
    backend of PyTorch's builds)."""

    def __init__(self, pipe, out_dir: Path, settings: BatchSettings, manifest: RankManifest, stats: BatchStats,
                 base_seed: int, rank: int, workers: int, progress, overlap: bool):
        from concurrent.futures import ThreadPoolExecutor

        import torch

        self.pipe, self.out_dir, self.settings, self.manifest = pipe, out_dir, settings, manifest
        self.stats, self.base_seed, self.rank, self.progress = stats, base_seed, rank, progress
        self.deferred = workers > 0 and settings.texture == "uv"  # baking is what threads take over
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="batch-finish", initializer=torch.set_num_threads,
                                       initargs=(1,)) if workers > 0 else None
        self.pending: list = []
        self.workers, self.overlap = workers, overlap
        self._lock = threading.Lock()

    def record(self, item: PromptLine, **fields) -> None:
        with self._lock:
            self.manifest.append(make_record(item, self.base_seed, self.settings, self.rank, **fields))
            if fields.get("error") is None:
                self.stats.ok += 1
            else:
                self.stats.errors += 1
            if self.progress:
                self.progress(1)

    def submit(self, chunk: list[PromptLine], seeds: list[int], out, seconds: float) -> None:
        """One batch's results of the networks (a ``TriplaneTurboOutput``: its textures when the
        pipeline baked them, else its triplane to bake them from)."""
        textures = out.textures or [None] * len(chunk)
        jobs = []
        for j, (item, seed, mesh) in enumerate(zip(chunk, seeds, out.meshes)):
            if len(mesh.faces) == 0:
                self.record(item, error="no surface for this prompt and seed")
            else:
                jobs.append((item, seed, mesh, textures[j], out.triplane[j:j + 1] if self.deferred else None, seconds))
        if self.pool is None or (not self.overlap and len(jobs) < 2):
            for job in jobs:  # in line (on the CPU a lone mesh bakes fastest on the main thread's cores)
                self.finish(*job)
            return
        for job in jobs:
            while len(self.pending) >= 2 * self.workers:
                self.pending.pop(0).result()
            self.pending.append(self.pool.submit(self.finish, *job))
        if not self.overlap:  # the networks need the cores next: the batch is written first
            self.drain()

    def drain(self) -> None:
        """Waits for every mesh handed to the threads."""
        while self.pending:
            self.pending.pop(0).result()

    def finish(self, item: PromptLine, seed: int, mesh, texture, triplane, seconds: float) -> None:
        from .export import export_mesh

        began = time.perf_counter()
        try:
            if triplane is not None:
                (texture,) = self.pipe.mesher.bake_textures(triplane, [mesh], self.settings.texture_size,
                                                            normal_map=bool(self.settings.target_faces),
                                                            unwrap=self.settings.unwrap)
            name = output_name(item.line, item.prompt, seed, self.settings)
            export_mesh(mesh, self.out_dir / name, self.settings.file_format, texture=texture,
                        origin=self.settings.origin, scale=self.settings.scale, print_size=self.settings.print_size)
        except Exception as exc:  # noqa: BLE001 - one bad mesh must not stop the run
            logger.warning("line %d: %s: %s", item.line, type(exc).__name__, exc)
            self.record(item, error=f"{type(exc).__name__}: {exc}")
            return
        self.record(item, file=name, seconds=seconds + time.perf_counter() - began, vertices=len(mesh.vertices),
                    faces=len(mesh.faces), revision=self.pipe.revision)

    def close(self) -> None:
        self.drain()
        if self.pool is not None:
            self.pool.shutdown()


def run_batch(pipe, lines: list[PromptLine], out_dir: Path, settings: BatchSettings, *, base_seed: int = 0,
              batch_size: int = 1, rank: int = 0, progress=None, workers: int = 0,
              overlap: bool | None = None) -> BatchStats:
    """Generate ``lines`` in batches of ``batch_size`` prompts, writing meshes and records.

    Args:
        pipe: a ``TriplaneTurboPipeline``.
        lines: this process's share of the prompt file.
        out_dir: the output folder (must exist).
        progress: called with the number of lines finished, as they finish.
        workers: threads that bake and export (0: in line): while the networks make the next batch
            if those run on an accelerator, else a batch's meshes side by side (see ``_Finisher``).
        overlap: whether the threads bake while the networks run (default: when those run on an
            accelerator, or on the CPU with ``batch_size`` 1; see ``_Finisher``). Overlapping on the
            CPU, the calling thread runs the networks on the cores the threads leave (at least one),
            and gets its thread count back at the end.
    """
    import torch

    manifest = RankManifest(out_dir, rank)
    stats = BatchStats()
    start = time.perf_counter()
    on_cpu = pipe.device.type == "cpu"
    overlap = (not on_cpu or batch_size == 1) if overlap is None else overlap
    finisher = _Finisher(pipe, out_dir, settings, manifest, stats, base_seed, rank, workers, progress, overlap)
    threads = torch.get_num_threads()
    for item in [i for i in lines if i.error]:
        finisher.record(item, error=item.error)
    queue = [i for i in lines if not i.error]
    size = max(1, batch_size)
    singles = 0  # lines of a failed batch, retried one at a time to find the one that fails
    try:
        if overlap and on_cpu and finisher.deferred:
            torch.set_num_threads(max(1, threads - workers))  # measured at B = 1 on 2 cores: 1.3 -> 2.0 meshes/s
        while queue:
            take = 1 if singles else size
            chunk, seeds = queue[:take], [line_seed(base_seed, i.line) for i in queue[:take]]
            began = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # truncation and empty-surface warnings become records
                    out = pipe([i.prompt for i in chunk], seed=seeds, mesh_resolution=settings.mesh_resolution,
                               texture="vertex" if finisher.deferred else settings.texture,
                               texture_size=settings.texture_size, target_faces=settings.target_faces,
                               unwrap=settings.unwrap)
            except Exception as exc:  # noqa: BLE001 - one bad batch must not stop the run
                if isinstance(exc, torch.cuda.OutOfMemoryError) and take > 1:
                    torch.cuda.empty_cache()
                    size = max(1, take // 2)
                    logger.warning("CUDA ran out of memory with %d prompts per batch; retrying with %d", take, size)
                elif take > 1:
                    logger.warning("a batch of %d failed (%s: %s); retrying its lines one by one", take,
                                   type(exc).__name__, exc)
                    singles = take
                else:
                    finisher.record(chunk[0], error=f"{type(exc).__name__}: {exc}")
                    queue, singles = queue[1:], max(0, singles - 1)
                continue
            singles = max(0, singles - len(chunk))
            seconds = (time.perf_counter() - began) / len(chunk)
            finisher.submit(chunk, seeds, out, seconds)
            stats.batch_sizes.append(len(chunk))
            queue = queue[len(chunk):]
    finally:
        finisher.close()
        torch.set_num_threads(threads)
    stats.seconds = time.perf_counter() - start
    return stats


def run_split(pipe, lines: list[PromptLine], out_dir: Path, settings: BatchSettings, state, *, base_seed: int = 0,
              batch_size: int = 1, workers: int = 0, bar: bool = True) -> tuple[BatchStats, int]:
    """``run_batch`` for every line without a finished mesh, split across ``state``'s processes
    (accelerate's ``PartialState``; every process calls this), with the merged manifest written at
    the end; returns this process's stats and how many lines were done before.

    In order, each step finished by every process before the next: stale half-written files removed,
    each process's record file repaired, the finished lines read, then the split and the generation.
    """
    from tqdm.auto import tqdm

    if state.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(".*.tmp"):  # half-written files of a run that was killed
            stale.unlink(missing_ok=True)
    state.wait_for_everyone()
    RankManifest(out_dir, state.process_index)  # repair this process's file before anyone reads
    state.wait_for_everyone()
    todo = pending_lines(lines, out_dir, base_seed, settings)
    state.wait_for_everyone()  # everyone has read the records before anyone writes new ones
    with state.split_between_processes(todo) as mine:
        progress = tqdm(total=len(todo), desc="meshes", unit="line", disable=not (bar and state.is_main_process))
        stats = run_batch(pipe, list(mine), out_dir, settings, base_seed=base_seed, batch_size=batch_size,
                          rank=state.process_index, progress=lambda n: progress.update(n * state.num_processes),
                          workers=workers)
        progress.close()
    state.wait_for_everyone()
    if state.is_main_process:
        merge_manifest(out_dir, settings)
    state.wait_for_everyone()
    return stats, len(lines) - len(todo)


# -------------------------------------------------------------------------------------------------
# Command line
# -------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m triplane_turbo.batch",
        description="Generate one mesh per line of a prompt file into a folder, with a manifest; resumable. "
                    "Under `accelerate launch` the lines are split across the processes.",
        epilog=cli.WEIGHTS_EPILOG)
    parser.add_argument("prompts", type=Path, help="a UTF-8 text file, one prompt per line")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created; only it is written to)")
    parser.add_argument("--seed", type=int, default=0, help="line n uses seed SEED + n - 1 (default 0)")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per pipeline call (default 1)")
    cli.add_workers_option(parser)
    parser.add_argument("--format", choices=FORMATS, default="glb", help="file format (default glb)")
    cli.add_mesh_options(parser)
    cli.add_placement_options(parser)
    cli.add_model_options(parser)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if not 0 <= args.seed <= MAX_SEED:
        parser.error(f"--seed must be between 0 and {MAX_SEED}")
    try:
        args.placement = cli.placement_options(args, args.format)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if not args.prompts.is_file():
        print(f"error: no prompt file {args.prompts}", file=sys.stderr)
        return 2
    from accelerate import PartialState

    device, use_cpu = cli.process_device(args.device)
    args.workers = cli.baking_workers(args.workers, use_cpu)
    dtype = cli.resolve_dtype(args.dtype, device)
    try:  # before the process group exists: libraries write files on rank 0 only once it does
        pipe = cli.load_pipeline(args, device, dtype)
    except cli.loading_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    pipe.set_progress_bar_config(disable=True)

    state = PartialState(cpu=use_cpu)
    settings = BatchSettings(args.resolution, args.format, args.texture, args.texture_size, args.faces, args.unwrap,
                             **args.placement)
    stats, done_before = run_split(pipe, read_prompts(args.prompts), args.out, settings, state, base_seed=args.seed,
                                   batch_size=args.batch_size, workers=args.workers, bar=not args.quiet)
    if state.is_main_process:
        manifest = args.out / MANIFEST
        records = read_records(args.out, settings)
        ok = sum(r.get("status") == "ok" for r in records.values())
        errors = sum(r.get("status") == "error" for r in records.values())
        print(f"{manifest}: {ok} ok, {errors} errors ({done_before} done before this run); this process made "
              f"{stats.ok} meshes in {stats.seconds:.1f} s ({stats.meshes_per_second:.2f} meshes/s) on {device}"
              + (f", {state.num_processes} processes" if state.num_processes > 1 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
