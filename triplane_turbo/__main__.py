"""Command line: ``python -m triplane_turbo "a wooden chair" -o chair.glb``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

from . import cli
from .export import FORMATS
from .inputs import parse_seed, validate_num_steps


def _seed(text: str) -> int:
    try:
        return parse_seed(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _steps(text: str) -> int:
    try:
        return validate_num_steps(int(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m triplane_turbo",
                                     description="Generate a textured 3D mesh from a text prompt with TriplaneTurbo.",
                                     epilog=cli.WEIGHTS_EPILOG)
    parser.add_argument("prompt", help="what to generate, e.g. 'a wooden chair'")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="output file (default: mesh.<format> in the current folder)")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="file format (default: from the output suffix, else glb)")
    parser.add_argument("--seed", type=_seed, default=None, help="random seed (default: random, printed)")
    parser.add_argument("--steps", type=_steps, default=4, help="denoising steps (the model is distilled for 4)")
    cli.add_mesh_options(parser)
    cli.add_placement_options(parser)
    cli.add_model_options(parser)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    from .inputs import validate_prompts

    try:  # the cheap checks before loading gigabytes
        validate_prompts(args.prompt)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    file_format = args.format or (args.output.suffix.lstrip(".").lower() if args.output and args.output.suffix else "glb")
    if file_format not in FORMATS:
        parser.error(f"unknown format {file_format!r}; choose one of {', '.join(FORMATS)}")
    try:
        placement = cli.placement_options(args, file_format)
    except ValueError as exc:
        parser.error(str(exc))
    output = args.output or Path(f"mesh.{file_format}")
    device = cli.resolve_device(args.device)
    dtype = cli.resolve_dtype(args.dtype, device)

    from .export import export_mesh

    start = time.perf_counter()
    if not args.tiny and not args.quiet:
        print("Loading weights (the first run downloads about 5.3 GB from the Hugging Face Hub)...", file=sys.stderr)
    try:
        pipe = cli.load_pipeline(args, device, dtype)
    except cli.loading_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    load_s = time.perf_counter() - start
    pipe.set_progress_bar_config(disable=args.quiet)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        result = pipe(args.prompt, seed=args.seed, num_steps=args.steps, mesh_resolution=args.resolution,
                      target_faces=args.faces, texture=args.texture, texture_size=args.texture_size, unwrap=args.unwrap)
        generate_s = time.perf_counter() - start
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    mesh = result.meshes[0]
    if len(mesh.faces) == 0:
        print(f"error: no surface for this prompt and seed {result.seeds[0]}; try another seed", file=sys.stderr)
        return 1
    output.parent.mkdir(parents=True, exist_ok=True)
    path = export_mesh(mesh, output, file_format, texture=result.textures[0], **placement)
    side = "_".join(path.stem.split())  # as export names the OBJ's side files
    extra = f" (+ {side}.mtl, {side}.png)" if file_format == "obj" and result.textures[0] is not None else ""
    print(f"{path}{extra}: {len(mesh.vertices)} vertices, {len(mesh.faces)} faces, seed {result.seeds[0]}, "
          f"{generate_s:.1f} s on {device} ({str(dtype).removeprefix('torch.')}; load {load_s:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
