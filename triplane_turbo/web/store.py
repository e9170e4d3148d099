"""The app's results on disk, in a folder of their own, bounded by size and age.

    <root>/.triplane-turbo-results     marker: the folder was made by this app
    <root>/files/<key>/…               served: GLB, preview PNG, the source of the other formats
                                       (npz); each other download once it is first asked for
    <root>/files/<key>.pending/…       served: the vertex-coloured first look, while the texture bakes
    <root>/files/empty.glb             served: the viewer's empty first value
    <root>/records/<key>.json          not served: prompt, settings, timings
    <root>/thumbs/<sha>.jpg            served: history thumbnails sent by browsers, for results no longer stored
    <root>/.staging/                   not served: entries being written

File names come from a hash of the settings, never from the prompt. The store serves and deletes
what it keeps, so it takes only a folder that is empty or carries its marker, and it refuses one
holding anything it would not have made itself; it never deletes what it did not make. Entries are
evicted least recently used first, by age and by total size (downloads written later count from
then on); browser thumbnails live in a small budget of their own inside the total, so a forged
history can churn thumbnails but never push a result out.

Only the GLB the viewer needs and the preview are written before a result is shown; every other
download format is encoded from the entry's source when it is first asked for (``download``), then
kept with the entry. A store takes its folder for one server: on start it removes what a writer
killed mid-way left (staging folders, partial atomic writes, entries without their record).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..export import FORMATS, encode_mesh
from ..fileio import write_atomic
from .meshsource import encode_download, file_name, read_source, source_bytes

#: The app's download formats, in the order of its buttons: the GLB is written with the result, the
#: others when first asked for. Any of ``export.FORMATS`` can be added here.
DOWNLOADS = ("glb", "obj", "ply", "stl", "usdz", "3mf")
#: Errors of a full disk (or a full quota).
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

_KEY = re.compile(r"[0-9a-f]{32}")
MARKER = ".triplane-turbo-results"
_TOP = {MARKER, "files", "records", "thumbs", ".staging"}
#: What earlier versions of the app kept in a folder with its marker (Gradio's example cache, a
#: temporary folder): the app's own, removed when it takes the folder.
_LEGACY = {"examples", "tmp"}
#: The names the app gives to what it writes in each folder (``.name.*.tmp``: an atomic write that a
#: crash interrupted; ``tmp*``: an entry being staged).
_OWN_NAMES = {
    "files": re.compile(r"[0-9a-f]{32}(\.pending)?|empty\.glb|\.empty\.glb\..*\.tmp"),
    "records": re.compile(r"[0-9a-f]{32}\.json|\.[0-9a-f]{32}\.json\..*\.tmp"),
    "thumbs": re.compile(r"[0-9a-f]{32}\.jpg|\.[0-9a-f]{32}\.jpg\..*\.tmp"),
    ".staging": re.compile(r"tmp[\w]+"),
}
#: The files of one result's folder (``files/<key>/`` and ``files/<key>.pending/``).
_ENTRY_FILE = re.compile(r"triplaneturbo-[0-9a-f]{12}(\.[0-9a-z]+|-[0-9a-z]+\.zip|-preview\.png|-preview\.glb"
                         r"|-source\.npz)|\..*\.tmp")
#: Fraction of the byte budget that browser thumbnails may take (the rest is for results).
THUMB_SHARE = 0.02
#: Thumbnails are small (96² JPEG, a few kB): at most this many are kept whatever the budget.
MAX_THUMBS = 2000


class OutputFolderError(ValueError):
    """The output folder holds files the app did not make; serving it would publish them."""


@dataclass(frozen=True)
class Entry:
    """A stored result: its key, where its files are, and its record."""

    key: str
    files: dict[str, Path]  # "glb", "preview" (written), and every other download format (maybe not yet)
    record: dict
    fresh: bool = False  # made just now (``save``), rather than found (``load``)


class ResultStore:
    """Generated meshes on disk, bounded by ``max_bytes`` in total and ``max_age_s`` per entry."""

    #: What ``save`` writes (before a result is shown): the viewer's GLB, the preview, the source.
    EAGER = ("glb", "preview", "source")

    def __init__(self, root: str | os.PathLike, max_bytes: float = 2e9, max_age_s: float = 86400.0):
        self.root = Path(root).expanduser().resolve()
        self.max_bytes, self.max_age_s = max_bytes, max_age_s
        self.thumb_bytes = max_bytes * THUMB_SHARE
        self._lock = threading.Lock()
        self._export_lock = threading.Lock()  # one download written at a time (a second request waits for it)
        self._claim_root()
        for name in ("files", "records", "thumbs", ".staging"):
            (self.root / name).mkdir(exist_ok=True)
        self._recover()
        self.empty_glb = self.root / "files" / "empty.glb"
        if not self.empty_glb.exists():
            write_atomic(self.empty_glb, _empty_glb())

    @property
    def served(self) -> list[Path]:
        """The folders the web server may serve (nothing else under the root)."""
        return [self.root / "files", self.root / "thumbs"]

    def _claim_root(self) -> None:
        """Take the folder if it is new, empty, or this app's (its marker, and in each of its
        folders only names this app gives); otherwise refuse, touching nothing."""
        self.root.mkdir(parents=True, exist_ok=True)
        names = set(os.listdir(self.root))
        if names and MARKER not in names:
            raise OutputFolderError(self._refusal(sorted(names), "is not empty and was not made by this app"))
        foreign = sorted(names - _TOP - _LEGACY)
        for folder, own in _OWN_NAMES.items():
            if (self.root / folder).is_dir():
                foreign += [f"{folder}/{n}" for n in sorted(os.listdir(self.root / folder)) if not own.fullmatch(n)]
        for entry in (self.root / "files").glob("*"):  # nothing if there is no such folder
            if entry.is_dir() and _KEY.fullmatch(entry.name.removesuffix(".pending")):
                foreign += [f"files/{entry.name}/{n}" for n in sorted(os.listdir(entry)) if not _ENTRY_FILE.fullmatch(n)]
        if foreign:
            raise OutputFolderError(self._refusal(foreign, "holds files this app did not make"))
        for name in names & _LEGACY:
            shutil.rmtree(self.root / name, ignore_errors=True)
        (self.root / MARKER).touch()

    def _refusal(self, names: list[str], why: str) -> str:
        shown = ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        return (f"The output folder {self.root} {why} ({shown}). The app serves and deletes what it keeps there, "
                f"so it needs a folder of its own: choose a new or empty folder with --output-dir (or "
                f"TRIPLANE_TURBO_OUTPUT_DIR).")

    @staticmethod
    def key(**settings) -> str:
        """A 32-hex-digit key for JSON-serialisable settings (order does not matter)."""
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]

    def paths(self, key: str, formats: tuple[str, ...] = DOWNLOADS) -> dict[str, Path]:
        """Where an entry's files live (whether or not they exist yet): the download ``formats``, the
        preview and the source."""
        stem, folder = _stem(key), self.root / "files" / key
        return {**{fmt: folder / file_name(stem, fmt) for fmt in formats},
                "preview": folder / f"{stem}-preview.png", "source": folder / f"{stem}-source.npz"}

    def _complete(self, key: str) -> bool:
        """The GLB and preview are there, and the source (or, in an entry of an earlier version of
        the app, every download)."""
        paths = self.paths(key)
        return paths["glb"].is_file() and paths["preview"].is_file() and (
            paths["source"].is_file() or all(paths[fmt].is_file() for fmt in DOWNLOADS))

    def load(self, key: str) -> Entry | None:
        """A complete entry (and marks it recently used), or None."""
        if not _KEY.fullmatch(key):
            return None
        try:
            record = json.loads((self.root / "records" / f"{key}.json").read_text(encoding="utf-8"))
            if not self._complete(key):
                return None
            os.utime(self.root / "files" / key)  # eviction drops the least recently used entries first
        except (OSError, ValueError):
            return None
        return Entry(key, self.paths(key), record)

    def download(self, key: str, file_format: str) -> Path | None:
        """The stored result's file in ``file_format`` (any of ``export.FORMATS``): encoded from the
        entry's source and written the first time it is asked for, then kept (and counted) with the
        entry. None when there is no such entry (never made, or evicted). Concurrent requests for a
        file not yet written wait for the first to write it. OSError (e.g. a full disk) leaves no
        partial file."""
        if file_format not in FORMATS:
            raise ValueError(f"unknown download format {file_format!r}; allowed: {', '.join(FORMATS)}")
        with self._export_lock:
            if self.load(key) is None:
                return None
            paths = self.paths(key, (file_format,))
            path = paths[file_format]
            if path.is_file():
                return path
            try:
                mesh, texture = read_source(paths["source"])
            except (OSError, ValueError, KeyError):  # evicted meanwhile (or an earlier version's entry)
                return None
            data = encode_download(mesh, texture, file_format, _stem(key))
            with self._lock:  # eviction cannot remove the folder while the file goes in
                if not path.parent.is_dir():
                    return None
                write_atomic(path, data)
        self.enforce_limits(keep=key)  # the entry grew: the folder stays within its budget
        return path

    def save(self, key: str, mesh, record: dict, texture=None, preview=None) -> Entry:
        """Stores a model-frame ``mesh`` (with its ``texture``): its GLB, the ``preview`` image
        [H, W, 3] uint8, the source the other downloads are encoded from (``download``), and the
        record. Readers never see a partial entry, and a failure (OSError with ``errno.ENOSPC`` on a
        full disk) leaves none: the staging folder, or the entry, is removed.

        ``record["timings"]["export"]`` is set to the time this takes.
        """
        from PIL import Image

        if not _KEY.fullmatch(key):
            raise ValueError(f"not a store key: {key!r}")
        staging = Path(tempfile.mkdtemp(dir=self.root / ".staging"))
        try:
            start = time.perf_counter()
            paths = self.paths(key)
            stem = paths["glb"].stem
            (staging / paths["glb"].name).write_bytes(encode_mesh(mesh, "glb", stem, texture)[f"{stem}.glb"])
            Image.fromarray(preview).save(staging / paths["preview"].name)
            (staging / paths["source"].name).write_bytes(source_bytes(mesh, texture))
            record = {**record, "timings": {**record.get("timings", {}), "export": time.perf_counter() - start}}
            staging.chmod(0o755)
            for path in staging.iterdir():
                path.chmod(0o644)
            with self._lock:
                folder = self.root / "files" / key
                shutil.rmtree(folder, ignore_errors=True)  # a stale or incomplete entry
                os.replace(staging, folder)
                try:
                    write_atomic(self.root / "records" / f"{key}.json",
                                 json.dumps(record, indent=1, ensure_ascii=False).encode("utf-8"))
                except BaseException:
                    shutil.rmtree(folder, ignore_errors=True)  # files without their record: no entry
                    raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return Entry(key, self.paths(key), record, fresh=True)

    def _recover(self) -> None:
        """Removes what a writer killed mid-way left: staging folders, partial atomic writes
        (``.*.tmp``), result folders without their record or files, records without their folder."""
        with self._lock:
            for child in (self.root / ".staging").iterdir():
                shutil.rmtree(child, ignore_errors=True)
            folders = [self.root / name for name in ("files", "records", "thumbs")]
            folders += [p for p in (self.root / "files").iterdir() if p.is_dir()]
            for folder in folders:
                for partial in folder.glob(".*.tmp"):
                    partial.unlink(missing_ok=True)
            for folder in (self.root / "files").iterdir():
                key = folder.name
                if folder.is_dir() and _KEY.fullmatch(key) and not (
                        (self.root / "records" / f"{key}.json").is_file() and self._complete(key)):
                    shutil.rmtree(folder, ignore_errors=True)
            for record in (self.root / "records").glob("*.json"):
                if _KEY.fullmatch(record.stem) and not (self.root / "files" / record.stem).is_dir():
                    record.unlink(missing_ok=True)

    def pending_glb(self, key: str, mesh) -> Path:
        """A vertex-coloured GLB shown while the texture bakes (``files/<key>.pending/``, removed
        by ``enforce_limits`` ten minutes later: a browser may still be fetching it when the
        texture is done)."""
        folder = self.root / "files" / f"{key}.pending"
        folder.mkdir(exist_ok=True)
        path = folder / f"triplaneturbo-{key[:12]}-preview.glb"
        write_atomic(path, encode_mesh(mesh, "glb", path.stem)[f"{path.stem}.glb"])
        return path

    def thumbnail(self, jpeg: bytes) -> Path:
        """A history thumbnail written (once) under ``thumbs/``, named by its content; the
        thumbnails' own budget is enforced at once (oldest first), so no number of them can grow
        past it."""
        path = self.root / "thumbs" / f"{hashlib.sha256(jpeg).hexdigest()[:32]}.jpg"
        if path.exists():
            os.utime(path)
            return path
        write_atomic(path, jpeg)
        with self._lock:
            thumbs = sorted(self._thumbs())
            total, count = sum(size for _, size, _ in thumbs), len(thumbs)
            for _, size, thumb in thumbs:  # oldest first
                if total <= self.thumb_bytes and count <= MAX_THUMBS:
                    break
                if thumb != path:  # never the one just written
                    thumb.unlink(missing_ok=True)
                    total, count = total - size, count - 1
        return path

    def _thumbs(self) -> list[tuple[float, int, Path]]:
        found = []
        for thumb in (self.root / "thumbs").iterdir():
            try:
                stat = thumb.stat()
            except FileNotFoundError:  # removed meanwhile
                continue
            found.append((stat.st_mtime, stat.st_size, thumb))
        return found

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes, folder) of every result folder (entries and pending GLBs), oldest first."""
        found = []
        for child in (self.root / "files").iterdir():
            if not child.is_dir() or not _KEY.fullmatch(child.name.removesuffix(".pending")):
                continue
            try:
                size = sum(f.stat().st_size for f in child.iterdir() if f.is_file())
                found.append((child.stat().st_mtime, size, child))
            except OSError:  # removed meanwhile
                continue
        return sorted(found)

    def enforce_limits(self, keep: str | set[str] | None = None) -> list[str]:
        """Deletes entries older than ``max_age_s``, then the oldest while the results and the
        thumbnails' budget together exceed ``max_bytes``; thumbnails older than ``max_age_s`` too.

        ``keep`` (the entries just written or served) is never deleted. Returns the deleted keys.
        Files that other requests remove meanwhile are simply skipped.
        """
        keep = {keep} if isinstance(keep, str) else set(keep or ())
        now, removed = time.time(), []
        with self._lock:
            for child in (self.root / ".staging").iterdir():
                if now - _mtime(child, now) > 3600:  # left behind by a crash
                    shutil.rmtree(child, ignore_errors=True)
            entries = self.entries()
            total = sum(size for _, size, _ in entries)
            budget = self.max_bytes - self.thumb_bytes
            for mtime, size, child in entries:
                key = child.name.removesuffix(".pending")
                pending_done = child.name.endswith(".pending") and now - mtime > 600
                if key not in keep and (now - mtime > self.max_age_s or total > budget or pending_done):
                    shutil.rmtree(child, ignore_errors=True)
                    if not child.name.endswith(".pending"):
                        (self.root / "records" / f"{key}.json").unlink(missing_ok=True)
                        removed.append(key)
                    total -= size
            for mtime, _, thumb in self._thumbs():
                if now - mtime > self.max_age_s:
                    thumb.unlink(missing_ok=True)
            for record in (self.root / "records").iterdir():  # records whose files are gone
                if _KEY.fullmatch(record.stem) and not (self.root / "files" / record.stem).exists() \
                        and now - _mtime(record, now) > 60:
                    record.unlink(missing_ok=True)
        return removed


def _stem(key: str) -> str:
    """The start of an entry's file names."""
    return f"triplaneturbo-{key[:12]}"


def _mtime(path: Path, default: float) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return default


def _empty_glb() -> bytes:
    """A GLB that draws nothing (one zero-area triangle): the viewer's first value, so that its 3D
    canvas is set up when the page loads. (Gradio 6.31's Model3D loses its renderer when the first
    mesh it gets is sent twice in quick succession, as a one-step streaming event does.)"""
    import numpy as np
    import trimesh
    from trimesh.exchange.gltf import export_glb

    return export_glb(trimesh.Trimesh(np.zeros((3, 3)), [[0, 1, 2]], process=False))


__all__ = ["DISK_FULL", "DOWNLOADS", "Entry", "MARKER", "OutputFolderError", "ResultStore"]
