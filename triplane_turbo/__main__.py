"""Command line: ``python -m triplane_turbo "a wooden chair" -o chair.glb``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

from .config import DEFAULT_ADAPTER_REPO, DEFAULT_BASE_MODEL, ENV_ADAPTER, ENV_BASE_MODEL
from .export import FORMATS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m triplane_turbo",
        description="Generate a textured 3D mesh from a text prompt with TriplaneTurbo.",
        epilog=(f"Weights: the base model ({DEFAULT_BASE_MODEL}, about 5.2 GB) and the adapter "
                f"({DEFAULT_ADAPTER_REPO}, about 90 MB) are downloaded from the Hugging Face Hub on first "
                f"use and cached; {ENV_BASE_MODEL} / {ENV_ADAPTER} point to other repos or local paths. "
                "--tiny needs no download (random weights: the shapes are meaningless)."),
    )
    parser.add_argument("prompt", help="what to generate, e.g. 'a wooden chair'")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="output file (default: mesh.<format> in the current folder)")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="file format (default: from the output suffix, else glb)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    parser.add_argument("--resolution", type=int, default=160, help="marching-cubes grid per axis, 32-512")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps (the model is distilled for 4)")
    parser.add_argument("--texture", choices=("uv", "vertex"), default="uv",
                        help="uv: a UV atlas with the colour field baked into an image (default); "
                             "vertex: colours at the vertices only (faster, detail follows the triangle count)")
    parser.add_argument("--texture-size", type=int, default=1024, help="side of the baked texture, 512-4096")
    parser.add_argument("--faces", type=int, default=None,
                        help="simplify to about this many faces (with --texture uv a normal map keeps the "
                             "full surface's shading)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="where to run (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                        help="network precision (auto: float16 on cuda; on cpu bfloat16 where the CPU has native bfloat16, else float32)")
    parser.add_argument("--tiny", action="store_true", help="offline tiny random model, no download")
    parser.add_argument("--base-model", default=None, help=f"Hub id or local folder (env {ENV_BASE_MODEL})")
    parser.add_argument("--adapter", default=None, help=f"Hub id, .pth file or folder (env {ENV_ADAPTER})")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    import torch

    from . import TriplaneTurboPipeline
    from .adapter import CheckpointMismatchError
    from .export import export_mesh
    from .hub import IncompatibleBaseModelError, WeightsNotAvailableError
    from .pipeline import default_dtype, validate_num_steps, validate_prompts, validate_resolution, validate_seed

    try:  # check the cheap things before loading gigabytes
        validate_prompts(args.prompt)
        validate_resolution(args.resolution)
        validate_num_steps(args.steps)
        if not 512 <= args.texture_size <= 4096:
            raise ValueError(f"--texture-size must be between 512 and 4096, got {args.texture_size}")
        if args.faces is not None and not 100 <= args.faces <= 10_000_000:
            raise ValueError(f"--faces must be between 100 and 10000000, got {args.faces}")
        if args.seed is not None:
            validate_seed(args.seed)
    except (TypeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    file_format = args.format or (args.output.suffix.lstrip(".").lower() if args.output and args.output.suffix else "glb")
    if file_format not in FORMATS:
        print(f"error: unknown format {file_format!r}; choose one of {', '.join(FORMATS)}", file=sys.stderr)
        return 2
    output = args.output or Path(f"mesh.{file_format}")

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    dtype = default_dtype(device) if args.dtype == "auto" else getattr(torch, args.dtype)

    start = time.perf_counter()
    try:
        if args.tiny:
            from .tiny import tiny_pipeline

            pipe = tiny_pipeline(device=device, dtype=dtype)
        else:
            if not args.quiet:
                print("Loading weights (the first run downloads about 5.3 GB from the Hugging Face Hub)...",
                      file=sys.stderr)
            pipe = TriplaneTurboPipeline.from_pretrained(args.base_model, args.adapter, device=device, dtype=dtype)
    except (WeightsNotAvailableError, IncompatibleBaseModelError, CheckpointMismatchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    load_s = time.perf_counter() - start
    pipe.set_progress_bar_config(disable=args.quiet)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        result = pipe(args.prompt, seed=args.seed, num_steps=args.steps, mesh_resolution=args.resolution,
                      target_faces=args.faces, texture=args.texture, texture_size=args.texture_size)
        generate_s = time.perf_counter() - start
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    mesh = result.meshes[0]
    if len(mesh.faces) == 0:
        print(f"error: no surface for this prompt and seed {result.seeds[0]}; try another seed", file=sys.stderr)
        return 1
    output.parent.mkdir(parents=True, exist_ok=True)
    path = export_mesh(mesh, output, file_format, texture=result.textures[0])
    side = "_".join(path.stem.split())  # as export names the OBJ's side files
    extra = f" (+ {side}.mtl, {side}.png)" if file_format == "obj" and result.textures[0] is not None else ""
    print(f"{path}{extra}: {len(mesh.vertices)} vertices, {len(mesh.faces)} faces, seed {result.seeds[0]}, "
          f"{generate_s:.1f} s on {device} ({str(dtype).removeprefix('torch.')}; load {load_s:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
