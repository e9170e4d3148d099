"""Command line for the paper's evaluation: ``python -m triplane_turbo.evaluate --prompts FILE --out DIR``.

    python -m triplane_turbo.evaluate --prompts dreamfusion_415_prompt_library.json --out eval/published
    python -m triplane_turbo.evaluate --prompts FILE --out eval/quirks --authors-quirks   # like for like with the paper
    accelerate launch --multi_gpu --num_processes 4 -m triplane_turbo.evaluate --prompts FILE --out eval/a
    python -m triplane_turbo.evaluate --compare eval/a eval/b --out eval/a-vs-b
    python -m triplane_turbo.evaluate --prompts p.txt --out /tmp/ev --tiny       # offline smoke test, random models

Meshes (the batch machinery: resumable, split across processes), the authors' views, CLIP ViT-B/32,
C.S. / R@1 / R@5 into ``DIR/metrics.json``, ``metrics.md`` and ``contact_sheet.png``; the library
behind it is ``triplane_turbo.evaluation``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from . import cli
from .config import MAX_SEED
from .evaluation.protocol import DEFAULT_CLIP, DEFAULT_TEMPLATE, EvalSettings


def build_parser() -> argparse.ArgumentParser:
    defaults = EvalSettings()
    parser = argparse.ArgumentParser(
        prog="python -m triplane_turbo.evaluate",
        description="CLIP score and CLIP Recall@1/@5 of the model on a prompt list, with the paper's protocol "
                    "(meshes -> 4 views -> CLIP ViT-B/32). Resumable; under `accelerate launch` the prompts are "
                    "split across the processes.",
        epilog=cli.WEIGHTS_EPILOG + f" The CLIP model ({DEFAULT_CLIP}, about 0.6 GB) is downloaded the same way.")
    parser.add_argument("--prompts", type=Path,
                        help="a UTF-8 text file (one prompt per line) or a JSON prompt library (its 'test' list), "
                             "e.g. the authors' dreamfusion_415_prompt_library.json")
    parser.add_argument("--out", type=Path, help="output folder (created; the same folder again resumes)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("DIR_A", "DIR_B"),
                        help="compare two evaluation folders instead (writes compare.md and compare.png into --out, "
                             "default ./compare-A-vs-B)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="line n uses seed SEED + n - 1 (default 0)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N prompts")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per pipeline call (default 1)")
    cli.add_workers_option(parser)
    cli.add_mesh_options(parser, resolution=defaults.mesh_resolution, texture=defaults.texture)
    group = parser.add_argument_group("views and scoring (defaults: the paper's protocol)")
    group.add_argument("--views", type=int, default=defaults.views, help="azimuths per mesh (default 4: 0/90/180/270)")
    group.add_argument("--image-size", type=int, default=defaults.image_size, help="view side in pixels (default 512)")
    group.add_argument("--elevation", type=float, default=defaults.elevation,
                       help="camera degrees above the horizon (default 15)")
    group.add_argument("--radius", type=float, default=defaults.radius, help="camera distance (default 3)")
    group.add_argument("--fov", type=float, default=defaults.fov, help="vertical field of view in degrees (default 50)")
    group.add_argument("--normals", action="store_true", help="also write normal-map views (not scored)")
    group.add_argument("--clip", default=None, help=f"CLIP model: Hub id or folder (default {DEFAULT_CLIP}, env "
                                                    "TRIPLANE_TURBO_CLIP; --tiny: a tiny random CLIP)")
    group.add_argument("--text-template", default=None,
                       help=f"text CLIP reads, with {{prompt}} (default {DEFAULT_TEMPLATE!r})")
    group.add_argument("--authors-quirks", action="store_true",
                       help="the authors' text ('A photo depicts' glued to the prompt as the file spells it, leading "
                            "spaces kept, commas and periods removed) and their dropped prompts (those with an "
                            "apostrophe), to compare with the paper like for like")
    group.add_argument("--authors-precision", action="store_true",
                       help="score in float16 numpy as the authors' script on a GPU (norms, products, mean; R@1 by "
                            "argmax, ties to the first text in line order)")
    group.add_argument("--no-contact-sheet", action="store_true", help="skip contact_sheet.png")
    cli.add_model_options(parser)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compare is None and (args.prompts is None or args.out is None):
        parser.error("--prompts and --out are required (or --compare DIR_A DIR_B)")
    if not 0 <= args.seed <= MAX_SEED:
        parser.error(f"--seed must be between 0 and {MAX_SEED}")
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--batch-size and --limit must be at least 1")
    try:
        args.settings = settings_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    """The ``EvalSettings`` the command line asks for (``--authors-quirks``: ``EvalSettings.authors``)."""
    values = dict(seed=args.seed, mesh_resolution=args.resolution, texture=args.texture,
                  texture_size=args.texture_size, target_faces=args.faces, unwrap=args.unwrap, views=args.views,
                  image_size=args.image_size, elevation=args.elevation, radius=args.radius, fov=args.fov,
                  normals=args.normals, authors_precision=args.authors_precision)
    if args.text_template is not None:
        values["text_template"] = args.text_template
    return EvalSettings.authors(**values) if args.authors_quirks else EvalSettings(**values)


def run_compare(args: argparse.Namespace) -> int:
    from .evaluation.report import compare_runs

    dir_a, dir_b = args.compare
    out = args.out or Path(f"compare-{dir_a.resolve().name}-vs-{dir_b.resolve().name}")
    try:
        result = compare_runs(dir_a, dir_b, out)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    a, b = result.a, result.b
    print(f"{out / 'compare.md'}, {out / 'compare.png'}: {len(result.rows)} shared prompts; B wins {result.wins}, "
          f"loses {result.losses}, ties {result.ties} (C.S. {a['clip_score']:.2f} -> {b['clip_score']:.2f}, "
          f"R@1 {a['r_at_1']:.2f} -> {b['r_at_1']:.2f})")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if args.compare is not None:
        return run_compare(args)
    from .evaluation.protocol import read_eval_prompts

    try:
        lines = read_eval_prompts(args.prompts)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    lines = lines[:args.limit] if args.limit else lines
    if not lines:
        print(f"error: {args.prompts} holds no prompts", file=sys.stderr)
        return 2
    from accelerate import PartialState

    from .evaluation.clip import ClipScorer, resolve_clip
    from .evaluation.run import evaluate_pipeline
    from .hub import WeightsNotAvailableError

    device, use_cpu = cli.process_device(args.device)
    args.workers = cli.baking_workers(args.workers, use_cpu)
    dtype = cli.resolve_dtype(args.dtype, device)
    scratch = None
    try:  # before the process group exists: libraries write files on rank 0 only once it does
        if args.tiny and args.clip is None:
            from .tiny import write_tiny_clip

            scratch = tempfile.TemporaryDirectory(prefix="triplane-turbo-clip-")
            clip_source, clip_name = str(write_tiny_clip(scratch.name)), "tiny random CLIP"
        else:
            clip_source, clip_name = args.clip, None
            resolve_clip(clip_source)  # fetch it now rather than after hours of meshes
        pipe = cli.load_pipeline(args, device, dtype)
    except (*cli.loading_errors(), WeightsNotAvailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    pipe.set_progress_bar_config(disable=True)
    state = PartialState(cpu=use_cpu)
    try:
        clip = ClipScorer.from_pretrained(clip_source, device=device, name=clip_name) if state.is_main_process else None
        result = evaluate_pipeline(pipe, lines, args.out, args.settings, clip, batch_size=args.batch_size,
                                   workers=args.workers, state=state, device=device, progress=not args.quiet,
                                   contact_sheet=not args.no_contact_sheet)
    finally:
        if scratch is not None:
            scratch.cleanup()
    if result is not None:
        metrics = result.metrics
        failed = f", {len(result.failed)} without a mesh" if result.failed else ""
        dropped = f", {len(metrics['dropped'])} dropped" if metrics["dropped"] else ""
        per_prompt = metrics["timing"]["generate_seconds_per_prompt"]
        print(f"{args.out / 'metrics.json'}: C.S. {result.clip_score:.2f}, R@1 {result.r_at_1:.2f}, "
              f"R@5 {result.r_at_5:.2f} over {metrics['prompts_evaluated']} prompts ({metrics['views_scored']} "
              f"views{failed}{dropped})" + (f"; {per_prompt:.2f} s per mesh on {device}" if per_prompt else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
