"""TriplaneTurbo web app: a thin Gradio UI over ``triplane_turbo`` (text -> textured mesh).

    python app.py           # the published weights (fetched once from the Hugging Face Hub)
    python app.py --tiny    # offline, on a tiny random model (the shapes are meaningless)

Options: --output-dir (env TRIPLANE_TURBO_OUTPUT_DIR, default ./outputs), --device, --share,
--max-output-gb, --max-output-age-hours; GRADIO_SERVER_NAME and GRADIO_SERVER_PORT are honoured.
Tests build the UI without launching it: ``build_demo(loader_or_pipeline, output_dir)``.

Where the model lives: on ZeroGPU (``SPACES_ZERO_GPU``) it is built at start-up on the main thread,
in float16, and placed on "cuda" before ``launch()``, as ZeroGPU requires; the ``spaces.GPU``
function then only computes and returns CPU arrays, and texture baking and export run outside it.
Elsewhere it loads in a background thread onto the chosen device (CUDA, else Apple's MPS, else the
CPU), once; requests that arrive meanwhile wait for it.
"""

from __future__ import annotations

try:  # ZeroGPU needs `spaces` imported before torch initialises CUDA.
    import spaces
except ImportError:  # optional outside Hugging Face Spaces
    spaces = None

import argparse
import base64
import copy
import logging
import os
import secrets
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import gradio as gr
import torch

from triplane_turbo.app_support import (Entry, ModelLoader, ModelNotReadyError, OutputFolderError, ResultStore,
                                        thumbnail_jpeg)
from triplane_turbo.config import MAX_SEED
from triplane_turbo.devices import default_dtype
from triplane_turbo.inputs import clean_text
from triplane_turbo.pipeline import PromptTruncatedWarning
from triplane_turbo.preview import render_preview
from triplane_turbo.texture import bake_texture

logger = logging.getLogger("triplane_turbo.app")

ASSETS = Path(__file__).resolve().parent / "assets"
PAPER_URL = "https://arxiv.org/abs/2503.21694"
CODE_URL = "https://github.com/theEricMa/TriplaneTurbo"
REPO_URL = os.environ.get("TRIPLANE_TURBO_REPO_URL", "")  # this project's public page, once it has one
RESOLUTIONS = (128, 160, 256, 384)
DEFAULT_RESOLUTION = 160
TEXTURES = {"UV texture (baked, 1024²)": "uv", "Vertex colours": "vertex"}
TEXTURE_SIZE = 1024
MAX_PROMPT_CHARS = 1000
RANDOM_SEED_LIMIT = 2**32  # seeds the app draws stay exact in the browser's float64 numbers
EXAMPLE_SEED = 0
FACES_RANGE = (1_000, 1_000_000)
DEFAULT_FACES = 20_000
MAX_VARIANTS = 8
HISTORY_SIZE = 24
#: The browser keeps the history in localStorage under this key; the "secret" only obfuscates it
#: (Gradio publishes it in the page config): the history holds settings and thumbnails, nothing private.
HISTORY_STORAGE = dict(storage_key="triplane-turbo-history-v1", secret="triplane-turbo-history")
FLOATER_FRACTION = 0.05  # parts smaller than 5% of the largest one are "floaters"
QUEUE_SIZE = 64
GPU_SECONDS = {128: 20, 160: 25, 256: 40, 384: 60}
TINY_BANNER = ("**Offline demo on a tiny random model:** the shapes are meaningless blobs. "
               "Use it to try the interface; run `python app.py` for the real TriplaneTurbo weights.")
EMPTY_SURFACE = "The model produced no surface for this seed; try another seed or prompt."


def stage_labels(num_steps: int) -> dict[str, str]:
    """Progress stages in order (the pipeline's callback names, then ours) and what each one does."""
    denoise = {f"denoise {i}": f"Denoising, step {i}/{num_steps}" for i in range(1, num_steps + 1)}
    return {"text": "Encoding the prompt", **denoise,
            "decode": "Decoding the triplane", "fields": "Evaluating the fields", "isosurface": "Marching cubes",
            "color": "Colouring the vertices", "texture": "Baking the texture",
            "export": "Exporting GLB, OBJ, PLY and STL"}


def load_examples(path: Path = ASSETS / "examples.txt") -> list[str]:
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


