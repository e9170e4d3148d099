"""What the web app (``app.py``) needs that is not UI: the model loader and the store of results.

``ModelLoader`` gets the weights in two phases, once, in a background thread by default:

1. *fetch*: find or download the files (``hub.resolve``) — this alone fixes the weights' revision,
   which is all a cached result needs;
2. *build*: load them onto the target device in the target dtype, once.

Requests wait for the phase they need (with a progress line, the download's bytes where there are
some) instead of failing while the model loads; a failure becomes one clear message for every
waiting and later request.

``ResultStore`` keeps results in a folder of their own:

    <root>/.triplane-turbo-results     marker: the folder was made by this app
    <root>/files/<key>/…               served to the browser: GLB, OBJ zip, PLY, STL, preview PNG
    <root>/records/<key>.json          not served: prompt, settings, timings
    <root>/thumbs/<sha>.jpg            served: history thumbnails, by content
    <root>/files/empty.glb             served: the viewer's empty first value

File names come from a hash of the settings, never from the prompt. Only ``files/`` and ``thumbs/``
are served; the store refuses a root that holds anything else (``--output-dir .`` would otherwise
publish the working directory). It is bounded by age and total size, least recently used first.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .export import encode_mesh, zip_files

logger = logging.getLogger(__name__)

_KEY = re.compile(r"[0-9a-f]{32}")
MARKER = ".triplane-turbo-results"
#: Everything the store may find in its root (the first app version kept entries in 32-hex folders
#: and ".staging-*" folders at the top: those are its own and are cleared on start).
_OWN = {MARKER, "files", "records", "thumbs", "examples", "tmp", ".staging"}


class ModelNotReadyError(RuntimeError):
    """The weights could not be loaded; the message says why and what to do."""


class OutputFolderError(ValueError):
    """The output folder holds files the app did not make; serving it would publish them."""


# -------------------------------------------------------------------------------------------------
# Loading the model
# -------------------------------------------------------------------------------------------------

class _DownloadBars:
    """A tqdm class for huggingface_hub that also reports the bytes downloaded to the loader."""

    def __init__(self):
        self.done = self.total = 0.0
        self._lock = threading.Lock()

    def tqdm_class(self):
        from huggingface_hub.utils import tqdm as hub_tqdm

        bars = self

        class ReportingTqdm(hub_tqdm):
            def update(self, n=1):
                shown = super().update(n)
                if getattr(self, "unit", None) == "B" and self.total:
                    with bars._lock:
                        bars.done, bars.total = float(self.n), float(self.total)
                return shown

        return ReportingTqdm

    def describe(self) -> str | None:
        with self._lock:
            if not self.total:
                return None
            return f"downloading the weights: {self.done / 1e9:.2f} of {self.total / 1e9:.2f} GB"


class ModelLoader:
    """Fetches and builds the pipeline once and hands it out; requests wait for what they need.

    Args:
        fetch: ``fetch(tqdm_class) -> revision``: find or download the weights; fast when cached.
        build: ``build() -> pipeline``: load them onto the target device (after ``fetch``).
        device, dtype: where the pipeline will run (known before it is built: cache keys use them).
        background: load in a thread (the page comes up at once) or right here (ZeroGPU: the
            weights must be on "cuda" before ``launch()``, from the main thread).
        describe: what loading means, for the page (e.g. the download size).
    """

    def __init__(self, fetch: Callable[[type], str], build: Callable[[], object], *, device: str, dtype: str,
                 background: bool = True, describe: str = "Loading the model…"):
        self.device, self.dtype, self.describe = device, dtype, describe
        self.pipe = self.revision = self.error = None
        self._fetch, self._build = fetch, build
        self._fetched, self._built = threading.Event(), threading.Event()
        self._bars = _DownloadBars()
        self.phase = "fetching"
        if background:
            threading.Thread(target=self._load, name="weights-loader", daemon=True).start()
        else:
            self._load()

    @classmethod
    def loaded(cls, pipe) -> "ModelLoader":
        """A loader for a pipeline that is already built."""
        return cls(lambda _: pipe.revision, lambda: pipe, device=str(pipe.device.type),
                   dtype=str(pipe.dtype).removeprefix("torch."), background=False)

    def _load(self) -> None:
        try:
            self.revision = self._fetch(self._bars.tqdm_class())
            self._fetched.set()
            self.phase = "building"
            pipe = self._build()
            pipe.set_progress_bar_config(disable=True)
            self.pipe = pipe
            self.phase = "ready"
            logger.info("model ready (weights %s, on %s, %s)", pipe.revision, pipe.device, pipe.dtype)
        except Exception as exc:  # every waiting and later request reports it
            logger.exception("could not load the model")
            self.error, self.phase = exc, "failed"
        finally:
            self._fetched.set()
            self._built.set()

    def ready(self) -> bool:
        return self._built.is_set() and self.error is None

    def wait(self, timeout: float | None = None) -> bool:
        """True once loading has finished (successfully or not)."""
        return self._built.wait(timeout)

    def progress_line(self) -> str:
        """What the loader is doing now, for progress bars."""
        if self.phase == "fetching":
            return "Loading the model… " + (self._bars.describe() or "finding the weights")
        if self.phase == "building":
            return "Loading the model… reading the weights into memory"
        return "Loading the model…"

    def _wait(self, event: threading.Event, report: Callable[[str], None] | None, poll: float = 0.5) -> None:
        while not event.wait(poll):
            if report:
                report(self.progress_line())

    def weights_revision(self, report: Callable[[str], None] | None = None) -> str:
        """The weights' revision, waiting for the fetch phase only (cached results need no more,
        and stay available even if building the model then failed)."""
        self._wait(self._fetched, report)
        if self.revision is None:
            raise ModelNotReadyError(f"The model could not be loaded: {self.error}")
        return self.revision

    def get(self, report: Callable[[str], None] | None = None):
        """The pipeline, waiting for it to be built; ``report(line)`` is called while waiting."""
        self._wait(self._built, report)
        if self.error is not None:
            raise ModelNotReadyError(f"The model could not be loaded: {self.error}")
        return self.pipe

    def status(self) -> str:
        """One line (Markdown) on the state of the model, for the page."""
        if self.error is not None:
            return f"**The model could not be loaded.** {self.error}"
        if self.ready():
            return f"Model ready (weights `{self.pipe.revision}`, {self.device}, {self.dtype})."
        detail = self._bars.describe() if self.phase == "fetching" else None
        return self.describe + (f" ({detail})" if detail else "") + " Requests made meanwhile wait for it."


# -------------------------------------------------------------------------------------------------
# The result store
# -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """A stored result: its key, where its files are, and its record."""

    key: str
    files: dict[str, Path]  # "glb", "obj", "ply", "stl", "preview"
    record: dict
    fresh: bool = False  # made just now (``save``), rather than found (``load``)


class ResultStore:
    """Generated meshes on disk, bounded by ``max_bytes`` in total and ``max_age_s`` per entry."""

    FILES = {"glb": "{stem}.glb", "obj": "{stem}-obj.zip", "ply": "{stem}.ply", "stl": "{stem}.stl",
             "preview": "{stem}-preview.png"}

    def __init__(self, root: str | os.PathLike, max_bytes: float = 2e9, max_age_s: float = 86400.0):
        self.root = Path(root).expanduser().resolve()
        self.max_bytes, self.max_age_s = max_bytes, max_age_s
        self._lock = threading.Lock()
        self._claim_root()
        for name in ("files", "records", "thumbs", ".staging"):
            (self.root / name).mkdir(exist_ok=True)
        self.empty_glb = self.root / "files" / "empty.glb"
        if not self.empty_glb.exists():
            _write_atomic(self.empty_glb, _EMPTY_GLB)

    @property
    def served(self) -> list[Path]:
        """The folders the web server may serve (nothing else under the root)."""
        return [self.root / "files", self.root / "thumbs"]

    def _claim_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        names = set(os.listdir(self.root))
        legacy = {n for n in names if _KEY.fullmatch(n) or n.startswith(".staging-")}
        foreign = sorted(names - _OWN - legacy)
        if foreign:
            shown = ", ".join(repr(n) for n in foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise OutputFolderError(
                f"The output folder {self.root} already holds files this app did not make ({shown}). The app "
                f"serves and deletes what it keeps there, so it needs a folder of its own: choose a new or "
                f"empty folder with --output-dir (or TRIPLANE_TURBO_OUTPUT_DIR).")
        for name in legacy:  # results of the first app version, in its old layout
            shutil.rmtree(self.root / name, ignore_errors=True)
        (self.root / MARKER).touch()

    @staticmethod
    def key(**settings) -> str:
        """A 32-hex-digit key for JSON-serialisable settings (order does not matter)."""
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]

    def paths(self, key: str) -> dict[str, Path]:
        """Where an entry's files live (whether or not they exist yet)."""
        stem = f"triplaneturbo-{key[:12]}"
        return {kind: self.root / "files" / key / name.format(stem=stem) for kind, name in self.FILES.items()}

    def load(self, key: str) -> Entry | None:
        """A complete entry (and marks it recently used), or None."""
        if not _KEY.fullmatch(key):
            return None
        try:
            record = json.loads((self.root / "records" / f"{key}.json").read_text(encoding="utf-8"))
            paths = self.paths(key)
            if not all(path.is_file() for path in paths.values()):
                return None
            os.utime(self.root / "files" / key)  # eviction drops the least recently used entries first
        except (OSError, ValueError):
            return None
        return Entry(key, paths, record)

    def save(self, key: str, mesh, record: dict, texture=None, preview=None) -> Entry:
        """Exports a model-frame ``mesh`` (with its ``texture``) in every format, the ``preview``
        image [H, W, 3] uint8, and the record; readers never see a partial entry.

        ``record["timings"]["export"]`` is set to the export time.
        """
        from PIL import Image

        if not _KEY.fullmatch(key):
            raise ValueError(f"not a store key: {key!r}")
        staging = Path(tempfile.mkdtemp(dir=self.root / ".staging"))
        try:
            start = time.perf_counter()
            paths = self.paths(key)
            stem = paths["glb"].stem
            for fmt in ("glb", "ply", "stl"):
                (staging / paths[fmt].name).write_bytes(encode_mesh(mesh, fmt, stem, texture)[f"{stem}.{fmt}"])
            (staging / paths["obj"].name).write_bytes(zip_files(encode_mesh(mesh, "obj", stem, texture)))
            Image.fromarray(preview).save(staging / paths["preview"].name)
            record = {**record, "timings": {**record.get("timings", {}), "export": time.perf_counter() - start}}
            staging.chmod(0o755)
            for path in staging.iterdir():
                path.chmod(0o644)
            with self._lock:
                shutil.rmtree(self.root / "files" / key, ignore_errors=True)  # a stale or incomplete entry
                os.replace(staging, self.root / "files" / key)
                _write_atomic(self.root / "records" / f"{key}.json",
                              json.dumps(record, indent=1, ensure_ascii=False).encode("utf-8"))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return Entry(key, self.paths(key), record, fresh=True)

    def pending_glb(self, key: str, mesh) -> Path:
        """A vertex-coloured GLB shown while the texture bakes (``files/<key>.pending/``, cleaned up
        with the entries)."""
        folder = self.root / "files" / f"{key}.pending"
        folder.mkdir(exist_ok=True)
        path = folder / f"triplaneturbo-{key[:12]}-preview.glb"
        _write_atomic(path, encode_mesh(mesh, "glb", path.stem)[f"{path.stem}.glb"])
        return path

    def thumbnail(self, jpeg: bytes) -> Path:
        """A history thumbnail written (once) under ``thumbs/``, named by its content."""
        path = self.root / "thumbs" / f"{hashlib.sha256(jpeg).hexdigest()[:32]}.jpg"
        if not path.exists():
            _write_atomic(path, jpeg)
        else:
            os.utime(path)
        return path

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes, folder) of every file folder (entries and pending GLBs), oldest first."""
        found = []
        for child in (self.root / "files").iterdir():
            try:
                size = sum(f.stat().st_size for f in child.iterdir() if f.is_file())
                found.append((child.stat().st_mtime, size, child))
            except OSError:  # removed meanwhile
                continue
        return sorted(found)

    def enforce_limits(self, keep: str | set[str] | None = None) -> list[str]:
        """Deletes entries older than ``max_age_s``, then the oldest while over ``max_bytes``.

        ``keep`` (the entries just written or served) is never deleted. Returns the deleted keys.
        Files that other requests remove meanwhile are simply skipped.
        """
        keep = {keep} if isinstance(keep, str) else set(keep or ())
        now, removed = time.time(), []

        def age(path: Path) -> float:
            try:
                return now - path.stat().st_mtime
            except FileNotFoundError:
                return -1.0

        with self._lock:
            for child in (self.root / ".staging").iterdir():
                if age(child) > 3600:  # left behind by a crash
                    shutil.rmtree(child, ignore_errors=True)
            entries = self.entries()
            total = sum(size for _, size, _ in entries) + sum(_size(f) for f in (self.root / "thumbs").iterdir())
            for mtime, size, child in entries:
                key = child.name.removesuffix(".pending")
                pending_done = child.name.endswith(".pending") and now - mtime > 600
                if key not in keep and (now - mtime > self.max_age_s or total > self.max_bytes or pending_done):
                    shutil.rmtree(child, ignore_errors=True)
                    if not child.name.endswith(".pending"):
                        (self.root / "records" / f"{key}.json").unlink(missing_ok=True)
                        removed.append(key)
                    total -= size
            for thumb in (self.root / "thumbs").iterdir():
                if age(thumb) > self.max_age_s:
                    thumb.unlink(missing_ok=True)
            for record in (self.root / "records").iterdir():  # records whose files are gone
                if not (self.root / "files" / record.stem).exists() and age(record) > 60:
                    record.unlink(missing_ok=True)
        return removed


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _empty_glb() -> bytes:
    """A GLB that draws nothing (one zero-area triangle): the viewer's first value, so that its 3D
    canvas is set up when the page loads. (Gradio 6.31's Model3D loses its renderer when the first
    mesh it gets is sent twice in quick succession, as a one-step streaming event does.)"""
    import numpy as np
    import trimesh
    from trimesh.exchange.gltf import export_glb

    return export_glb(trimesh.Trimesh(np.zeros((3, 3)), [[0, 1, 2]], process=False))


_EMPTY_GLB = _empty_glb()


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def thumbnail_jpeg(image, size: int = 96) -> bytes:
    """A small JPEG of a preview image [H, W, 3] uint8 (history entries keep these in the browser)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).resize((size, size), Image.LANCZOS).save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


__all__ = ["Entry", "ModelLoader", "ModelNotReadyError", "OutputFolderError", "ResultStore", "thumbnail_jpeg"]
