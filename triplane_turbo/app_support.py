"""Helpers for the web app (``app.py``) that are not UI: background weight loading, and the
on-disk store of generated meshes.

``ModelLoader`` builds the pipeline once, in a background thread, so that the page comes up while
the weights load; until then (or after a failure) ``get()`` raises ``ModelNotReadyError`` with a
message meant for the user.

``ResultStore`` keeps one folder per (prompt, seed, settings, weights revision) under one root:

    <root>/<32 hex key>/triplaneturbo-<key[:12]>.{glb,obj,ply,stl}
    <root>/<32 hex key>/meta.json

File names come from a hash of the settings, never from the prompt. The store is bounded by age
and total size (least recently used entries go first), and it only ever deletes folders whose
names it could have created, so pointing it at a folder that holds other things is harmless.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import logging
import threading
import time
from pathlib import Path
from typing import Callable

from .export import FORMATS, export_mesh

logger = logging.getLogger(__name__)

_ENTRY_NAME = re.compile(r"[0-9a-f]{32}")
_STAGING_PREFIX = ".staging-"


class ModelNotReadyError(RuntimeError):
    """The weights are still loading, or could not be loaded; the message says which, for users."""


class ModelLoader:
    """Calls ``factory()`` once (in a background thread by default) and hands out its pipeline."""

    def __init__(self, factory: Callable[[], object], *, background: bool = True,
                 loading_message: str = "Loading the model weights…"):
        self._factory, self.pipe, self.error = factory, None, None
        self.loading_message = loading_message
        self._done = threading.Event()
        if background:
            threading.Thread(target=self._load, name="weights-loader", daemon=True).start()
        else:
            self._load()

    @classmethod
    def loaded(cls, pipe) -> "ModelLoader":
        """A loader for a pipeline that is already built."""
        return cls(lambda: pipe, background=False)

    def _load(self) -> None:
        try:
            pipe = self._factory()
            pipe.set_progress_bar_config(disable=True)
            self.pipe = pipe
            logger.info("model ready (weights %s, on %s)", pipe.revision, pipe.device)
        except Exception as exc:  # reported by get() and status()
            logger.exception("could not load the model")
            self.error = exc
        finally:
            self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        """True once loading has finished (successfully or not)."""
        return self._done.wait(timeout)

    def get(self):
        """The pipeline; ``ModelNotReadyError`` while loading or after a failure."""
        if not self._done.is_set():
            raise ModelNotReadyError("The model weights are still loading (a minute or two the first time); "
                                     "please try again shortly.")
        if self.error is not None:
            raise ModelNotReadyError(f"The model could not be loaded: {self.error}")
        return self.pipe

    def status(self) -> str:
        """One line (Markdown) on the state of the weights."""
        if not self._done.is_set():
            return self.loading_message
        if self.error is not None:
            return f"**The model could not be loaded:** {self.error}"
        return f"Model ready (weights `{self.pipe.revision}`)."


class ResultStore:
    """Generated meshes on disk, bounded by ``max_bytes`` in total and ``max_age_s`` per entry."""

    def __init__(self, root: str | os.PathLike, max_bytes: float = 2e9, max_age_s: float = 86400.0):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.max_age_s = max_bytes, max_age_s
        self._lock = threading.Lock()

    @staticmethod
    def key(**settings) -> str:
        """A 32-hex-digit key for JSON-serialisable settings (order does not matter)."""
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]

    def files(self, key: str) -> dict[str, Path]:
        """Where an entry's GLB/OBJ/PLY/STL files live (whether or not they exist yet)."""
        return {fmt: self.root / key / f"triplaneturbo-{key[:12]}.{fmt}" for fmt in FORMATS}

    def load(self, key: str) -> dict | None:
        """The metadata of a complete entry (and marks it recently used), or None."""
        folder = self.root / key
        try:
            meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
            if not all(path.is_file() for path in self.files(key).values()):
                return None
            os.utime(folder)  # eviction drops the least recently used entries first
        except (OSError, ValueError):
            return None
        return meta

    def save(self, key: str, mesh, meta: dict) -> dict:
        """Exports a model-frame ``mesh`` in every format plus ``meta.json``; returns ``meta``.

        ``meta["timings"]["export"]`` is set to the export time. The entry is written to a
        staging folder and renamed into place, so readers never see a partial entry.
        """
        if not _ENTRY_NAME.fullmatch(key):
            raise ValueError(f"not a store key: {key!r}")
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=self.root))
        try:
            start = time.perf_counter()
            for fmt, path in self.files(key).items():
                export_mesh(mesh, staging / path.name, fmt)
            meta.setdefault("timings", {})["export"] = time.perf_counter() - start
            (staging / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")
            staging.chmod(0o755)
            with self._lock:
                shutil.rmtree(self.root / key, ignore_errors=True)  # a stale or incomplete entry
                os.replace(staging, self.root / key)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return meta

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes, folder) of every entry, oldest first."""
        found = []
        for child in self.root.iterdir():
            if child.is_dir() and _ENTRY_NAME.fullmatch(child.name):
                try:
                    size = sum(f.stat().st_size for f in child.iterdir() if f.is_file())
                    found.append((child.stat().st_mtime, size, child))
                except OSError:  # removed meanwhile
                    continue
        return sorted(found)

    def enforce_limits(self, keep: str | None = None) -> list[str]:
        """Deletes entries older than ``max_age_s``, then the oldest while over ``max_bytes``.

        ``keep`` (the entry just written or served) is never deleted. Returns the deleted keys.
        """
        now, removed = time.time(), []
        with self._lock:
            for child in self.root.glob(_STAGING_PREFIX + "*"):
                if child.is_dir() and now - child.stat().st_mtime > 3600:  # left behind by a crash
                    shutil.rmtree(child, ignore_errors=True)
            entries = self.entries()
            total = sum(size for _, size, _ in entries)
            for mtime, size, child in entries:
                if child.name != keep and (now - mtime > self.max_age_s or total > self.max_bytes):
                    shutil.rmtree(child, ignore_errors=True)
                    total -= size
                    removed.append(child.name)
        return removed


__all__ = ["ModelLoader", "ModelNotReadyError", "ResultStore"]
