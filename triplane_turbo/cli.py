"""The options every command line shares, declared once: which model, where it runs, and how meshes
are made. ``python -m triplane_turbo`` (generate), ``.batch``, ``.train`` and ``.evaluate`` add them
with ``add_model_options`` / ``add_mesh_options`` (and, where they write meshes,
``add_placement_options``); values are checked by the library's own validators, so a bound is the
same everywhere (``--texture-size 64`` works wherever the library accepts 64).
"""

from __future__ import annotations

import argparse

from .config import (DEFAULT_ADAPTER_REPO, DEFAULT_BASE_MODEL, ENV_ADAPTER, ENV_BASE_MODEL, MAX_RESOLUTION,
                     MIN_RESOLUTION, TEXTURE_MODES, UNWRAP_METHODS)
from .frames import DEFAULT_PRINT_SIZE, ORIGINS, validate_print_size, validate_scale
from .inputs import MAX_TARGET_FACES, MIN_TARGET_FACES, validate_resolution, validate_target_faces

DTYPES = ("auto", "float32", "float16", "bfloat16")
WEIGHTS_EPILOG = (f"Weights: the base model ({DEFAULT_BASE_MODEL}, about 5.2 GB) and the adapter "
                  f"({DEFAULT_ADAPTER_REPO}, about 90 MB) are downloaded from the Hugging Face Hub on first use "
                  f"and cached; {ENV_BASE_MODEL} / {ENV_ADAPTER} point to other repos or local paths. --tiny needs "
                  "no download (random weights: the shapes are meaningless).")


def _checked(validate, cast=int):
    """An argparse ``type`` that parses with ``cast`` and checks with a library validator."""
    def parse(text: str):
        try:
            return validate(cast(text))
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = validate.__name__.removeprefix("validate_")  # argparse names the type in errors
    return parse


def _texture_size(value):
    from .texturing.bake import validate_texture_size  # imports torch: only when a value is parsed

    return validate_texture_size(value)


def _device(text: str) -> str:
    return resolve_device(text)


#: argparse types of the shared options: one object each, so every command parses with the same one.
DEVICE = _checked(_device, cast=str)
RESOLUTION = _checked(validate_resolution)
TEXTURE_SIZE = _checked(_texture_size)
TARGET_FACES = _checked(validate_target_faces)
SCALE = _checked(validate_scale, cast=float)
PRINT_SIZE = _checked(validate_print_size, cast=float)


def add_model_options(parser: argparse.ArgumentParser, *, dtype_help: str | None = None) -> None:
    """--base-model, --adapter, --tiny, --device, --dtype."""
    group = parser.add_argument_group("model")
    group.add_argument("--base-model", default=None, help=f"Hub id or local folder (env {ENV_BASE_MODEL})")
    group.add_argument("--adapter", default=None, help=f"Hub id, .pth file or folder (env {ENV_ADAPTER})")
    group.add_argument("--tiny", action="store_true", help="offline tiny random model, no download")
    group.add_argument("--device", type=DEVICE, default=None,
                       help="cpu, cuda, cuda:1, mps (default: CUDA when available, else the CPU)")
    group.add_argument("--dtype", choices=DTYPES, default="auto",
                       help=dtype_help or "network precision (auto: float16 on a GPU; on the CPU bfloat16 where "
                                          "the CPU has native bfloat16, else float32)")


def add_mesh_options(parser: argparse.ArgumentParser, *, resolution: int = 160, texture: str = "uv",
                     title: str = "mesh") -> None:
    """--resolution, --texture, --texture-size, --unwrap, --faces (defaults: the published settings unless a
    command follows another protocol, e.g. the evaluation's R = 128 with vertex colours)."""
    group = parser.add_argument_group(title)
    group.add_argument("--resolution", type=RESOLUTION, default=resolution,
                       help=f"marching-cubes grid per axis, {MIN_RESOLUTION}-{MAX_RESOLUTION} (default {resolution})")
    group.add_argument("--texture", choices=TEXTURE_MODES, default=texture,
                       help="uv: a UV atlas with the colour field baked into an image; vertex: colours at the "
                            f"vertices only (faster, detail follows the triangle count); default {texture}")
    group.add_argument("--texture-size", type=TEXTURE_SIZE, default=1024,
                       help="side of the baked texture in texels, 64-4096 (default 1024)")
    group.add_argument("--unwrap", choices=UNWRAP_METHODS, default="fast",
                       help="UV atlas: fast (box-projected charts, a tenth of a second) or xatlas (conformal charts, "
                            "seconds); the same colour error (default fast)")
    group.add_argument("--faces", type=TARGET_FACES, default=None,
                       help=f"simplify to about this many faces, {MIN_TARGET_FACES}-{MAX_TARGET_FACES} (with --texture "
                            "uv a normal map keeps the full surface's shading)")