# ---------------------------------------------------------------------------------------------
# Input checks: every bad value from the page or the API becomes a clear gr.Error
# ---------------------------------------------------------------------------------------------
def clean_prompt(prompt) -> tuple[str, list[str]]:
    """The prompt with control characters removed and whitespace collapsed, plus warnings."""
    if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
        raise gr.Error("The prompt is empty: describe an object, e.g. 'a frog wearing a sweater'.")
    if not isinstance(prompt, str):
        raise gr.Error(f"The prompt must be text, got {type(prompt).__name__}.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise gr.Error(f"The prompt is {len(prompt)} characters long; the limit is {MAX_PROMPT_CHARS}. "
                       "Only the first ~75 words reach the model anyway.")
    text, removed = clean_text(prompt)
    notes = [f"Removed {removed} control character{'s' * (removed > 1)} from the prompt."] if removed else []
    if not text:
        raise gr.Error("The prompt is empty once control characters are removed: describe an object.")
    return text, notes


def _whole_number(value, name: str) -> int:
    if isinstance(value, str) and value.strip().lstrip("+-").isascii() and value.strip().lstrip("+-").isdigit():
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise gr.Error(f"{name} must be a whole number, got {value!r:.40}.")
    return value


def _flag(value, name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise gr.Error(f"{name} must be true or false, got {value!r:.40}.")
    return value


def pick_seed(seed, randomize) -> int:
    if _flag(randomize, "randomize_seed"):
        return secrets.randbelow(RANDOM_SEED_LIMIT)
    if seed is None or seed == "":
        raise gr.Error("Enter a seed, or tick 'Randomize seed'.")
    seed = _whole_number(seed, "The seed")
    if not 0 <= seed <= MAX_SEED:
        raise gr.Error(f"The seed must be between 0 and {MAX_SEED}, got {seed}.")
    return seed


def check_resolution(value) -> int:
    try:
        value = _whole_number(value, "mesh_resolution")
    except gr.Error:
        value = None
    if value not in RESOLUTIONS:
        raise gr.Error(f"mesh_resolution must be one of {', '.join(map(str, RESOLUTIONS))}.")
    return value


def check_faces(value) -> int:
    value = _whole_number(value, "target_faces")
    if not FACES_RANGE[0] <= value <= FACES_RANGE[1]:
        raise gr.Error(f"target_faces must be between {FACES_RANGE[0]} and {FACES_RANGE[1]}, got {value}.")
    return value


def check_texture(value) -> str:
    value = TEXTURES.get(value, value)
    if value not in TEXTURES.values():
        raise gr.Error(f"texture must be one of {', '.join(repr(v) for v in TEXTURES.values())}, got {value!r:.40}.")
    return value


def check_count(value) -> int:
    count = _whole_number(value, "count")
    if not 1 <= count <= MAX_VARIANTS:
        raise gr.Error(f"count must be between 1 and {MAX_VARIANTS}, got {count}.")
    return count


@dataclass(frozen=True)
class Settings:
    """Everything that decides a result (with the weights, device and dtype: ``TriplaneTurboApp.key``)."""

    prompt: str
    seed: int
    mesh_resolution: int = DEFAULT_RESOLUTION
    remove_floaters: bool = False
    target_faces: int | None = None
    texture: str = "uv"

    def link_query(self) -> dict:
        query = {"prompt": self.prompt, "seed": self.seed, "resolution": self.mesh_resolution}
        if self.remove_floaters:
            query["floaters"] = 1
        if self.target_faces:
            query["faces"] = self.target_faces
        if self.texture != "uv":
            query["texture"] = self.texture
        return query


def page_url(request: gr.Request | None) -> str:
    """The app's public address for a request: the page itself for a browser, else the host."""
    if request is None:
        return ""
    headers = request.headers
    if referer := headers.get("referer"):
        parts = urlsplit(referer)
        return f"{parts.scheme}://{parts.netloc}{parts.path}"
    host = headers.get("x-forwarded-host") or headers.get("host", "localhost")
    proto = headers.get("x-forwarded-proto") or request.url.scheme
    return f"{proto}://{host}{request.url.path.split('/gradio_api')[0].rstrip('/')}/"


def share_link(request, settings: Settings) -> str:
    return f"{page_url(request)}?{urlencode(settings.link_query())}"


# ---------------------------------------------------------------------------------------------
# Event handlers
# ---------------------------------------------------------------------------------------------
def _gpu_seconds(prompts, seeds, resolution, *args, **kwargs) -> int:
    """ZeroGPU's time budget for one call: by resolution, a little more per extra object."""
    return int(GPU_SECONDS.get(resolution, 60) * (1 + 0.25 * (len(prompts) - 1)))


def _on_gpu(fn):
    return spaces.GPU(duration=_gpu_seconds)(fn) if spaces is not None else fn


class TriplaneTurboApp:
    """The app's behaviour, independent of the page layout: settings in, stored results out.

    Args:
        loader: the model loader (requests wait for it).
        store: where results are kept (and looked up before any GPU work).
        bake_fields: the fields used to bake textures outside the GPU function (ZeroGPU: a CPU
            copy; elsewhere None, i.e. the pipeline's own, on its device).
    """

    def __init__(self, loader: ModelLoader, store: ResultStore, bake_fields=None):
        self.loader, self.store, self.bake_fields = loader, store, bake_fields
        self._gpu = threading.Lock()  # one generation at a time on the device; cache hits never wait
        self._lock = threading.Lock()  # guards the two fields below
        self._queued = 0
        self._in_progress: dict[str, threading.Event] = {}  # keys being made now, and when they are done
        self.run_on_device = _on_gpu(self._run_on_device)

    # -- keys and progress --------------------------------------------------------------------
    def key(self, settings: Settings, report=None) -> str:
        revision = self.loader.weights_revision(report)
        return ResultStore.key(**asdict(settings), texture_size=TEXTURE_SIZE, revision=revision,
                               device=self.loader.device, dtype=self.loader.dtype)

    @staticmethod
    def _reporter(progress):
        return lambda line: progress(None, desc=line)

    def _model(self, progress):
        try:
            return self.loader.get(self._reporter(progress))
        except ModelNotReadyError as exc:
            raise gr.Error(str(exc), title="Model not available") from None

    def _revision_key(self, settings: Settings, progress) -> str:
        try:
            return self.key(settings, self._reporter(progress))
        except ModelNotReadyError as exc:
            raise gr.Error(str(exc), title="Model not available") from None

    # -- the GPU part: one call, one batch ------------------------------------------------------
    def _run_on_device(self, prompts: list[str], seeds: list[int], resolution: int, floaters: bool,
                       faces: int | None, progress):
        """The networks and the mesh on the model's device; returns CPU data only."""
        pipe = self.loader.get()
        stages = stage_labels(pipe.config.num_steps)
        names = list(stages)

        def report(stage: str, step: int, total: int) -> None:
            key = f"denoise {step}" if stage == "denoise" else stage
            if key in stages:
                progress((names.index(key) + 1, len(names)), desc=stages[names[min(names.index(key) + 1, len(names) - 1)]])

        progress((0, len(names)), desc=stages["text"])
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = pipe(prompts, seed=seeds, mesh_resolution=resolution, callback=report, texture="vertex",
                           remove_floaters_below=FLOATER_FRACTION if floaters else None, target_faces=faces)
        except torch.cuda.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise gr.Error("The GPU ran out of memory. Try a lower mesh resolution or fewer variants, or "
                           "again in a moment.") from None
        notes = sorted({str(w.message) for w in caught if issubclass(w.category, PromptTruncatedWarning)})
        device = pipe.device
        name = f"{device.type} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type
        return out.meshes, out.triplane.float().cpu(), dict(out.timings), name, notes

    # -- producing results ----------------------------------------------------------------------
    def produce(self, batch: list[Settings], progress, show_pending: bool = True):
        """Stored results for settings that differ only in their seeds, the missing ones in one GPU call.

        Yields ("entry", i, Entry) when a result's files are stored and, with ``show_pending``,
        ("mesh", i, vertex-coloured GLB) as soon as its mesh exists (before the texture is baked).
        Cached results are answered first, without the model or the GPU; a result another request
        is already making is waited for, not made twice.
        """
        keys = [self._revision_key(s, progress) for s in batch]
        pending = set()
        for i, key in enumerate(keys):
            if (entry := self.store.load(key)) is None:
                pending.add(i)
            else:
                yield "entry", i, entry
        while pending:
            with self._lock:
                mine = [i for i in sorted(pending) if keys[i] not in self._in_progress]
                theirs = {i: self._in_progress[keys[i]] for i in pending if i not in mine}
                for i in mine:
                    self._in_progress[keys[i]] = threading.Event()
            try:
                for i in list(mine):  # stored by a request that finished between the lookup and the claim
                    if (entry := self.store.load(keys[i])) is not None:
                        pending.discard(i)
                        yield "entry", i, entry
                make = [i for i in mine if i in pending]
                if make:
                    yield from self._make([batch[i] for i in make], [keys[i] for i in make], make, progress,
                                          show_pending)
            finally:
                with self._lock:
                    for i in mine:
                        self._in_progress.pop(keys[i]).set()
            pending -= set(mine)
            for i, done in theirs.items():
                while not done.wait(0.5):
                    progress(None, desc="Waiting for the same result, which another request is making")
                if (entry := self.store.load(keys[i])) is not None:
                    pending.discard(i)
                    yield "entry", i, entry
                # else it failed there: the next round makes it here

    def _make(self, batch: list[Settings], keys: list[str], indices: list[int], progress, show_pending: bool):
        """Generates ``batch`` (one GPU call), bakes, renders and stores each result (see ``produce``)."""
        pipe = self._model(progress)
        with self._lock:
            self._queued += 1
        try:
            while not self._gpu.acquire(timeout=0.5):
                progress(None, desc=f"Waiting for the GPU: another generation is running"
                                    f"{f', {self._queued - 1} more waiting' if self._queued > 1 else ''}")
        finally:
            with self._lock:
                self._queued -= 1
        try:
            first = batch[0]
            meshes, triplane, timings, device, notes = self.run_on_device(
                [s.prompt for s in batch], [s.seed for s in batch], first.mesh_resolution, first.remove_floaters,
                first.target_faces, progress)
        finally:
            self._gpu.release()
        stages = stage_labels(pipe.config.num_steps)
        fields = self.bake_fields if self.bake_fields is not None else pipe.fields
        made = []
        for j, (settings, key, i) in enumerate(zip(batch, keys, indices)):
            mesh = meshes[j]
            if len(mesh.faces) == 0:
                if len(batch) == 1:
                    raise gr.Error(EMPTY_SURFACE)
                yield "empty", i, None  # one variant without a surface does not sink the others
                continue
            if show_pending and settings.texture == "uv":
                yield "mesh", i, self.store.pending_glb(key, mesh)
            record = {**asdict(settings), "texture_size": TEXTURE_SIZE, "vertices": len(mesh.vertices),
                      "faces": len(mesh.faces), "device": device, "model_revision": pipe.revision,
                      "timings": dict(timings)}
            if notes:
                record["warnings"] = notes
            texture = None
            if settings.texture == "uv":
                progress(None, desc=stages["texture"])
                start = time.perf_counter()
                try:
                    texture = bake_texture(fields, triplane[j:j + 1].to(fields.bbox.device), mesh, TEXTURE_SIZE,
                                           normal_map=bool(settings.target_faces),
                                           chunk=2**21 if fields.bbox.device.type == "cuda" else 2**16)
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    raise gr.Error("The GPU ran out of memory while baking the texture; try again in a moment, "
                                   "or choose vertex colours.") from None
                record["timings"]["texture"] = time.perf_counter() - start
            progress(None, desc=stages["export"])
            entry = self.store.save(key, mesh, record, texture, render_preview(mesh, texture))
            made.append(key)
            yield "entry", i, entry
        self.store.enforce_limits(keep=set(made))

    def _outputs(self, entry: Entry, settings: Settings, request, cached: bool, started: float) -> tuple:
        """generate()'s outputs for a stored entry."""
        record = entry.record
        for note in record.get("warnings", []):
            gr.Warning(note)
        info = {**record, "timings": {k: round(v, 3) for k, v in record["timings"].items()}, "cached": cached,
                "files": {kind: path.name for kind, path in entry.files.items()},
                "total_seconds": round(time.perf_counter() - started, 3)}
        link = share_link(request, settings)
        files = entry.files
        remembered = {**asdict(settings), "key": entry.key, "link": link,
                      "thumb": base64.b64encode(thumbnail_jpeg(_read_image(files["preview"]))).decode()}
        return (str(files["glb"]), info, settings.seed, str(files["glb"]), str(files["obj"]), str(files["ply"]),
                str(files["stl"]), link, remembered)

    def generate(self, prompt, seed, randomize_seed, mesh_resolution, remove_floaters=False, simplify=False,
                 target_faces=DEFAULT_FACES, texture="uv", request: gr.Request = None, progress=gr.Progress()):
        """Text to a textured mesh: the GLB, the details, the seed used, the GLB/OBJ(zip)/PLY/STL files and a
        link that reproduces the result. A new mesh is shown first with vertex colours while its texture bakes."""
        started = time.perf_counter()
        text, notes = clean_prompt(prompt)
        settings = Settings(text, pick_seed(seed, randomize_seed), check_resolution(mesh_resolution),
                            _flag(remove_floaters, "remove_floaters"),
                            check_faces(target_faces) if _flag(simplify, "simplify") else None, check_texture(texture))
        for note in notes:
            gr.Warning(note)
        for kind, _, value in self._guarded(self.produce([settings], progress)):
            if kind == "mesh":
                yield (str(value), {"prompt": settings.prompt, "seed": settings.seed, "status": "baking the texture…"},
                       settings.seed, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip())
            else:
                yield self._outputs(value, settings, request, not value.fresh, started)

    def variants(self, prompt, seed, count, mesh_resolution, request: gr.Request = None, progress=gr.Progress()):
        """`count` meshes (1-8) from seeds seed, seed+1, … in one GPU call: preview images (captioned with
        their seeds) and GLB files. Variant i is the result generate() gives for seed + i."""
        text, notes = clean_prompt(prompt)
        first = pick_seed(seed, False)
        count = check_count(count)
        resolution = check_resolution(mesh_resolution)
        if first + count - 1 > MAX_SEED:
            raise gr.Error(f"The seeds {first}…{first + count - 1} go past {MAX_SEED}.")
        for note in notes:
            gr.Warning(note)
        batch = [Settings(text, first + i, resolution) for i in range(count)]
        entries: dict[int, Entry] = {}
        for kind, i, entry in self._guarded(self.produce(batch, progress, show_pending=False)):
            if kind == "entry":
                entries[i] = entry
        if not entries:
            raise gr.Error(f"The model produced no surface for any of the seeds {first}…{first + count - 1}; "
                           "try other seeds or another prompt.")
        if missing := [batch[i].seed for i in range(count) if i not in entries]:
            gr.Warning(f"No surface for seed{'s' * (len(missing) > 1)} {', '.join(map(str, missing))}: left out.")
        made = [(entries[i], batch[i]) for i in range(count) if i in entries]
        gallery = [(str(e.files["preview"]), f"seed {s.seed}") for e, s in made]
        chosen = [{**asdict(s), "key": e.key} for e, s in made]
        return gallery, [str(e.files["glb"]) for e, _ in made], chosen

    def _guarded(self, events):
        """Errors inside production become clear messages (and the log keeps the details)."""
        try:
            yield from events
        except gr.Error:
            raise
        except Exception as exc:
            logger.exception("generation failed")
            raise gr.Error(f"Generation failed ({type(exc).__name__}); the server log has the details.") from exc

    def show_entry(self, settings: Settings, request, progress):
        """A result by its settings (from the store, or made again), as generate()'s outputs plus the inputs."""
        started = time.perf_counter()
        inputs = (settings.prompt, False, settings.mesh_resolution, settings.remove_floaters,
                  settings.target_faces is not None, settings.target_faces or DEFAULT_FACES,
                  _texture_label(settings.texture))  # the seed is among the outputs already
        for _, _, entry in self._guarded(self.produce([settings], progress, show_pending=False)):
            yield (*self._outputs(entry, settings, request, not entry.fresh, started), *inputs)

    def pick_variant(self, chosen, evt: gr.SelectData, request: gr.Request, progress=gr.Progress()):
        """A click on a variant's preview: that mesh in the viewer, with its downloads and link."""
        if not chosen or evt.index is None or not 0 <= evt.index < len(chosen):
            raise gr.Error("That variant is no longer available; make the variants again.")
        yield from self.show_entry(settings_from(chosen[evt.index]), request, progress)

    def pick_history(self, history, evt: gr.SelectData, request: gr.Request, progress=gr.Progress()):
        """A click on a history entry: restored from the store, or made again from its settings."""
        entries = (history or {}).get("entries", [])
        if evt.index is None or not 0 <= evt.index < len(entries):
            raise gr.Error("That history entry is gone.")
        yield from self.show_entry(settings_from(entries[evt.index]), request, progress)

    # -- history (kept in the browser) ------------------------------------------------------------
    def remember(self, result, history):
        """Puts the latest result first in the browser's history (bounded, no duplicates)."""
        entries = [e for e in (history or {}).get("entries", []) if e.get("key") != (result or {}).get("key")]
        if result:
            entries.insert(0, result)
        history = {"version": 1, "entries": entries[:HISTORY_SIZE]}
        return history, self.history_gallery(history)

    def history_gallery(self, history):
        """Gallery items for the browser's history. The entries come from the browser, so each
        thumbnail is decoded and re-encoded (bounded in size) before it is written, and a broken
        entry is left out."""
        items = []
        for entry in (history or {}).get("entries", [])[:HISTORY_SIZE] if isinstance(history, dict) else []:
            try:
                settings = settings_from(entry)
                thumb = self.store.thumbnail(checked_thumbnail(entry["thumb"]))
            except (gr.Error, KeyError, TypeError, ValueError, OSError):
                continue
            items.append((str(thumb), f"{settings.prompt[:60]} · seed {settings.seed}"))
        return items

    def clear_history(self):
        history = {"version": 1, "entries": []}  # a truthy value: BrowserState never stores falsy ones
        return history, []

    # -- page load and links ----------------------------------------------------------------------
    def on_load(self, request: gr.Request):
        """Model status; with ?prompt=…&seed=…&resolution=… fills the inputs and starts a generation."""
        query = dict(request.query_params) if request is not None else {}
        if not query.get("prompt", "").strip():
            return self.loader.status(), *[gr.skip()] * 9
        seed, randomize = gr.skip(), True
        if "seed" in query:
            try:
                seed, randomize = _whole_number(query["seed"], "seed"), False
            except gr.Error:
                gr.Warning(f"The link's seed {query['seed']!r:.30} is not a whole number; using a random seed.")
        try:
            resolution = check_resolution(query.get("resolution", DEFAULT_RESOLUTION))
        except gr.Error:
            gr.Warning(f"The link's resolution is not one of {RESOLUTIONS}; using {DEFAULT_RESOLUTION}.")
            resolution = DEFAULT_RESOLUTION
        faces = query.get("faces", "")
        simplify = faces.isascii() and faces.isdigit()
        texture = query.get("texture") if query.get("texture") in TEXTURES.values() else "uv"
        return (self.loader.status(), query["prompt"], seed, randomize, resolution,
                query.get("floaters", "") in ("1", "true"), simplify, int(faces) if simplify else gr.skip(),
                _texture_label(texture), time.time_ns())


def settings_from(kept) -> Settings:
    """Settings from a history or variant entry, which the browser holds (and could have changed):
    checked as strictly as the inputs of ``generate``."""
    try:
        prompt, notes = clean_prompt(kept["prompt"])
        faces = kept.get("target_faces")
        return Settings(prompt, pick_seed(kept["seed"], False), check_resolution(kept["mesh_resolution"]),
                        _flag(kept.get("remove_floaters"), "remove_floaters"),
                        None if faces is None else check_faces(faces), check_texture(kept.get("texture", "uv")))
    except (KeyError, TypeError, AttributeError):
        raise gr.Error("That entry is damaged; generate it again.") from None


def checked_thumbnail(encoded, limit: int = 64_000) -> bytes:
    """A history thumbnail from the browser (base64 JPEG), decoded, bounded and re-encoded."""
    from PIL import Image

    data = base64.b64decode(encoded, validate=True)
    if len(data) > limit:
        raise ValueError("thumbnail too large")
    import io

    import numpy as np

    with Image.open(io.BytesIO(data)) as image:
        if image.width > 256 or image.height > 256:
            raise ValueError("thumbnail too large")
        return thumbnail_jpeg(np.asarray(image.convert("RGB")), size=min(image.width, 96))


def _texture_label(value: str) -> str:
    return next(label for label, v in TEXTURES.items() if v == value)


def _read_image(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def on_zero_gpu() -> bool:
    return bool(getattr(getattr(getattr(spaces, "config", None), "Config", None), "zero_gpu", False))


def pick_device(requested: str | None) -> str:
    """The device the app runs on: as asked, else CUDA, else Apple's MPS, else the CPU."""
    if requested:
        return requested
    if on_zero_gpu() or torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def speed_note(tiny: bool, device: str) -> str:
    if device.startswith(("cuda", "mps")):
        return "Running on a GPU: a generation takes about a second (plus any wait in the queue)."
    if tiny:
        return "Running on CPU: about 1–3 s per model (the tiny demo model)."
    return ("Running on CPU: one model takes minutes here (about 1.5 min on a 2-core server CPU; "
            "about a second on a GPU). Progress is shown while it works.")


def build_demo(model, output_dir, *, tiny: bool | None = None, max_bytes: float = 2e9,
               max_age_s: float = 86400.0, bake_fields=None) -> gr.Blocks:
    """The app's Blocks, queued but not launched; ``model`` is a pipeline or a ``ModelLoader``."""
    loader = model if isinstance(model, ModelLoader) else ModelLoader.loaded(model)
    if tiny is None:
        tiny = loader.pipe is not None and loader.pipe.revision == "tiny"
    store = ResultStore(output_dir, max_bytes, max_age_s)
    store.enforce_limits()
    app = TriplaneTurboApp(loader, store, bake_fields)
    # Results are served from the store's own folders, in place (nothing is copied to Gradio's
    # cache); lazily cached examples live under the store too. Nothing else is served.
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(store.root / "examples")
    gr.set_static_paths([*store.served, store.root / "examples"])

    with gr.Blocks(title="TriplaneTurbo: instant text-to-mesh") as demo:
        repo = f" · [this app's code]({REPO_URL})" if REPO_URL else ""
        gr.Markdown("# TriplaneTurbo: instant text-to-mesh\nType a description and get a textured 3D mesh in about "
                    f"a second on a GPU. [Paper (arXiv 2503.21694)]({PAPER_URL}) · [Authors' code]({CODE_URL}){repo}")
        if tiny:
            gr.Markdown(TINY_BANNER, elem_id="tiny-banner")
        gr.Markdown(speed_note(tiny, loader.device), elem_id="speed-note")
        status = gr.Markdown(loader.status(), elem_id="model-status")
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", placeholder="a frog wearing a sweater", max_lines=1,
                                    elem_id="prompt")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=EXAMPLE_SEED, precision=0, elem_id="seed")
                    randomize = gr.Checkbox(label="Randomize seed", value=True, elem_id="randomize")
                with gr.Accordion("Advanced", open=False):
                    resolution = gr.Dropdown(list(RESOLUTIONS), value=DEFAULT_RESOLUTION, label="Mesh resolution",
                                             info="Marching-cubes grid per axis: finer meshes take longer.")
                    texture = gr.Radio(list(TEXTURES), value=_texture_label("uv"), label="Colours",
                                       info="A baked texture keeps the detail on light meshes; vertex colours "
                                            "are quicker.", elem_id="texture")
                    floaters = gr.Checkbox(label="Remove small floating parts", value=False)
                    with gr.Row():
                        simplify = gr.Checkbox(label="Simplify to a target face count (adds a normal map)",
                                               value=False)
                        faces = gr.Number(label="Target faces", value=DEFAULT_FACES, precision=0)
                with gr.Accordion("Variants", open=False):
                    count = gr.Slider(1, MAX_VARIANTS, value=4, step=1, label="Variants",
                                      info="Several meshes from consecutive seeds, in one go.", elem_id="count")
                    variants_button = gr.Button("Make variants", elem_id="make-variants")
                    variants_gallery = gr.Gallery(label="Variants (click one to open it)", columns=4, height=220,
                                                  fit_columns=False, object_fit="contain", elem_id="variants",
                                                  allow_preview=False)
                    variant_files = gr.File(label="Variant GLBs", file_count="multiple", elem_id="variant-files")
            with gr.Column(scale=3):
                model3d = gr.Model3D(str(store.empty_glb), label="Mesh", camera_position=(90, 75, None),
                                     clear_color=(0.96, 0.96, 0.97, 1.0), height=440, interactive=False,
                                     elem_id="model3d")
                with gr.Row():
                    downloads = [gr.DownloadButton(f"Download {label}", size="sm", elem_id=f"download-{fmt}")
                                 for fmt, label in (("glb", "GLB"), ("obj", "OBJ (zip)"), ("ply", "PLY"), ("stl", "STL"))]
                link = gr.Textbox(label="Link to this result", buttons=["copy"], interactive=False,
                                  elem_id="share-link", placeholder="Generate something to get a link.")
                info = gr.JSON(label="Details", elem_id="details")
        history = gr.BrowserState({"version": 1, "entries": []}, **HISTORY_STORAGE)
        with gr.Accordion("History (this browser)", open=True):
            history_gallery = gr.Gallery(label="Your results, newest first (click one to open it)", columns=8,
                                         height=170, fit_columns=False, object_fit="contain", elem_id="history",
                                         allow_preview=False)
            clear = gr.Button("Clear history", size="sm", elem_id="clear-history")

        result = gr.State(None)  # the latest result, for the history
        chosen_variants = gr.State([])
        link_trigger = gr.State(None)
        timer = gr.Timer(2.0, active=not loader.wait(0))  # refreshes the status while weights load
        timer.tick(lambda: (loader.status(), gr.Timer(active=not loader.wait(0))), None, [status, timer],
                   api_visibility="private", show_progress="hidden")

        inputs = [prompt, seed, randomize, resolution, floaters, simplify, faces, texture]
        outputs = [model3d, info, seed, *downloads, link, result]
        private = dict(api_visibility="private")
        remember = dict(fn=app.remember, inputs=[result, history], outputs=[history, history_gallery], **private)
        gr.on([button.click, prompt.submit, link_trigger.change], app.generate, inputs, outputs,
              api_name="generate", preprocess=False, show_progress_on=[model3d],
              concurrency_limit=None).success(**remember)
        gr.Examples([[p] for p in load_examples()], [prompt], outputs, fn=lambda p: _last(app.generate(
                        p, EXAMPLE_SEED, False, DEFAULT_RESOLUTION)), cache_examples=True, cache_mode="lazy",
                    examples_per_page=16, label="Examples (from the authors' talk)", **private)
        variants_button.click(app.variants, [prompt, seed, count, resolution],
                              [variants_gallery, variant_files, chosen_variants], api_name="variants",
                              preprocess=False, concurrency_limit=None)
        selected = [*outputs, prompt, randomize, resolution, floaters, simplify, faces, texture]
        variants_gallery.select(app.pick_variant, [chosen_variants], selected, concurrency_limit=None,
                                show_progress_on=[model3d],
                                **private).success(**remember)
        history_gallery.select(app.pick_history, [history], selected, concurrency_limit=None,
                               show_progress_on=[model3d],
                               **private).success(**remember)
        clear.click(app.clear_history, None, [history, history_gallery], **private)
        demo.load(app.on_load, None, [status, *inputs, link_trigger], **private)
        demo.load(app.history_gallery, [history], [history_gallery], **private)
    demo.queue(max_size=QUEUE_SIZE)
    return demo


