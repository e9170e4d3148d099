"""What the pipeline benchmark (bench/pipeline.py) reports: the machine, the two variants' reports
combined into one result (speed-up, field error, validity), its printed summary, and its row in the
runs table of BENCHMARKS.md."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from bench.pipeline_variant import STAGES

REPO = Path(__file__).resolve().parent.parent


def relative_error(ours, reference) -> float:
    """max |ours − reference| / max |reference|."""
    return float((ours.float() - reference.float()).abs().max() / reference.float().abs().max().clamp_min(1e-30))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    """The CPU features that decide reduced-precision speed on the CPU (x86 /proc/cpuinfo names)."""
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    return [f for f in wanted if f in present]
    except OSError:
        pass
    return []


def machine_busy(machine: dict) -> bool:
    """Whether the 1-minute load average at the start says that others were using the CPU."""
    return machine["load_avg_start"][0] >= max(0.5, 0.25 * (machine["cores_available"] or 1))


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _commit() -> str | None:
    try:  # read-only
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    import psutil

    return {
        "cpu": _cpu_model(), "cpu_flags": _cpu_flags(), "cores_logical": os.cpu_count(), "cores_physical": psutil.cpu_count(logical=False),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        "os": platform.platform(), "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("torch", "diffusers", "transformers", "peft", "numpy", "PyMCubes", "trimesh")},
    }


def combine(args, machine: dict, ours: dict, ours_t: dict, base: dict | None, base_t: dict | None) -> dict:
    machine = dict(machine, threads=ours["threads"], torch_cpu_capability=ours["cpu_capability"],
                   gpu=ours.get("gpu"), cuda=ours.get("cuda"),
                   load_avg_end=[round(x, 2) for x in os.getloadavg()])
    result = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": _commit(),
        "model": "tiny (triplane_turbo.tiny; harness smoke test)" if args.small else "SD-2.1-base + PETA, random weights",
        "device": args.device, "dtype": ours["dtype"], "resolution": args.resolution,
        "runs": args.runs, "warmup": args.warmup, "prompt": args.prompt, "seed": args.seed,
        "texture": args.texture, "faces": args.faces, "texture_size": args.texture_size,
        "median_s": ours["median_s"], "runs_s": ours["runs_s"], "warmup_runs_s": ours["warmup_runs_s"],
        "stages": ours["stages"],
        "baseline_median_s": None, "baseline_runs_s": None, "speedup": None, "baseline_stages": None,
        "peak_rss_mb": ours["peak_rss_mb"], "peak_rss_run_mb": ours["peak_rss_run_mb"],
        "rss_after_load_mb": ours["rss_after_load_mb"], "load_s": ours["load_s"],
        "mesh": ours["mesh"], "checks": ours["checks"],
        "machine": machine,
    }
    if args.device == "cuda":
        result.update(peak_vram_mb=ours["peak_vram_mb"], vram_after_load_mb=ours["vram_after_load_mb"])
    if base is not None:
        result.update(
            baseline_median_s=base["median_s"], baseline_runs_s=base["runs_s"],
            baseline_warmup_runs_s=base["warmup_runs_s"],
            speedup=base["median_s"] / ours["median_s"], baseline_stages=base["stages"],
            baseline_peak_rss_mb=base["peak_rss_mb"], baseline_peak_rss_run_mb=base["peak_rss_run_mb"],
            baseline_load_s=base["load_s"], baseline_mesh=base["mesh"], baseline_checks=base["checks"],
            field_error={
                "reference": "baseline (float32, authors' computation)",
                "triplane_rel_max_abs": relative_error(ours_t["triplane"], base_t["triplane"]),
                "sdf_rel_max_abs": relative_error(ours_t["sdf"], base_t["sdf"]),
                "sdf_sign_mismatch_fraction": float(((ours_t["sdf"] < 0) != (base_t["sdf"] < 0)).float().mean()),
            })
        if args.device == "cuda":
            result["baseline_peak_vram_mb"] = base["peak_vram_mb"]
    checks = [result["checks"]] + ([result["baseline_checks"]] if base is not None else [])
    result["valid"] = all(c["triplane_finite"] and c["sdf_finite"] and c["mesh_nonempty"] for c in checks)
    return result


def summary(result: dict) -> str:
    lines = [f"TriplaneTurbo prompt -> GLB  ({result['model']}; {result['device']}, {result['dtype']}, "
             f"R={result['resolution']}, median of {result['runs']} after {result['warmup']} warm-up)"]
    base = result["baseline_stages"]
    lines.append(f"  {'stage':<11}{'ours s':>10}" + (f"{'baseline s':>12}" if base else ""))
    for stage, value in result["stages"].items():
        lines.append(f"  {stage:<11}{value:>10.3f}" + (f"{base.get(stage, 0.0):>12.3f}" if base else ""))
    lines.append(f"  {'total':<11}{result['median_s']:>10.3f}"
                 + (f"{result['baseline_median_s']:>12.3f}   speed-up x{result['speedup']:.2f}" if base else ""))
    run_peak = result["peak_rss_run_mb"]
    lines.append(f"  peak RSS {result['peak_rss_mb']:.0f} MiB"
                 + (f" (during generation {run_peak:.0f})" if run_peak is not None else "")
                 + (f", baseline {result['baseline_peak_rss_mb']:.0f} MiB" if base else ""))
    if "peak_vram_mb" in result:
        lines.append(f"  peak VRAM {result['peak_vram_mb']:.0f} MiB"
                     + (f", baseline {result['baseline_peak_vram_mb']:.0f} MiB" if base else ""))
    lines.append(f"  mesh {result['mesh']['vertices']} vertices, {result['mesh']['faces']} faces")
    if base:
        err = result["field_error"]
        lines.append(f"  vs baseline: triplane {err['triplane_rel_max_abs']:.2e}, SDF {err['sdf_rel_max_abs']:.2e} "
                     f"(max |Δ| / max |baseline|), SDF sign differs at {err['sdf_sign_mismatch_fraction']:.2e} of the grid")
    if not result["valid"]:
        lines.append("  INVALID: non-finite outputs or an empty mesh (see 'checks')")
    return "\n".join(lines)


INTRO = """# Benchmarks

