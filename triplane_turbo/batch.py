"""Batch generation: a prompt file in, a folder of meshes and a manifest out; resumable; on one
process or many through accelerate.

    python -m triplane_turbo.batch prompts.txt --out meshes/
    accelerate launch --num_processes 4 --multi_gpu -m triplane_turbo.batch prompts.txt --out meshes/

* One mesh per non-blank line, named ``<line>-<hash>.<format>`` (the hash covers prompt, seed and
  settings; the prompt never becomes a file name). Line n uses seed ``S + n − 1``, so a line's result
  does not depend on batching or on how the file is split.
* Each process appends one JSON record per line it processed to ``manifest.rank<r>.jsonl`` (a single
  ``write`` of a whole line, flushed to disk): processes never share a file, and a kill loses at most
  the line being written, which the next run repairs. When every process is done, the main process
  merges them into ``manifest.jsonl``, sorted by line.
* The same command again skips lines that have an ``ok`` record whose file exists, and does the rest
  (split afresh across however many processes run it).
* Bad lines never stop the batch: blank lines are skipped, control characters removed, lines over
  1,000 characters get an error record; a CUDA out-of-memory error halves the batch and retries.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import cli
from .config import MAX_SEED
from .export import FORMATS
from .inputs import MAX_PROMPT_CHARS, clean_text

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"


@dataclass(frozen=True)
class BatchSettings:
    """What decides every mesh of a batch besides its prompt and seed."""

    mesh_resolution: int = 160
    file_format: str = "glb"
    texture: str = "uv"
    texture_size: int = 1024
    target_faces: int | None = None


@dataclass
class PromptLine:
    """One non-blank line of the prompt file: its 1-based number, the cleaned prompt, and why it
    cannot be generated (None if it can)."""

    line: int
    prompt: str
    error: str | None = None


def read_prompts(path: str | os.PathLike) -> list[PromptLine]:
    """The prompt file's non-blank lines (UTF-8; undecodable bytes are replaced)."""
    lines = []
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        prompt, _ = clean_text(raw)
        if len(raw) > MAX_PROMPT_CHARS:
            lines.append(PromptLine(number, prompt[:80] + "…", f"the line is {len(raw)} characters long; the limit "
                                                                 f"is {MAX_PROMPT_CHARS}"))
        elif not prompt:
            lines.append(PromptLine(number, "", "the line holds only control characters"))
        else:
            lines.append(PromptLine(number, prompt))
    return lines


def line_seed(base_seed: int, line: int) -> int:
    return (base_seed + line - 1) % (MAX_SEED + 1)


def output_name(line: int, prompt: str, seed: int, settings: BatchSettings) -> str:
    """``000042-<10 hex>.<format>``: the line number, and a hash of what made the mesh."""
    digest = hashlib.sha256(json.dumps([prompt, seed, asdict(settings)], sort_keys=True).encode()).hexdigest()[:10]
    return f"{line:06d}-{digest}.{settings.file_format}"


# -------------------------------------------------------------------------------------------------
# The manifest
# -------------------------------------------------------------------------------------------------

