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
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout: the library is not installed
    sys.path.insert(0, str(REPO))

#: Stages timed in each generation (seconds); "other" is the rest of the wall time (noise, overhead).
STAGES = ("text", "denoise", "decode", "fields", "isosurface", "color", "texture", "export")
DEFAULT_PROMPT = "a DSLR photo of a bald eagle"
#: Points per chunk when the baseline evaluates the fields at every grid point.
BASELINE_CHUNK = 262144
VARIANTS = ("ours", "baseline")
WEIGHT_SEED = 0  # random base weights; the adapter uses the same seed


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
# Measuring
# ---------------------------------------------------------------------------------------------------

def _rss_status(field: str) -> float | None:
    """A field of /proc/self/status in MiB (VmRSS: now, VmHWM: peak), or None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB."""
    hwm = _rss_status("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ≥ 4.0, /proc/self/clear_refs); False when impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@contextmanager
def _timer(timings: dict, name: str, device):
    _sync(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        _sync(device)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------
# Building the model (random weights, no download)
# ---------------------------------------------------------------------------------------------------

def _fill_random(module, generator) -> None:
    """Deterministic random weights, fast: uniform with the variance of N(0, 1/fan_in) for weights,
    N(0, 0.02²)-sized biases, norm layers at weight 1 / bias 0. Activations stay of order one."""
    import torch
    from torch import nn

    norm_params = set()
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                for name, p in m.named_parameters(recurse=False):
                    p.fill_(1.0 if name == "weight" else 0.0)
                    norm_params.add(id(p))
        for p in module.parameters():
            if id(p) in norm_params:
                continue
            std = p[0].numel() ** -0.5 if p.ndim >= 2 else 0.02
            p.uniform_(-std * 3 ** 0.5, std * 3 ** 0.5, generator=generator)
        for name, buf in module.named_buffers():
            if name.endswith("position_ids"):
                buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))
            else:
                raise RuntimeError(f"bench: no rule to initialise the buffer {name!r} of "
                                   f"{type(module).__name__}; add one to _fill_random")


def build_pipeline(variant: str, small: bool, device: str, dtype):
    """The pipeline of one variant on random weights: same weights for both variants.

    The networks are built on the meta device and filled by ``_fill_random`` (seconds, where the
    default initialisers take about half a minute at full size); the adapter comes from
    ``triplane_turbo.tiny.random_adapter_state_dict`` (SDF head scaled down, so the sphere prior keeps
    the surface a closed blob).
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from triplane_turbo import config as cfg
    from triplane_turbo import tiny
    from triplane_turbo.adapter import AdapterSpec
    from triplane_turbo.pipeline import TriplaneTurboPipeline

    with tempfile.TemporaryDirectory(prefix="triplane-bench-tok-") as tmp:
        tiny.write_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    if small:
        unet_config, vae_config = tiny.TINY_UNET, tiny.TINY_VAE
        text_config = dict(tiny.TINY_TEXT, vocab_size=len(tokenizer))
        spec = AdapterSpec(out_channels=16, mlp_hidden=(16, 16), **tiny.ADAPTER_RANKS)
        gen_config = cfg.GenerationConfig(latent_size=16)
    else:
        unet_config, vae_config, text_config = cfg.SD21_UNET_CONFIG, cfg.SD21_VAE_CONFIG, cfg.SD21_TEXT_CONFIG
        spec = AdapterSpec(**cfg.PUBLISHED_ADAPTER)
        gen_config = cfg.GenerationConfig()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    vae.encoder = None  # as from_pretrained does: only the decoder is used
    vae.quant_conv = None
    generator = torch.Generator().manual_seed(WEIGHT_SEED)
    for module in (text_encoder, unet, vae):
        module.to_empty(device="cpu")
        _fill_random(module, generator)
    adapter = tiny.random_adapter_state_dict(unet, vae, spec, seed=WEIGHT_SEED)
    with warnings.catch_warnings():  # SD ships a PNDM config; DDIM reads the same fields
        warnings.simplefilter("ignore")
        scheduler = DDIMScheduler.from_config(tiny.SD21_SCHEDULER)
    fast = variant == "ours"
    pipe = TriplaneTurboPipeline.from_components(
        tokenizer, text_encoder, unet, vae, scheduler, adapter, fuse_lora=fast,
        attention_kernel="sdpa" if fast else "math", channels_last=fast, config=gen_config)
    del adapter
    pipe.to(device, dtype if fast else torch.float32)
    pipe.set_progress_bar_config(disable=True)
    gc.collect()
    return pipe


# ---------------------------------------------------------------------------------------------------
# One generation, prompt -> GLB
# ---------------------------------------------------------------------------------------------------

def generate_ours(pipe, prompt: str, seed: int, resolution: int, glb: Path, texture: str = "vertex",
                  faces: int | None = None, texture_size: int = 1024):
    """The library's pipeline call, then GLB export. Returns (stage timings, triplane, mesh)."""
    from triplane_turbo.export import export_mesh

    out = pipe(prompt, seed=seed, mesh_resolution=resolution, texture=texture, target_faces=faces,
               texture_size=texture_size)
    timings = dict(out.timings)
    mesh = out.meshes[0]
    with _timer(timings, "export", pipe.device):
        if len(mesh.faces):
            export_mesh(mesh, glb, texture=out.textures[0])
    return timings, out.triplane, mesh


