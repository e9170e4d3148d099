"""The operator's view: one log line per request, on the logger ``triplane_turbo.requests`` (INFO).

    request event=generate outcome=made visitor=db4d7fd1ee queue_wait_s=8.36 total_s=1.08 results=1 made=1
        size_bytes=4771551 faces=38956 resolution=128 stages_s=text:0.004,denoise:0.299,...,export:0.216

``event``: generate, example, variants, pick (a variant's preview), history (a history entry), and the MCP
tools' mcp-generate and mcp-variants.
``outcome``: stored (answered from the store), made (at least one result made now), failed (with
``error=`` the exception's type), cancelled (the visitor left while it ran), refused (``reason=``
share: the visitor already has its share waiting; busy: the queue is full) or invalid (``field=``).
``visitor`` is a keyed hash of the visitor's address (``admission.VisitorHasher``), never the address;
``queue_wait_s`` the time in Gradio's queue (0 for a result answered before queueing, ``-`` if not
known) and ``total_s`` the handler's own time (neither on refused or invalid lines); ``stages_s``
the records' seconds per stage (for variants the batch's, the texture summed over its results; for
a stored result, what it took when it was made);
``size_bytes`` what its results occupy on disk. No prompt, no seed: those stay in the
store's records.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

logger = logging.getLogger("triplane_turbo.requests")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def entry_bytes(entry) -> int:
    """Bytes the files of a stored result occupy (those written so far)."""
    total = 0
    for path in entry.files.values():
        try:
            total += path.stat().st_size
        except OSError:
            pass
    return total


def stage_seconds(entries) -> dict[str, float]:
    """Seconds per stage of a request's results: the networks' stages are shared by a batch (each
    record repeats them), the texture is baked per result (summed)."""
    stages: dict[str, float] = {}
    for entry in entries:
        for stage, seconds in entry.record.get("timings", {}).items():
            before = stages.get(stage, 0.0)
            stages[stage] = before + seconds if stage == "texture" else max(before, seconds)
    return stages


@dataclass
class RequestLine:
    """What one request did, filled in as it runs; ``write`` logs it once."""

    event: str
    visitor: str  # already hashed
    started: float = field(default_factory=time.perf_counter)
    queue_wait: float | None = None
    entries: list = field(default_factory=list)
    written: bool = False

    def write(self, outcome: str, **details) -> None:
        if self.written:
            return
        self.written = True
        made = sum(bool(getattr(e, "fresh", False)) for e in self.entries)
        if outcome == "done":
            outcome = "made" if made else "stored"
        fields = {"event": self.event, "outcome": outcome, "visitor": self.visitor}
        if outcome not in ("refused", "invalid"):  # those are answered before queueing, at once
            fields.update(queue_wait_s=_seconds(self.queue_wait), total_s=_seconds(time.perf_counter() - self.started))
        if self.entries:
            stages = stage_seconds(self.entries)
            fields.update(results=len(self.entries), made=made, size_bytes=sum(map(entry_bytes, self.entries)),
                          faces=sum(e.record.get("faces", 0) for e in self.entries),
                          resolution=self.entries[0].record.get("mesh_resolution", "-"),
                          stages_s=",".join(f"{k}:{v:.3f}" for k, v in stages.items()) or "-")
        fields.update(details)
        logger.info("request %s", " ".join(f"{k}={v}" for k, v in fields.items()))


__all__ = ["RequestLine", "entry_bytes", "logger", "stage_seconds"]