Wall time of one generation, **prompt → GLB file**, measured by `bench/pipeline.py` (see
`bench/README.md`). Method:

* the full Stable Diffusion 2.1-base architecture + the PETA adapter with the published ranks, filled
  with **random weights** (the cost does not depend on the values; no download needed);
* each variant runs in its own process: build the model, `--warmup` untimed runs, then `--runs` timed
  runs; every figure is the **median** of the timed runs; taken on an **otherwise idle machine**
  (the load average at the start is in the JSON and in the note when it was high);
* **ours** = the library's defaults in the listed dtype (fused SDPA joint attention, LoRA merged into
  the weights, channels-last convolutions, SDF on the grid by separable interpolation, marching cubes
  on the SDF's device, deformation only at the ends of crossed edges);
  **baseline** = what the authors' code computes: float32, NCHW convolutions, explicit softmax(QKᵀ)V,
  LoRA unmerged, SDF and deformation at all R³ grid points, marching cubes, vertex colours, GLB export
  (rows before 2026-11-28 ran the baseline's marching cubes with PyMCubes, and ours with PyMCubes after
  a near-surface deformation pass; rows from commits before 437aa4d scaled the baseline's attention
  scores in a pass of their own after QKᵀ, later ones inside the product as the diffusers processor
  that the authors call does: one UNet call of the tiny test fixture took 2.7 → 1.6 s on the CPU).

