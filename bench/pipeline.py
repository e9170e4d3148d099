#!/usr/bin/env python
"""Benchmark of the whole TriplaneTurbo pipeline, prompt -> GLB, against the authors' way of computing.

Each variant runs in its own child process (so that peak RSS is that variant's own):

* ``ours``: the library's defaults — fused SDPA for the joint six-plane attention, shared LoRA/LoCON
  merged into the base weights, channels-last convolutions, SDF on the grid by separable
  interpolation, marching cubes on the SDF's device, deformation only at the ends of crossed edges —
  in the chosen dtype;
* ``baseline``: what the authors' code computes, with the library's modules: float32, NCHW
  convolutions, explicit softmax(QKᵀ)V attention, LoRA not merged, SDF and deformation at every one
  of the R³ grid points (point-wise plane sampling, in chunks), marching cubes on the dense grids,
  colours at the vertices, GLB export.

Both are built from the same random weights (the full Stable Diffusion 2.1-base architecture; no
download), so the outputs can be compared; the parent process combines the two reports.

This module is the command line and the parent; one variant's work is ``bench.pipeline_variant``, the
combined result, its summary and its BENCHMARKS.md row are ``bench.pipeline_report``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout: the library is not installed
    sys.path.insert(0, str(REPO))

from bench.pipeline_report import combine, machine_busy, machine_info, record, summary  # noqa: E402
from bench.pipeline_variant import run_variant  # noqa: E402

DEFAULT_PROMPT = "a DSLR photo of a bald eagle"
VARIANTS = ("ours", "baseline")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/pipeline.py",
        description=textwrap.fill(
            "Time TriplaneTurbo from prompt to GLB file on the full Stable Diffusion 2.1-base "
            "architecture with random weights (no download), and compare it with a baseline that "
            "computes the way the authors' code does (float32, explicit softmax attention, LoRA not "
            "merged, SDF and deformation at every grid point). Reports the median wall time of "
            "--runs runs after --warmup warm-up runs, per stage (text, denoise, decode, fields, "
            "isosurface, color, export), the speed-up over the baseline, peak RSS (and peak VRAM on "
            "CUDA) of each variant measured in its own process, and how far our triplane and SDF "
            "grid are from the baseline's. Recorded figures go to BENCHMARKS.md (--record); take "
            "them on an otherwise idle machine."),
        epilog=("examples:\n"
                "  python bench/pipeline.py --small --runs 2            # seconds: checks the harness\n"
                "  python bench/pipeline.py --device cpu --runs 3 --json cpu.json --record BENCHMARKS.md\n"
                "  python bench/pipeline.py --device cuda --runs 10 --json cuda.json --record BENCHMARKS.md\n"
                "  python bench/pipeline.py --from-json cuda.json --record BENCHMARKS.md  # record a copied result"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to run (default: cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="dtype of the UNet, VAE and text encoder for our pipeline (the fields stay "
                             "float32; the baseline is always float32). Default: float32 on cpu, "
                             "float16 on cuda")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per variant; medians are reported (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs per variant (default: 1)")
    parser.add_argument("--resolution", type=int, default=160, help="marching-cubes grid per axis (default: 160, the published value)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"prompt (default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--seed", type=int, default=42, help="noise seed (default: 42)")
    parser.add_argument("--texture", choices=("vertex", "uv"), default="vertex",
                        help="our pipeline's texturing: vertex colours as the baseline (default, so rows compare), "
                             "or a baked UV texture (GLB with the texture embedded)")
    parser.add_argument("--faces", type=int, help="simplify our mesh to about this many faces first")
    parser.add_argument("--texture-size", type=int, default=1024, help="baked texture side (default: 1024)")
    parser.add_argument("--json", type=Path, help="write the results here as JSON (they are always printed)")
    parser.add_argument("--no-baseline", action="store_true", help="time only our pipeline")
    parser.add_argument("--record", type=Path, metavar="BENCHMARKS.md",
                        help="append one table row to this markdown file (created with its header if missing)")
    parser.add_argument("--note", default="", help="free text for the recorded row's note column")
    parser.add_argument("--from-json", type=Path, metavar="RESULT.json",
                        help="run nothing: print the summary of a result written earlier by --json (say, on a "
                             "GPU machine) and, with --record, add its row")
    parser.add_argument("--small", action="store_true",
                        help="use the tiny architecture of triplane_turbo.tiny (a smoke test of the harness, "
                             "not a benchmark)")
    # internal: run one variant in this process and write its report (used by the parent)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tensors", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        parser.error("--runs must be >= 1 and --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.dtype is None:
        args.dtype = "float16" if args.device == "cuda" else "float32"
    if args.variant and not (args.report and args.tensors):
        parser.error("--variant needs --report and --tensors")
    return args


# ---------------------------------------------------------------------------------------------------
# Parent: run the variants, compare, report, record
# ---------------------------------------------------------------------------------------------------

def _child_command(args, variant: str, report: Path, tensors: Path) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--report", str(report),
           "--tensors", str(tensors), "--device", args.device, "--dtype", args.dtype,
           "--runs", str(args.runs), "--warmup", str(args.warmup), "--resolution", str(args.resolution),
           "--prompt", args.prompt, "--seed", str(args.seed), "--texture", args.texture,
           "--texture-size", str(args.texture_size)]
    if args.faces:
        cmd += ["--faces", str(args.faces)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.small:
        cmd.append("--small")
    return cmd


def run_child(args, variant: str, tmp: Path) -> tuple[dict, dict]:
    import torch

    report, tensors = tmp / f"{variant}.json", tmp / f"{variant}.pt"
    result = subprocess.run(_child_command(args, variant, report, tensors), cwd=REPO)
    if result.returncode != 0 or not report.exists():
        raise SystemExit(f"bench: the {variant} run failed (exit code {result.returncode}); see its output above")
    return json.loads(report.read_text()), torch.load(tensors, weights_only=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.variant:  # child process: one variant
        report = run_variant(args)
        args.report.write_text(json.dumps(report, indent=2))
        return 0
    if args.from_json:  # a run made elsewhere (e.g. on a GPU machine): show it, and record it if asked
        result = json.loads(args.from_json.read_text())
        print(summary(result))
        return _record(args, result)
    machine = machine_info()
    if machine_busy(machine):
        print(f"bench: warning: load average {machine['load_avg_start'][0]:.1f} on "
              f"{machine['cores_available']} cores — timings will not be representative", file=sys.stderr)
    native = {"bfloat16": {"avx512_bf16", "amx_bf16"}, "float16": {"avx512_fp16", "amx_fp16"}}.get(args.dtype)
    if args.device == "cpu" and native and machine["cpu_flags"] and not native & set(machine["cpu_flags"]):
        print(f"bench: warning: this CPU has no native {args.dtype} arithmetic ({' or '.join(sorted(native))}); "
              f"its {args.dtype} convolutions are emulated and can be tens of times slower than float32",
              file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="triplane-bench-") as tmp:
        ours, ours_t = run_child(args, "ours", Path(tmp))
        base, base_t = (None, None) if args.no_baseline else run_child(args, "baseline", Path(tmp))
        result = combine(args, machine, ours, ours_t, base, base_t)
    print(summary(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"results written to {args.json}")
    return _record(args, result)


def _record(args, result: dict) -> int:
    if args.record:
        if not result["valid"]:
            print(f"bench: not recording an invalid run in {args.record}", file=sys.stderr)
            return 1
        record(args.record, result, args.note)
        print(f"row added to {args.record}")
    return 0 if result["valid"] else 1


if __name__ == "__main__":
    sys.exit(main())