def dense_fields(fields, triplane, resolution: int, chunk: int = BASELINE_CHUNK):
    """SDF [R, R, R] and deformation [R, R, R, 3] at every grid point, point by point, as the
    authors' ``forward_field`` does: the three geometry planes sampled bilinearly at each point,
    summed, then the SDF head (plus the sphere prior) and the deformation head."""
    import torch
    import torch.nn.functional as F

    from triplane_turbo.triplane import plane_coordinates

    planes = triplane[0, :3].float()  # [3, C, H, W]: geometry xy, xz, yz (one object)
    sdf, deformation = [], []
    for points in fields.grid_points(resolution).split(chunk):  # [N, 3], x slowest
        coords = plane_coordinates(fields.normalize(points).float())  # [3, N, 2]
        s = F.grid_sample(planes, coords[:, None], mode="bilinear", padding_mode="zeros",
                          align_corners=False)  # [3, C, 1, N]
        geometry = (s[0] + s[1] + s[2])[:, 0].T  # [N, C]
        sdf.append(fields.sdf_network(geometry)[:, 0] + fields.sphere_prior(points)[:, 0])
        deformation.append(fields.deformation_network(geometry))
    r = resolution
    return torch.cat(sdf).reshape(r, r, r), torch.cat(deformation).reshape(r, r, r, 3)


def generate_baseline(pipe, prompt: str, seed: int, resolution: int, glb: Path):
    """The authors' computation (see the module docstring). Returns (timings, triplane, mesh, sdf)."""
    import torch
    import trimesh

    from triplane_turbo.export import export_mesh
    from triplane_turbo.isosurface import marching_cubes
    from triplane_turbo.texturing.bake import vertex_colors

    t: dict[str, float] = {}
    device = pipe.device
    with torch.inference_mode():
        with _timer(t, "text", device):
            embeddings = pipe.encode_prompt([prompt])
        latents = pipe.prepare_latents(1, torch.Generator("cpu").manual_seed(seed))  # as pipe(seed=...)
        with _timer(t, "denoise", device):
            x0 = pipe.denoise(embeddings, latents, pipe.config.num_steps)
        with _timer(t, "decode", device):
            triplane = pipe.decode_triplane(x0)
        with _timer(t, "fields", device):
            sdf, deformation = dense_fields(pipe.fields, triplane, resolution)
        with _timer(t, "isosurface", device):
            vertices, faces = marching_cubes(sdf, deformation, pipe.fields.bbox.cpu().numpy())
            mesh = trimesh.Trimesh(vertices, faces, process=False)
        with _timer(t, "color", device):
            if len(mesh.vertices):
                mesh.visual.vertex_colors = vertex_colors(pipe.fields, triplane, mesh.vertices)
        with _timer(t, "export", device):
            if len(mesh.faces):
                export_mesh(mesh, glb)
    return t, triplane, mesh, sdf


# ---------------------------------------------------------------------------------------------------
# One variant (child process)
# ---------------------------------------------------------------------------------------------------

def _log(variant: str, message: str) -> None:
    print(f"[{variant}] {message}", file=sys.stderr, flush=True)


