"""What a batch reads and writes besides meshes: the prompt file's lines, the file names, and the
manifest of records (one JSON line per prompt line), kept per process and merged.

* One mesh per non-blank line, named ``<line>-<hash>.<format>`` (the hash covers prompt, seed and
  settings; the prompt never becomes a file name). Line n uses seed ``S + n − 1``, so a line's result
  does not depend on batching or on how the file is split.
* Each process appends one JSON record per line it processed to ``manifest.rank<r>.jsonl`` (a single
  ``write`` of a whole line, flushed to disk): processes never share a file, and a kill loses at most
  the line being written, which the next run repairs. The main process merges them into
  ``manifest.jsonl``, sorted by line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import MAX_SEED
from .inputs import MAX_PROMPT_CHARS, clean_text

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"


@dataclass(frozen=True)
class BatchSettings:
    """What decides every mesh of a batch besides its prompt and seed (origin, scale, print_size: the
    export's placement, ``frames.Placement``)."""

    mesh_resolution: int = 160
    file_format: str = "glb"
    texture: str = "uv"
    texture_size: int = 1024
    target_faces: int | None = None
    unwrap: str = "fast"
    origin: str | None = None
    scale: float = 1.0
    print_size: float = 100.0


#: The placement fields, and their defaults: left out of records and file names while they have them,
#: so a batch started before they existed resumes with the same names.
_PLACEMENT_DEFAULTS = {"origin": None, "scale": 1.0, "print_size": 100.0}


def settings_record(settings: BatchSettings) -> dict:
    """``settings`` as the manifest records it (and file names hash it): every field, less the
    placement fields that have their defaults."""
    return {key: value for key, value in asdict(settings).items()
            if key not in _PLACEMENT_DEFAULTS or value != _PLACEMENT_DEFAULTS[key]}


@dataclass
class PromptLine:
    """One non-blank line of the prompt file: its 1-based number, the cleaned prompt, and why it
    cannot be generated (None if it can)."""

    line: int
    prompt: str
    error: str | None = None


def prompt_line(number: int, raw: str) -> PromptLine:
    """One prompt as a batch line: cleaned (control characters removed, whitespace collapsed), or
    with the reason it cannot be generated (over ``MAX_PROMPT_CHARS``, or nothing left)."""
    prompt, _ = clean_text(raw)
    if len(raw) > MAX_PROMPT_CHARS:
        return PromptLine(number, prompt[:80] + "…", f"the prompt is {len(raw)} characters long; the limit is "
                                                     f"{MAX_PROMPT_CHARS}")
    if not prompt:
        return PromptLine(number, "", "the prompt is empty once control characters are removed")
    return PromptLine(number, prompt)


def read_prompts(path: str | os.PathLike) -> list[PromptLine]:
    """The prompt file's non-blank lines (UTF-8; undecodable bytes are replaced)."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return [prompt_line(number, raw) for number, raw in enumerate(text.splitlines(), start=1) if raw.strip()]


def line_seed(base_seed: int, line: int) -> int:
    return (base_seed + line - 1) % (MAX_SEED + 1)


def output_name(line: int, prompt: str, seed: int, settings: BatchSettings) -> str:
    """``000042-<10 hex>.<format>``: the line number, and a hash of what made the mesh."""
    made_by = json.dumps([prompt, seed, settings_record(settings)], sort_keys=True)
    digest = hashlib.sha256(made_by.encode()).hexdigest()[:10]
    return f"{line:06d}-{digest}.{settings.file_format}"


# -------------------------------------------------------------------------------------------------
# The manifest
# -------------------------------------------------------------------------------------------------

class RankManifest:
    """The records one process appends (``manifest.rank<r>.jsonl``)."""

    def __init__(self, out_dir: Path, rank: int):
        self.path = out_dir / f"manifest.rank{rank}.jsonl"
        self.repair()

    def repair(self) -> None:
        """Drops a torn last line (a kill in the middle of a write)."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1 if not data.endswith(b"\n") else len(data)
        lines = data[:keep].split(b"\n")
        if keep != len(data) or any(line and not _valid_json(line) for line in lines):
            good = b"".join(line + b"\n" for line in lines if line and _valid_json(line))
            tmp = self.path.with_suffix(".tmp")
            tmp.write_bytes(good)
            os.replace(tmp, self.path)
            logger.warning("%s: dropped %d bytes of a record cut short", self.path.name, len(data) - len(good))

    def append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write of a whole line: appended atomically
            os.fsync(fd)
        finally:
            os.close(fd)


def _valid_json(line: bytes) -> bool:
    try:
        json.loads(line)
        return True
    except ValueError:
        return False


def read_records(out_dir: Path, settings: BatchSettings | None = None) -> dict[int, dict]:
    """The record that counts for every line, from the merged manifest and every process's file.

    An ``ok`` record made with ``settings`` beats any other ``ok`` record, which beats an error;
    among equals the later one wins (the merged manifest is read first, then the process files).
    """
    wanted = settings_record(settings) if settings is not None else None

    def rank(record: dict) -> int:
        ok = record.get("status") == "ok"
        return 2 * ok + (ok and wanted is not None and record.get("settings") == wanted)

    records: dict[int, dict] = {}
    for path in [out_dir / MANIFEST] + sorted(out_dir.glob("manifest.rank*.jsonl")):
        if not path.exists():
            continue
        for raw in path.read_bytes().split(b"\n"):
            if not raw.strip() or not _valid_json(raw):
                continue
            record = json.loads(raw)
            old = records.get(record.get("line"))
            if old is None or rank(record) >= rank(old):
                records[record["line"]] = record
    return records


def merge_manifest(out_dir: Path, settings: BatchSettings | None = None) -> Path:
    """``manifest.jsonl``: one record per processed line, sorted by line (written atomically)."""
    records = read_records(out_dir, settings)
    path = out_dir / MANIFEST
    tmp = out_dir / f".{MANIFEST}.tmp"
    tmp.write_text("".join(json.dumps(records[line], ensure_ascii=False) + "\n" for line in sorted(records)),
                   encoding="utf-8")
    os.replace(tmp, path)
    return path


def pending_lines(lines: list[PromptLine], out_dir: Path, base_seed: int, settings: BatchSettings) -> list[PromptLine]:
    """Lines without an ``ok`` record for these settings whose file exists."""
    records = read_records(out_dir, settings)
    todo = []
    for item in lines:
        record = records.get(item.line)
        expected = output_name(item.line, item.prompt, line_seed(base_seed, item.line), settings)
        if record and record.get("status") == "ok" and record.get("file") == expected \
                and (out_dir / expected).is_file():
            continue
        todo.append(item)
    return todo



def make_record(item: PromptLine, base_seed: int, settings: BatchSettings, rank: int, *, file: str | None = None,
            error: str | None = None, seconds: float | None = None, **extra) -> dict:
    seed = line_seed(base_seed, item.line)
    return {"line": item.line, "prompt": item.prompt, "seed": seed,
            "file": file if error is None else None, "status": "ok" if error is None else "error", "error": error,
            "rank": rank, "seconds": None if seconds is None else round(seconds, 4),
            "settings": settings_record(settings), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}


__all__ = ["MANIFEST", "BatchSettings", "PromptLine", "RankManifest", "line_seed", "make_record", "merge_manifest",
           "output_name", "pending_lines", "prompt_line", "read_prompts", "read_records", "settings_record"]