def add_placement_options(parser: argparse.ArgumentParser) -> None:
    """--origin, --scale (the display formats: GLB, OBJ, PLY, USDZ) and --print-size (STL, 3MF)."""
    group = parser.add_argument_group("placement (docs/FORMATS.md)")
    group.add_argument("--origin", choices=ORIGINS, default=None,
                       help="glb, obj, ply, usdz: the pivot at the bounding box's centre, or at the centre of its "
                            "base (lowest point, +Y up), as game engines place objects (default: the centre of the "
                            "generation volume)")
    group.add_argument("--scale", type=SCALE, default=None,
                       help="glb, obj, ply, usdz: metres per model unit (default 1: the object is about 1 m across)")
    group.add_argument("--print-size", type=PRINT_SIZE, default=None, metavar="MM",
                       help="stl, 3mf: the largest side in millimetres; these always come +Z up, centred, resting "
                            f"on z = 0 (default {DEFAULT_PRINT_SIZE:g})")


def placement_options(args: argparse.Namespace, file_format: str) -> dict:
    """The export keywords (``origin``, ``scale``, ``print_size``) of ``add_placement_options``'s
    values for ``file_format``; ValueError for an option that this format does not take."""
    from .export import PRINT_FORMATS

    if file_format in PRINT_FORMATS:
        if args.origin is not None or args.scale is not None:
            raise ValueError(f"--origin and --scale apply to glb, obj, ply, usdz; {file_format} is placed for "
                             "printing (+Z up, on z = 0; size it with --print-size)")
        return {"print_size": args.print_size if args.print_size is not None else DEFAULT_PRINT_SIZE}
    if args.print_size is not None:
        raise ValueError(f"--print-size applies to stl and 3mf; size {file_format} with --scale")
    return {"origin": args.origin, "scale": args.scale if args.scale is not None else 1.0}


def resolve_device(requested: str | None) -> str:
    """The device a command runs on: as asked (checked), else CUDA when available, else the CPU."""
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(requested).type
    except RuntimeError:
        raise ValueError(f"--device {requested!r}: not a device (use cpu, cuda, cuda:1 or mps)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {requested}: no CUDA device is available here (use --device cpu)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {requested}: Apple's MPS is not available here (use --device cpu)")
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {requested}: unsupported device type {kind!r}")
    return requested


def process_device(requested: str | None):
    """(device, on_cpu) for one process of a command that ``accelerate launch`` may start many times;
    ``requested`` is a ``--device`` value (already checked by its argparse type).

    Without CUDA (or with ``--device cpu``, or ACCELERATE_USE_CPU) the processes talk over gloo:
    accelerate's MULTI_CPU. (Its ``--cpu`` launcher starts several processes only through MPI; its
    torchrun launcher, ``--multi_gpu``, starts them anywhere, and this makes them CPU processes.)
    Otherwise each process takes the GPU of its LOCAL_RANK.
    """
    import os

    import torch

    on_cpu = (requested or "").startswith("cpu") or (requested is None and not torch.cuda.is_available()) \
        or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    device = torch.device(requested or ("cpu" if on_cpu else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"))
    return device, on_cpu


def add_workers_option(parser: argparse.ArgumentParser) -> None:
    """--workers: threads that bake UV textures and write files (``batch.run_batch``)."""
    parser.add_argument("--workers", type=_checked(_non_negative), default=None,
                        help="threads that bake UV textures and write files while the networks make the next batch "
                             "(default with CUDA: the CPU cores beyond one, at most 4); on the CPU (default: the "
                             "cores, at most 4) likewise with --batch-size 1, else a batch's meshes side by side "
                             "between batches; 0: in line")


def _non_negative(value: int) -> int:
    if value < 0:
        raise ValueError(f"must be 0 or more, got {value}")
    return value


def baking_workers(requested: int | None, on_cpu: bool) -> int:
    """``--workers``, or its default: the cores the networks leave (with CUDA), or every core, taking
    turns with the networks (on the CPU); at most 4, and none where one core is all there is."""
    if requested is not None:
        return requested
    import os

    cores = os.cpu_count() or 1
    return 0 if cores < 2 else min(4, cores if on_cpu else cores - 1)


def resolve_dtype(name: str, device):
    """The dtype for ``--dtype`` on ``device`` ("auto": ``devices.default_dtype``)."""
    import torch

    from .devices import default_dtype

    return default_dtype(device) if name == "auto" else getattr(torch, name)


def loading_errors() -> tuple[type[Exception], ...]:
    """What loading weights raises with a message for the user (printed as one line, exit code 1)."""
    from .adapter import CheckpointMismatchError
    from .hub import IncompatibleBaseModelError, WeightsNotAvailableError

    return WeightsNotAvailableError, IncompatibleBaseModelError, CheckpointMismatchError


def load_pipeline(args: argparse.Namespace, device, dtype, **options):
    """The pipeline the model options name: the tiny random one, or the published weights (or
    ``--base-model`` / ``--adapter``) through ``from_pretrained``."""
    if args.tiny:
        from .tiny import tiny_pipeline

        return tiny_pipeline(device=device, dtype=dtype, **options)
    from .pipeline import TriplaneTurboPipeline

    return TriplaneTurboPipeline.from_pretrained(args.base_model, args.adapter, device=device, dtype=dtype, **options)


__all__ = ["DTYPES", "WEIGHTS_EPILOG", "add_mesh_options", "add_model_options", "add_placement_options",
           "add_workers_option", "baking_workers", "load_pipeline", "loading_errors", "placement_options",
           "process_device", "resolve_device", "resolve_dtype"]
