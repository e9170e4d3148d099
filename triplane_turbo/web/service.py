"""The generation service: settings in, stored results out. No Gradio here.

    service.stored(settings)               -> Entry | None       never waits, never touches the model
    service.produce(batch, progress, …)    -> FirstLook / Stored / NoSurface events, in order

``produce`` answers what is stored, runs the networks once for the rest (one batch), then for each
result shows a vertex-coloured first look (``FirstLook``) while its texture bakes, renders its
preview and stores it (``Stored``). It is called one request at a time — the app's GPU event has
Gradio's ``concurrency_limit=1`` — so a request identical to one that finished while it waited
finds that result in the store instead of making it again.

Progress goes to a plain callable ``progress(fraction or None, description)``; errors a visitor
should read are ``GenerationError`` (and ``models.ModelNotReadyError``).
"""

from __future__ import annotations

import gc
import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..mesher import TriplaneMesher
from ..pipeline import PromptTruncatedWarning
from ..preview import render_preview
from .memory import release_free_memory
from .models import ModelLoader
from .settings import DEFAULT_TEXTURE_SIZE, FLOATER_FRACTION, Settings
from .store import DISK_FULL, Entry, ResultStore

logger = logging.getLogger(__name__)

#: ``progress(fraction in [0, 1] or None, description)``.
Progress = Callable[[float | None, str], None]
EMPTY_SURFACE = "The model produced no surface for this seed; try another seed or prompt."
DISK_FULL_MESSAGE = ("The server's disk is full, so this result could not be stored. Please try again in a few "
                     "minutes; results already stored (and their links) still work.")


class GenerationError(RuntimeError):
    """A generation failed in a way the visitor can act on; the message says how."""


class NoSurfaceError(GenerationError):
    """The model produced no surface for these settings."""


