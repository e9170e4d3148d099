"""The app's command line: every option with the environment variable that sets it on a Space
(docs/SPACE.md lists them). ``app.py`` parses them in ``main``."""

from __future__ import annotations

import argparse
import os

from .settings import DEFAULT_TEXTURE_SIZE


def parse_args(argv=None) -> argparse.Namespace:
    """The app's options from ``argv`` (default: the command line), their defaults from the environment."""
    env = os.environ.get
    parser = argparse.ArgumentParser(description="TriplaneTurbo web app (Gradio).")
    parser.add_argument("--tiny", action="store_true", default=env("TRIPLANE_TURBO_TINY", "") in ("1", "true"),
                        help="offline demo on a tiny random model (env TRIPLANE_TURBO_TINY=1)")
    parser.add_argument("--output-dir", default=env("TRIPLANE_TURBO_OUTPUT_DIR", "outputs"),
                        help="a folder of the app's own for results (env TRIPLANE_TURBO_OUTPUT_DIR, default ./outputs)")
    parser.add_argument("--device", default=env("TRIPLANE_TURBO_DEVICE"),
                        help="cuda, cuda:1, mps or cpu (default: CUDA, else MPS, else the CPU)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--max-output-gb", type=float, default=float(env("TRIPLANE_TURBO_OUTPUT_MAX_GB", 2)),
                        help="evict the least recently used results above this size (default 2)")
    parser.add_argument("--max-output-age-hours", type=float, default=float(env("TRIPLANE_TURBO_OUTPUT_MAX_AGE_H", 24)),
                        help="evict results older than this (default 24)")
    parser.add_argument("--max-queue", type=int, default=int(env("TRIPLANE_TURBO_MAX_QUEUE", 64)),
                        help="requests that may wait for the GPU; more are told to try again (default 64)")
    parser.add_argument("--max-waiting-per-client", type=int,
                        default=int(env("TRIPLANE_TURBO_MAX_WAITING_PER_CLIENT", 2)),
                        help="requests of one visitor (client address) that may wait for the GPU at a time; more "
                             "are told to wait for theirs (default 2)")
    parser.add_argument("--texture-size", type=int, default=int(env("TRIPLANE_TURBO_TEXTURE_SIZE", DEFAULT_TEXTURE_SIZE)),
                        help=f"side of the baked textures, 64-4096 (default {DEFAULT_TEXTURE_SIZE})")
    parser.add_argument("--no-mcp", dest="mcp", action="store_false",
                        default=env("TRIPLANE_TURBO_MCP", "1").lower() not in ("0", "false", "no", "off"),
                        help="do not serve MCP at /gradio_api/mcp/ (env TRIPLANE_TURBO_MCP=0; on by default)")
    args = parser.parse_args(argv)
    for name in ("max_queue", "max_waiting_per_client"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    from triplane_turbo.texturing.bake import validate_texture_size

    try:
        validate_texture_size(args.texture_size)
    except ValueError as exc:
        parser.error(f"--texture-size: {exc}")
    return args


__all__ = ["parse_args"]
