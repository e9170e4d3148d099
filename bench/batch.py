#!/usr/bin/env python
"""Throughput of batch generation (``triplane_turbo.batch.run_batch``) for several batch sizes.

Runs the same prompts with B = 1, 4, 8 prompts per pipeline call in one process, writing the meshes
to a temporary folder, after one untimed warm-up batch; reports meshes per second (the median of
``--repeat`` interleaved rounds). The tiny model measures the harness and the CPU-side costs
(export, baking); on a GPU with the real weights the networks dominate and batching pays.

    python bench/batch.py --tiny --repeat 3 --record BENCHMARKS.md
    python bench/batch.py --device cuda --prompts 64 --record BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.tables import add_rows, commit, machine  # noqa: E402

SECTION = "## Batch generation"
TABLE = """| date | commit | machine | device, dtype | model | prompts | R | texture | batch size | meshes/s | s per mesh |
|---|---|---|---|---|---|---|---|---|---|---|
"""
PROMPTS = ["a wooden chair", "a red sports car", "a teapot", "a corgi taking a selfie", "a steam engine train",
           "a humanoid robot playing the cello", "a table with dim sum on it", "a frog wearing a sweater"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/batch.py", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny random model (else the published weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per batch size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--texture", choices=("vertex", "uv"), nargs="+", default=["vertex", "uv"])
    parser.add_argument("--workers", type=int, nargs="+",
                        help="baking threads to measure with UV textures (0: baking in line; default: 0 and the "
                             "batch command's default for this device)")
    parser.add_argument("--texture-size", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds over every setting, interleaved; rows record the median (this machine's "
                             "throughput moves by ±15 %% from run to run)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--record", type=Path, metavar="BENCHMARKS.md")
    args = parser.parse_args(argv)

    import torch

    from triplane_turbo import TriplaneTurboPipeline, default_dtype
    from triplane_turbo.batch import BatchSettings, PromptLine, run_batch
    from triplane_turbo.cli import baking_workers
    from triplane_turbo.tiny import tiny_pipeline

    worker_counts = args.workers or sorted({0, baking_workers(None, on_cpu=args.device == "cpu")})
    dtype = default_dtype(args.device)
    pipe = tiny_pipeline(device=args.device, dtype=dtype) if args.tiny else \
        TriplaneTurboPipeline.from_pretrained(device=args.device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    lines = [PromptLine(i + 1, PROMPTS[i % len(PROMPTS)]) for i in range(args.prompts)]
    runs = [(texture, workers, size) for texture in args.texture
            for workers in (worker_counts if texture == "uv" else [0]) for size in args.sizes]
    rates = {run: [] for run in runs}
    for _ in range(args.repeat):
        for texture, workers, size in runs:
            settings = BatchSettings(mesh_resolution=args.resolution, texture=texture, texture_size=args.texture_size)
            with tempfile.TemporaryDirectory(prefix="triplane-batch-bench-") as tmp:
                run_batch(pipe, lines[:size], Path(tmp), settings, batch_size=size, workers=workers)  # warm-up
            with tempfile.TemporaryDirectory(prefix="triplane-batch-bench-") as tmp:
                start = time.perf_counter()
                stats = run_batch(pipe, lines, Path(tmp), settings, batch_size=size, base_seed=1000, workers=workers)
                seconds = time.perf_counter() - start
            rates[texture, workers, size].append(stats.ok / seconds)
            print(json.dumps(dict(texture=texture, workers=workers, batch_size=size, ok=stats.ok, seconds=seconds,
                                  meshes_per_second=stats.ok / seconds)), file=sys.stderr)
    rows = [dict(texture=texture, texture_size=args.texture_size, workers=workers, batch_size=size,
                 prompts=len(lines), meshes_per_second=statistics.median(rates[texture, workers, size]),
                 runs=rates[texture, workers, size]) for texture, workers, size in runs]
    result = dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), commit=commit(),
                  machine=machine(args.device), device=args.device, dtype=str(dtype).removeprefix("torch."),
                  model="tiny" if args.tiny else "published", resolution=args.resolution, rows=rows,
                  threads=torch.get_num_threads())
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.record:
        record(args.record, result)
    return 0


def _texture(row: dict) -> str:
    if row["texture"] != "uv":
        return row["texture"]
    workers = row.get("workers", 0)
    return f"uv {row.get('texture_size', 1024)}², " + (f"{workers} baking thread{'s' * (workers > 1)}" if workers
                                                        else "baked in line")


def record(path: Path, result: dict) -> None:
    rows = [[result["date"][:10], result["commit"] or "–", result["machine"], f"{result['device']}, {result['dtype']}",
             result["model"], str(row["prompts"]), str(result["resolution"]), _texture(row), str(row["batch_size"]),
             f"{row['meshes_per_second']:.2f}", f"{1 / row['meshes_per_second']:.2f}"] for row in result["rows"]]
    add_rows(path, SECTION, "Measured by `bench/batch.py`.", TABLE, rows)


if __name__ == "__main__":
    sys.exit(main())
