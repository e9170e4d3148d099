"""Device and dtype policy: which dtype the networks use by default, where meshing can run, moving
modules all-or-nothing, and timing a stage on its device.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn


def native_bfloat16_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX or AVX512-BF16).

    Elsewhere torch emulates bfloat16 matrix products, several times slower than float32.
    """
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private, hence the guard
    try:
        return any(bool(getattr(torch.cpu, probe)()) for probe in probes if hasattr(torch.cpu, probe))
    except Exception:  # noqa: BLE001 - a probe that fails means "not known to be native"
        return False


def default_dtype(device: str | torch.device) -> torch.dtype:
    """The networks' dtype by default: float16 on CUDA and Apple's MPS; on the CPU bfloat16 where it
    is native (``native_bfloat16_cpu``), else float32. Error figures of each: BENCHMARKS.md."""
    kind = torch.device(device).type
    if kind in ("cuda", "mps"):
        return torch.float16
    return torch.bfloat16 if native_bfloat16_cpu() else torch.float32


def supports_float64(device: str | torch.device) -> bool:
    """Whether ``device`` computes in float64. Apple's MPS does not; marching cubes and texture
    baking use float64 for edge positions and barycentrics."""
    return torch.device(device).type != "mps"


def meshing_device(device: str | torch.device) -> torch.device:
    """Where the fields are meshed and baked for networks on ``device``: the same device when it
    computes in float64 (no copies of the grid), else the CPU."""
    device = torch.device(device)
    return device if supports_float64(device) else torch.device("cpu")


def move_modules(moves: Iterable[tuple[nn.Module, tuple]]) -> None:
    """``module.to(*args)`` for each ``(module, args)``, all or nothing.

    If a move fails part-way (CUDA out of memory), every tensor is put back as it was, bit for bit,
    before the error is raised, so the modules stay usable where they were. ``nn.Module.to`` swaps
    tensors one at a time; holding the old ones lets a failure undo the swaps exactly. For a move
    between devices that costs nothing extra on either; a cast on one device holds the old and the
    new weights there until the call returns. (``nn.Module.to`` rather than diffusers' override,
    which warns on every dtype cast about "modules to keep in float32" even when there are none.)
    """
    moves = [(module, tuple(a for a in args if a is not None)) for module, args in moves]
    saved = [(table, name, tensor, tensor.data) for module, _ in moves for owner in module.modules()
             for table in (owner._parameters, owner._buffers) for name, tensor in table.items() if tensor is not None]
    try:
        for module, args in moves:
            if args:
                nn.Module.to(module, *args)
    except BaseException:
        for table, name, tensor, data in saved:
            tensor.data = data
            table[name] = tensor
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise
    finally:
        del saved


@contextmanager
def timed(timings: dict | None, device: torch.device, name: str) -> Iterator[None]:
    """Adds the seconds spent in the block to ``timings[name]`` (nothing when ``timings`` is None);
    waits for the GPU only when the work runs on one (synchronising otherwise would create a CUDA
    context for a CPU run)."""
    if timings is None:
        yield
        return
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        if cuda:
            torch.cuda.synchronize(device)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


__all__ = ["default_dtype", "meshing_device", "move_modules", "native_bfloat16_cpu", "supports_float64", "timed"]