def _last(outputs):
    """The final yield of a streaming handler (the lazily cached example stores that one)."""
    last = None
    for last in outputs:
        pass
    return last


def launch_kwargs(output_dir) -> dict:
    """launch() arguments shared by main() and the tests: nothing but the result store is served."""
    return dict(ssr_mode=False, theme=gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"],
                                                      font_mono=["ui-monospace", "monospace"]),
                css_paths=[ASSETS / "style.css"], footer_links=["api", "gradio", "settings"])


def parse_args(argv=None) -> argparse.Namespace:
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
                        help="evict the oldest results above this size (default 2)")
    parser.add_argument("--max-output-age-hours", type=float, default=float(env("TRIPLANE_TURBO_OUTPUT_MAX_AGE_H", 24)),
                        help="evict results older than this (default 24)")
    return parser.parse_args(argv)


def app_dtype(device: str) -> torch.dtype:
    """The networks' dtype: the library's default for the device; float16 on Apple's MPS."""
    return torch.float16 if device.startswith("mps") else default_dtype(device)


def make_loader(tiny: bool, device: str, zero_gpu: bool = False):
    """The loader for the chosen weights and device, and (on ZeroGPU) the CPU copy of the fields
    that textures are baked with."""
    dtype = app_dtype(device)
    dtype_name = str(dtype).removeprefix("torch.")
    if tiny:
        from triplane_turbo.tiny import tiny_pipeline

        return ModelLoader(lambda _: "tiny", lambda: tiny_pipeline(device=device, dtype=dtype), device=device,
                           dtype=dtype_name, describe="Building the tiny offline model…"), None
    from triplane_turbo import TriplaneTurboPipeline, WeightSources, hub

    sources = WeightSources.resolve()
    fetched = {}

    def fetch(tqdm_class) -> str:
        fetched["weights"] = hub.resolve(sources.base_model, sources.adapter, sources.adapter_filename,
                                         variant="fp16" if dtype == torch.float16 else None, tqdm_class=tqdm_class)
        return fetched["weights"].revision

    describe = ("Loading the model… The first start downloads about 2.7 GB (float16) or 5.3 GB (float32) from the "
                "Hugging Face Hub (Stable Diffusion 2.1-base and the TriplaneTurbo adapter); later starts use the cache.")
    if not zero_gpu:
        return ModelLoader(fetch, lambda: TriplaneTurboPipeline.from_resolved(fetched["weights"], device=device,
                                                                              dtype=dtype),
                           device=device, dtype=dtype_name, describe=describe), None
    # ZeroGPU: everything now, on this (the main) thread, before launch(); the fields for baking
    # stay on the CPU, the networks go to "cuda" (which `spaces` emulates here and streams to each
    # GPU worker).
    baking = {}

    def build_for_zero_gpu():
        pipe = TriplaneTurboPipeline.from_resolved(fetched["weights"], dtype=dtype)
        baking["fields"] = copy.deepcopy(pipe.fields)
        return pipe.to("cuda")

    loader = ModelLoader(fetch, build_for_zero_gpu, device="cuda", dtype=dtype_name, background=False,
                         describe=describe)
    return loader, baking.get("fields")


def main(argv=None) -> None:
    args = parse_args(argv)
    zero_gpu = on_zero_gpu()
    device = pick_device(args.device)
    if device.startswith("cuda") and not (torch.cuda.is_available() or zero_gpu):
        raise SystemExit(f"--device {args.device}: CUDA is not available here (use --device cpu)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:  # the output folder first: refusing it must not wait for gigabytes of weights
        ResultStore(args.output_dir)
    except OutputFolderError as exc:
        raise SystemExit(f"error: {exc}") from None
    loader, bake_fields = make_loader(args.tiny, device, zero_gpu)
    logger.info(loader.describe)
    demo = build_demo(loader, args.output_dir, tiny=args.tiny, max_bytes=args.max_output_gb * 1e9,
                      max_age_s=args.max_output_age_hours * 3600, bake_fields=bake_fields)
    demo.launch(share=args.share, **launch_kwargs(args.output_dir))


if __name__ == "__main__":
    main()