class GpuOutOfMemoryError(GenerationError):
    """The device ran out of memory; what the failed call held has been given back."""


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a device running out of memory (CUDA's own error; MPS raises a RuntimeError)."""
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


def free_device_memory(device: str) -> None:
    """Gives what a failed call left behind back to ``device``: the garbage first (tensors held by
    reference cycles), then the caching allocator's free blocks."""
    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    elif device.startswith("mps") and hasattr(torch, "mps"):
        torch.mps.empty_cache()


@dataclass(frozen=True)
class FirstLook:
    """Result ``index`` of the batch exists as a vertex-coloured mesh; its texture is baking."""

    index: int
    glb: Path


@dataclass(frozen=True)
class Stored:
    """Result ``index`` of the batch is stored (found, or made just now: ``entry.fresh``)."""

    index: int
    entry: Entry


@dataclass(frozen=True)
class NoSurface:
    """Result ``index`` of the batch has no surface (only when ``fail_on_empty`` is False)."""

    index: int


@dataclass
class NetworkResult:
    """What the device returns for one batch: CPU data only (ZeroGPU's workers hand nothing else back)."""

    meshes: list
    triplane: torch.Tensor  # [B, 6, C, H, W] float32, CPU
    timings: dict
    device: str  # e.g. "cuda (NVIDIA H200)"
    notes: list[str]


def stage_labels(num_steps: int) -> dict[str, str]:
    """Progress stages in order (the pipeline's callback names, then the service's) and what each does."""
    denoise = {f"denoise {i}": f"Denoising, step {i}/{num_steps}" for i in range(1, num_steps + 1)}
    return {"text": "Encoding the prompt", **denoise, "decode": "Decoding the triplane",
            "fields": "Evaluating the fields", "isosurface": "Marching cubes", "color": "Colouring the vertices",
            "texture": "Baking the texture", "export": "Writing the GLB"}


class GenerationService:
    """Looks results up, makes the missing ones, stores them.

    Args:
        loader: the model (requests that need it wait for it).
        store: where results are kept.
        bake_fields: the heads textures are baked with, outside the networks' call (ZeroGPU: a CPU
            copy); None: the pipeline's own, on its meshing device.
        on_device: wraps the networks' call (``spaces.GPU`` on ZeroGPU); None: called as is. A wrapped
            call gets only picklable arguments (ZeroGPU hands them to a worker process), so no
            progress callable: its progress is reported around it.
        texture_size: side of the baked textures.
    """

    def __init__(self, loader: ModelLoader, store: ResultStore, *, bake_fields=None,
                 on_device: Callable[[Callable], Callable] | None = None, texture_size: int = DEFAULT_TEXTURE_SIZE):
        from ..texturing.bake import validate_texture_size

        self.loader, self.store, self.bake_fields = loader, store, bake_fields
        self.texture_size = validate_texture_size(texture_size)
        self.run_networks = on_device(self._run_networks) if on_device else self._run_networks
        self._progress_inside = on_device is None

    # -- keys ------------------------------------------------------------------------------------
    def key(self, settings: Settings, revision: str) -> str:
        """The store key of ``settings`` made with the weights ``revision`` on this device and dtype."""
        return ResultStore.key(**settings.as_record(), texture_size=self.texture_size, revision=revision,
                               device=self.loader.device, dtype=self.loader.dtype)

    def stored(self, settings: Settings) -> Entry | None:
        """The stored result for ``settings``, or None (also while the weights are not yet known)."""
        revision = self.loader.known_revision()
        return None if revision is None else self.store.load(self.key(settings, revision))

    # -- making ----------------------------------------------------------------------------------
    def produce(self, batch: list[Settings], progress: Progress, *, fail_on_empty: bool,
                first_look: bool = True) -> Iterator[FirstLook | Stored | NoSurface]:
        """Stored results for settings that differ only in their seeds; the missing ones made in one
        call of the networks. Yields each result's events as soon as they happen.

        Args:
            fail_on_empty: raise ``NoSurfaceError`` when a result has no surface (a single
                request), rather than yielding ``NoSurface`` and going on (variants).
            first_look: yield ``FirstLook`` before a texture is baked.
        Raises:
            ModelNotReadyError, GenerationError.
        """
        revision = self.loader.weights_revision(lambda line: progress(None, line))
        keys = [self.key(s, revision) for s in batch]
        missing = []
        for i, key in enumerate(keys):
            if (entry := self.store.load(key)) is not None:
                yield Stored(i, entry)
            else:
                missing.append(i)
        if missing:
            try:
                yield from self._make([batch[i] for i in missing], [keys[i] for i in missing], missing, progress,
                                      fail_on_empty=fail_on_empty, first_look=first_look)
            finally:  # what the generation freed goes back to the system (see memory.py)
                release_free_memory()

    def _make(self, batch: list[Settings], keys: list[str], indices: list[int], progress: Progress, *,
              fail_on_empty: bool, first_look: bool) -> Iterator[FirstLook | Stored | NoSurface]:
        pipe = self.loader.get(lambda line: progress(None, line))
        first = batch[0]
        if not self._progress_inside:
            progress(None, "Running the networks on the GPU")
        result = self._guard_memory(
            lambda: self.run_networks([s.prompt for s in batch], [s.seed for s in batch], first.mesh_resolution,
                                      first.remove_floaters, first.target_faces,
                                      progress if self._progress_inside else None),
            "The GPU ran out of memory. Try a lower mesh resolution or fewer variants, or again in a moment.")
        stages = stage_labels(pipe.config.num_steps)
        fields = self.bake_fields if self.bake_fields is not None else pipe.fields
        mesher = TriplaneMesher(fields, pipe.config)
        made = []
        for j, (settings, key, i) in enumerate(zip(batch, keys, indices)):
            mesh = result.meshes[j]
            if len(mesh.faces) == 0:
                if fail_on_empty:
                    raise NoSurfaceError(EMPTY_SURFACE)
                yield NoSurface(i)
                continue
            if first_look and settings.texture == "uv":
                with _disk_full_message():
                    glb = self.store.pending_glb(key, mesh)
                yield FirstLook(i, glb)
            record = {**settings.as_record(), "texture_size": self.texture_size, "vertices": len(mesh.vertices),
                      "faces": len(mesh.faces),
                      "device": result.device, "model_revision": pipe.revision, "timings": dict(result.timings)}
            if result.notes:
                record["warnings"] = result.notes
            texture = None
            if settings.texture == "uv":
                progress(None, stages["texture"])
                timings: dict = {}
                (texture,) = self._guard_memory(
                    lambda: mesher.bake_textures(result.triplane[j:j + 1], [mesh], self.texture_size,
                                                 normal_map=bool(settings.target_faces), timings=timings),
                    "The GPU ran out of memory while baking the texture; try again in a moment, or choose vertex "
                    "colours.")
                record["timings"]["texture"] = timings["texture"]
            progress(None, stages["export"])
            preview = render_preview(mesh, texture)
            with _disk_full_message():
                entry = self.store.save(key, mesh, record, texture, preview)
            made.append(key)
            self.store.enforce_limits(keep=set(made))  # before the result is handed out: the folder never exceeds its budget
            yield Stored(i, entry)

    def _guard_memory(self, call: Callable, message: str):
        """``call()``; if the device runs out of memory, its memory is freed and ``GpuOutOfMemoryError``
        (``message``) raised instead."""
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are handled; the rest re-raised
            if not out_of_memory(exc):
                raise
            logger.warning("out of memory on %s: %s", self.loader.device, str(exc))  # a str: keeps no frames
        # Here only after running out of memory, outside the except block: the error, its traceback and
        # the frames holding the failed call's tensors are gone, so the allocator can give them back.
        free_device_memory(self.loader.device)
        raise GpuOutOfMemoryError(message)

    def _run_networks(self, prompts: list[str], seeds: list[int], resolution: int, floaters: bool,
                      faces: int | None, progress: Progress | None = None) -> NetworkResult:
        """The networks and the mesh on the model's device (on ZeroGPU: inside ``spaces.GPU``, in a
        worker process: the arguments and the result are plain, picklable data)."""
        progress = progress or (lambda fraction, line: None)
        pipe = self.loader.get()
        stages = stage_labels(pipe.config.num_steps)
        names = list(stages)

        def report(stage: str, step: int, total: int) -> None:
            key = f"denoise {step}" if stage == "denoise" else stage
            if key in stages:
                done = names.index(key) + 1
                progress(done / len(names), stages[names[min(done, len(names) - 1)]])

        progress(0.0, stages["text"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = pipe(prompts, seed=seeds, mesh_resolution=resolution, callback=report, texture="vertex",
                       remove_floaters_below=FLOATER_FRACTION if floaters else None, target_faces=faces)
        notes = sorted({str(w.message) for w in caught if issubclass(w.category, PromptTruncatedWarning)})
        device = pipe.device
        name = f"{device.type} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type
        return NetworkResult(out.meshes, out.triplane.float().cpu(), dict(out.timings), name, notes)


@contextmanager
def _disk_full_message():
    """A full disk while storing -> ``GenerationError`` saying so (the store leaves no partial entry)."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        logger.error("storing a result failed: %s", exc)
        raise GenerationError(DISK_FULL_MESSAGE) from None


__all__ = ["DISK_FULL_MESSAGE", "EMPTY_SURFACE", "FirstLook", "GenerationError", "GenerationService", "GpuOutOfMemoryError",
           "NetworkResult", "NoSurface", "NoSurfaceError", "Progress", "Stored", "free_device_memory", "out_of_memory",
           "stage_labels"]