def _median_stages(per_run: list[dict]) -> dict[str, float]:
    names = [s for s in (*STAGES, "other") if any(s in r for r in per_run)]
    return {s: statistics.median(r.get(s, 0.0) for r in per_run) for s in names}


def run_variant(args) -> dict:
    import torch

    from triplane_turbo.isosurface import EmptySurfaceWarning

    variant = args.variant
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but torch sees no CUDA device")
    dtype = getattr(torch, args.dtype) if variant == "ours" else torch.float32
    size = "tiny" if args.small else "full-size SD-2.1-base"
    _log(variant, f"building the {size} model with random weights ({str(dtype).replace('torch.', '')}, {args.device})")
    start = time.perf_counter()
    pipe = build_pipeline(variant, args.small, args.device, dtype)
    load_s = time.perf_counter() - start
    report: dict = {
        "variant": variant, "dtype": str(pipe.dtype).replace("torch.", ""), "load_s": load_s,
        "rss_after_load_mb": _rss_status("VmRSS"), "peak_rss_load_mb": peak_rss_mb(),
        "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    _log(variant, f"built in {load_s:.1f} s, RSS {report['rss_after_load_mb'] or 0:.0f} MiB")
    if args.device == "cuda":
        torch.cuda.synchronize()
        report["vram_after_load_mb"] = torch.cuda.memory_allocated() / 2**20
        report["gpu"] = torch.cuda.get_device_name()
        report["cuda"] = torch.version.cuda
        torch.cuda.reset_peak_memory_stats()
    peak_reset = reset_peak_rss()

    totals, warmups, per_run, empty_surface = [], [], [], False
    with tempfile.TemporaryDirectory(prefix="triplane-bench-") as tmp:
        glb = Path(tmp) / f"{variant}.glb"
        for i in range(args.warmup + args.runs):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", EmptySurfaceWarning)
                _sync(args.device)
                start = time.perf_counter()
                if variant == "ours":
                    timings, triplane, mesh = generate_ours(pipe, args.prompt, args.seed, args.resolution, glb,
                                                            args.texture, args.faces, args.texture_size)
                else:
                    timings, triplane, mesh, sdf = generate_baseline(pipe, args.prompt, args.seed, args.resolution, glb)
                _sync(args.device)
                total = time.perf_counter() - start
            empty_surface |= any(issubclass(w.category, EmptySurfaceWarning) for w in caught)
            timings["other"] = max(0.0, total - sum(timings.values()))
            warm = i < args.warmup
            _log(variant, f"{'warm-up' if warm else 'run'} {i + 1 - (0 if warm else args.warmup)}/"
                          f"{args.warmup if warm else args.runs}: {total:.2f} s  ("
                          + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()) + ")")
            if warm:
                warmups.append(total)
            else:
                totals.append(total)
                per_run.append(timings)
        glb_bytes = glb.stat().st_size if glb.exists() else 0

    report["peak_rss_mb"] = max(peak_rss_mb(), report["peak_rss_load_mb"])
    report["peak_rss_run_mb"] = peak_rss_mb() if peak_reset else None
    if args.device == "cuda":
        report["peak_vram_mb"] = torch.cuda.max_memory_allocated() / 2**20
        report["peak_vram_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
    with torch.inference_mode():
        triplane = triplane.float()
        if variant == "ours":  # the grid SDF ours meshed (deterministic: recomputed outside the timing)
            sdf = pipe.fields.grid_sdf(triplane.to(pipe.fields.bbox.device), args.resolution,
                                       pipe.mesher.field_chunk())[0]
        triplane, sdf = triplane[0].cpu(), sdf.float().cpu()
    torch.save({"triplane": triplane, "sdf": sdf}, args.tensors)
    report.update(
        median_s=statistics.median(totals), runs_s=totals, warmup_runs_s=warmups, stages=_median_stages(per_run),
        mesh={"vertices": len(mesh.vertices), "faces": len(mesh.faces), "glb_bytes": glb_bytes},
        checks={"triplane_finite": bool(torch.isfinite(triplane).all()),
                "sdf_finite": bool(torch.isfinite(sdf).all()),
                "mesh_nonempty": len(mesh.faces) > 0, "empty_surface_warning": empty_surface},
    )
    return report


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
