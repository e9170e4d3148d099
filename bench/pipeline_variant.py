"""One variant of the pipeline benchmark (bench/pipeline.py), run in a child process of its own so that
its peak RSS is its own: the model on random weights, one generation prompt -> GLB the library's way
(``ours``) or the authors' way (``baseline``), and the timed runs with their memory figures.

Both variants are built from the same random weights (the full Stable Diffusion 2.1-base
architecture; no download), so that the parent can compare their triplanes and SDF grids.
"""

from __future__ import annotations

import gc
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

#: Stages timed in each generation (seconds); "other" is the rest of the wall time (noise, overhead).
STAGES = ("text", "denoise", "decode", "fields", "isosurface", "color", "texture", "export")
#: Points per chunk when the baseline evaluates the fields at every grid point.
BASELINE_CHUNK = 262144
WEIGHT_SEED = 0  # random base weights; the adapter uses the same seed


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