Columns: *ours / baseline s* — median seconds, prompt → GLB; *×* — baseline / ours; *stages* — our
medians in seconds for text encoding / 4 denoising steps / VAE decode / grid SDF / isosurface
(deformation + marching cubes) / vertex colours / GLB export; *peak RSS* — peak resident memory of each
variant's process in MiB, model building included (float weights are built in float32, then cast);
*VRAM* — `torch.cuda.max_memory_allocated` during generation, MiB; *field error* — max |ours −
baseline| / max |baseline| for the triplane and for the SDF grid (float32: kernel rounding only;
reduced precision: the error that precision adds); *mesh* — vertices / faces at R = 160 unless the
row says otherwise.

Re-run: `python bench/pipeline.py --device cpu --runs 3 --json cpu.json --record BENCHMARKS.md`
(`--device cuda` uses float16 by default; `--dtype bfloat16` on the CPU is worth timing only on CPUs
with AVX512-BF16 or AMX — elsewhere it is emulated and far slower than float32). A full CPU run takes
tens of minutes on two cores.

"""
TABLE_COLUMNS = """| date | commit | machine | device, dtype | threads | ours s | baseline s | × | stages s (text/denoise/decode/fields/iso/color/export) | peak RSS MiB ours / baseline | VRAM MiB ours / baseline | field error triplane / SDF | mesh V / F | runs (warm-up) | note |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
"""


def table_row(result: dict, note: str) -> str:
    def f(x, fmt="{:.2f}"):
        return "–" if x is None else fmt.format(x)

    m = result["machine"]
    machine = m["cpu"] + f", {m['cores_available']} cores" + (f", {m['gpu']}" if m.get("gpu") else "")
    stages = "/".join(f(result["stages"].get(s), "{:.2f}") for s in STAGES if s != "texture")
    err = result.get("field_error")
    notes = [n for n in (note,) if n]
    if result["model"].startswith("tiny"):
        notes.insert(0, "TINY MODEL, harness smoke test")
    if result["resolution"] != 160:
        notes.append(f"R = {result['resolution']}")
    if result.get("faces"):
        notes.append(f"simplified to {result['faces']} faces")
    if result.get("texture") == "uv":
        notes.append(f"UV texture {result['texture_size']}² (bake {f(result['stages'].get('texture'))} s, in the total)")
    if machine_busy(m):
        notes.append(f"machine busy: load {m['load_avg_start'][0]:.1f} at start")
    cells = [
        result["date"][:10], result["commit"] or "–", machine, f"{result['device']}, {result['dtype']}",
        str(m["threads"]), f(result["median_s"]), f(result["baseline_median_s"]),
        f(result["speedup"], "{:.2f}"), stages,
        f"{f(result['peak_rss_mb'], '{:.0f}')} / {f(result.get('baseline_peak_rss_mb'), '{:.0f}')}",
        f"{f(result.get('peak_vram_mb'), '{:.0f}')} / {f(result.get('baseline_peak_vram_mb'), '{:.0f}')}",
        f"{f(err and err['triplane_rel_max_abs'], '{:.1e}')} / {f(err and err['sdf_rel_max_abs'], '{:.1e}')}",
        f"{result['mesh']['vertices']} / {result['mesh']['faces']}",
        f"{result['runs']} ({result['warmup']})", "; ".join(notes),
    ]
    return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |\n"


def record(path: Path, result: dict, note: str) -> None:
    """Add one row at the end of the runs table (sections after it stay after it); a missing or empty
    file gets the explanation and the table header first."""
    text = path.read_text() if path.exists() else ""
    if not text.strip():
        text = INTRO + TABLE_COLUMNS
    elif TABLE_COLUMNS.splitlines()[0] not in text:
        text = text.rstrip("\n") + "\n\n" + TABLE_COLUMNS
    lines = text.splitlines(keepends=True)
    end = lines.index(TABLE_COLUMNS.splitlines(keepends=True)[0])
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    if end and not lines[end - 1].endswith("\n"):
        lines[end - 1] += "\n"
    lines.insert(end, table_row(result, note))
    path.write_text("".join(lines))