class RankManifest:
    """The records one process appends (``manifest.rank<r>.jsonl``)."""

    def __init__(self, out_dir: Path, rank: int):
        self.path = out_dir / f"manifest.rank{rank}.jsonl"
        self.repair()

    def repair(self) -> None:
        """Drops a torn last line (a kill in the middle of a write)."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1 if not data.endswith(b"\n") else len(data)
        lines = data[:keep].split(b"\n")
        if keep != len(data) or any(line and not _valid_json(line) for line in lines):
            good = b"".join(line + b"\n" for line in lines if line and _valid_json(line))
            tmp = self.path.with_suffix(".tmp")
            tmp.write_bytes(good)
            os.replace(tmp, self.path)
            logger.warning("%s: dropped %d bytes of a record cut short", self.path.name, len(data) - len(good))

    def append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write of a whole line: appended atomically
            os.fsync(fd)
        finally:
            os.close(fd)


def _valid_json(line: bytes) -> bool:
    try:
        json.loads(line)
        return True
    except ValueError:
        return False


def read_records(out_dir: Path, settings: BatchSettings | None = None) -> dict[int, dict]:
    """The record that counts for every line, from the merged manifest and every process's file.

    An ``ok`` record made with ``settings`` beats any other ``ok`` record, which beats an error;
    among equals the later one wins (the merged manifest is read first, then the process files).
    """
    wanted = asdict(settings) if settings is not None else None

    def rank(record: dict) -> int:
        ok = record.get("status") == "ok"
        return 2 * ok + (ok and wanted is not None and record.get("settings") == wanted)

    records: dict[int, dict] = {}
    for path in [out_dir / MANIFEST] + sorted(out_dir.glob("manifest.rank*.jsonl")):
        if not path.exists():
            continue
        for raw in path.read_bytes().split(b"\n"):
            if not raw.strip() or not _valid_json(raw):
                continue
            record = json.loads(raw)
            old = records.get(record.get("line"))
            if old is None or rank(record) >= rank(old):
                records[record["line"]] = record
    return records


def merge_manifest(out_dir: Path, settings: BatchSettings | None = None) -> Path:
    """``manifest.jsonl``: one record per processed line, sorted by line (written atomically)."""
    records = read_records(out_dir, settings)
    path = out_dir / MANIFEST
    tmp = out_dir / f".{MANIFEST}.tmp"
    tmp.write_text("".join(json.dumps(records[line], ensure_ascii=False) + "\n" for line in sorted(records)),
                   encoding="utf-8")
    os.replace(tmp, path)
    return path


def pending_lines(lines: list[PromptLine], out_dir: Path, base_seed: int, settings: BatchSettings) -> list[PromptLine]:
    """Lines without an ``ok`` record for these settings whose file exists."""
    records = read_records(out_dir, settings)
    todo = []
    for item in lines:
        record = records.get(item.line)
        expected = output_name(item.line, item.prompt, line_seed(base_seed, item.line), settings)
        if record and record.get("status") == "ok" and record.get("file") == expected \
                and (out_dir / expected).is_file():
            continue
        todo.append(item)
    return todo


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


def run_batch(pipe, lines: list[PromptLine], out_dir: Path, settings: BatchSettings, *, base_seed: int = 0,
              batch_size: int = 1, rank: int = 0, progress=None) -> BatchStats:
    """Generate ``lines`` in batches of ``batch_size`` prompts, writing meshes and records.

    Args:
        pipe: a ``TriplaneTurboPipeline``.
        lines: this process's share of the prompt file.
        out_dir: the output folder (must exist).
        progress: called with the number of lines finished after each batch.
    """
    from .export import export_mesh

    manifest = RankManifest(out_dir, rank)
    stats = BatchStats()
    start = time.perf_counter()
    queue = list(lines)
    for item in [i for i in queue if i.error]:
        manifest.append(_record(item, base_seed, settings, rank, error=item.error))
        stats.errors += 1
        if progress:
            progress(1)
    queue = [i for i in queue if not i.error]
    size = max(1, batch_size)
    singles = 0  # lines of a failed batch, retried one at a time to find the one that fails
    while queue:
        take = 1 if singles else size
        chunk, seeds = queue[:take], [line_seed(base_seed, i.line) for i in queue[:take]]
        began = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # truncation and empty-surface warnings become records
                out = pipe([i.prompt for i in chunk], seed=seeds, mesh_resolution=settings.mesh_resolution,
                           texture=settings.texture, texture_size=settings.texture_size,
                           target_faces=settings.target_faces)
        except Exception as exc:  # noqa: BLE001 - one bad batch must not stop the run
            import torch

            if isinstance(exc, torch.cuda.OutOfMemoryError) and take > 1:
                torch.cuda.empty_cache()
                size = max(1, take // 2)
                logger.warning("CUDA ran out of memory with %d prompts per batch; retrying with %d", take, size)
            elif take > 1:
                logger.warning("a batch of %d failed (%s: %s); retrying its lines one by one", take,
                               type(exc).__name__, exc)
                singles = take
            else:
                manifest.append(_record(chunk[0], base_seed, settings, rank, error=f"{type(exc).__name__}: {exc}"))
                stats.errors += 1
                queue, singles = queue[1:], max(0, singles - 1)
                if progress:
                    progress(1)
            continue
        singles = max(0, singles - len(chunk))
        seconds = (time.perf_counter() - began) / len(chunk)
        for item, seed, mesh, texture in zip(chunk, seeds, out.meshes, out.textures):
            name = output_name(item.line, item.prompt, seed, settings)
            if len(mesh.faces) == 0:
                manifest.append(_record(item, base_seed, settings, rank, error="no surface for this prompt and seed"))
                stats.errors += 1
                continue
            export_mesh(mesh, out_dir / name, settings.file_format, texture=texture)
            manifest.append(_record(item, base_seed, settings, rank, file=name, seconds=seconds,
                                    vertices=len(mesh.vertices), faces=len(mesh.faces), revision=pipe.revision))
            stats.ok += 1
        stats.batch_sizes.append(len(chunk))
        queue = queue[len(chunk):]
        if progress:
            progress(len(chunk))
    stats.seconds = time.perf_counter() - start
    return stats


def _record(item: PromptLine, base_seed: int, settings: BatchSettings, rank: int, *, file: str | None = None,
            error: str | None = None, seconds: float | None = None, **extra) -> dict:
    seed = line_seed(base_seed, item.line)
    return {"line": item.line, "prompt": item.prompt, "seed": seed,
            "file": file if error is None else None, "status": "ok" if error is None else "error", "error": error,
            "rank": rank, "seconds": None if seconds is None else round(seconds, 4),
            "settings": asdict(settings), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}


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
    parser.add_argument("--format", choices=FORMATS, default="glb", help="file format (default glb)")
    cli.add_mesh_options(parser)
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
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if not args.prompts.is_file():
        print(f"error: no prompt file {args.prompts}", file=sys.stderr)
        return 2
    from accelerate import PartialState

    try:
        device, use_cpu = cli.process_device(args.device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    dtype = cli.resolve_dtype(args.dtype, device)
    try:  # before the process group exists: libraries write files on rank 0 only once it does
        pipe = cli.load_pipeline(args, device, dtype)
    except cli.loading_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    pipe.set_progress_bar_config(disable=True)

    state = PartialState(cpu=use_cpu)
    settings = BatchSettings(args.resolution, args.format, args.texture, args.texture_size, args.faces)
    lines = read_prompts(args.prompts)
    if state.is_main_process:
        args.out.mkdir(parents=True, exist_ok=True)
        for stale in args.out.glob(".*.tmp"):  # half-written files of a run that was killed
            stale.unlink(missing_ok=True)
    state.wait_for_everyone()
    RankManifest(args.out, state.process_index)  # repair this process's file before anyone reads
    state.wait_for_everyone()
    todo = pending_lines(lines, args.out, args.seed, settings)
    state.wait_for_everyone()  # everyone has read the records before anyone writes new ones
    done_before = len(lines) - len(todo)

    with state.split_between_processes(todo) as mine:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="meshes", unit="line", disable=args.quiet or not state.is_main_process)
        stats = run_batch(pipe, list(mine), args.out, settings, base_seed=args.seed, batch_size=args.batch_size,
                          rank=state.process_index, progress=lambda n: bar.update(n * state.num_processes))
        bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        manifest = merge_manifest(args.out, settings)
        records = read_records(args.out, settings)
        ok = sum(r.get("status") == "ok" for r in records.values())
        errors = sum(r.get("status") == "error" for r in records.values())
        print(f"{manifest}: {ok} ok, {errors} errors ({done_before} done before this run); this process made "
              f"{stats.ok} meshes in {stats.seconds:.1f} s ({stats.meshes_per_second:.2f} meshes/s) on {device}"
              + (f", {state.num_processes} processes" if state.num_processes > 1 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
