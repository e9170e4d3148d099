"""Who may wait for the GPU: a bound on the queue as a whole and on each visitor's share of it.

The app's GPU events queue in Gradio (one concurrency group, ``GPU_GROUP``). Before an event is
queued its validator asks ``GpuAdmission.admit``; when its handler starts it calls ``started``.
Between the two the request is *pending*. Requests let in that never start (the visitor left while
queued, or the result turned up stored before queueing) would hold their place forever, so the
counts are resynchronised with what Gradio's queue really holds: never more than the events
waiting there plus those let in during the last ``ADMISSION_WINDOW`` seconds (a validator runs a
moment before Gradio appends its event).

A *visitor* is the client address the server reports for a request (``visitor_of``). uvicorn
rewrites it from ``X-Forwarded-For`` when the connection comes from a proxy it trusts (its
``FORWARDED_ALLOW_IPS``: loopback by default; ``trust_space_proxy`` adds the private networks a
Hugging Face Space's proxy connects from). No Gradio import here: Gradio's queue is read through
the Blocks it is given (``demo``), defensively, as its bookkeeping is not public API.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import secrets
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass

#: The concurrency group of every event that may run the networks.
GPU_GROUP = "gpu"
#: Networks a Space's own proxies connect from (private addresses; the visitor's is the last public
#: address in ``X-Forwarded-For``, the one the Hub's edge appended).
PRIVATE_NETWORKS = "127.0.0.1,::1,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7"


def visitor_of(request, session_hash: str | None = None) -> str | None:
    """Who sent ``request`` (a ``gr.Request`` or a Starlette request): the client's address as the
    server reports it (an IPv6 address as its /64, the block one subscriber gets), else the
    session; None when neither is known (a call from code, outside Gradio)."""
    try:
        host = request.client.host
    except Exception:  # noqa: BLE001 - no request, no client (a test client), a Gradio-less call
        host = None
    if host:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return str(host)
        if address.version == 4:
            return str(address)
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return session_hash or getattr(request, "session_hash", None) or None


class VisitorHasher:
    """Short keyed hashes of visitors for the logs: the same visitor gets the same hash for as long
    as the server runs, and the address cannot be recovered from it (the key is random per process,
    so not even by trying all 2^32 IPv4 addresses)."""

    def __init__(self, key: bytes | None = None):
        self._key = key or secrets.token_bytes(16)

    def __call__(self, visitor: str | None) -> str:
        if not visitor:
            return "-"
        return hashlib.blake2s(visitor.encode(), key=self._key, digest_size=5).hexdigest()


def trust_space_proxy(environ=os.environ) -> bool:
    """On a Hugging Face Space (``SYSTEM=spaces`` and ``SPACE_ID``, as Gradio's ``get_space`` reads them),
    unless the operator set ``FORWARDED_ALLOW_IPS``:
    trust ``X-Forwarded-For`` from private addresses, where the Space's proxy connects from (without
    it, every visitor has the proxy's address and shares one visitor's quota). Must run before the
    server starts (uvicorn reads the variable then). Returns whether it changed anything."""
    if environ.get("SYSTEM") != "spaces" or not environ.get("SPACE_ID") or "FORWARDED_ALLOW_IPS" in environ:
        return False
    environ["FORWARDED_ALLOW_IPS"] = PRIVATE_NETWORKS
    return True


@dataclass(frozen=True)
class Refusal:
    """Why a request may not wait for the GPU now: ``reason`` "share" (its visitor already has the most
    requests waiting that one visitor may have) or "busy" (the queue is full); ``message`` for the visitor."""

    reason: str
    message: str


class GpuAdmission:
    """Counts the requests waiting for the GPU, in all and per visitor, and lets a new one in or not.

    Args:
        max_queue: requests that may wait for the GPU in all.
        max_per_visitor: requests of one visitor that may wait at a time (its running one aside).
    """

    #: Seconds within which a request let in may not show in Gradio's queue yet (a validator runs a
    #: moment before Gradio appends the event; on a loaded server, more than a moment). Also how long
    #: the place of a request that never shows there (its visitor left at once) is held at most.
    ADMISSION_WINDOW = 10.0

    def __init__(self, max_queue: int = 64, max_per_visitor: int = 2):
        self.max_queue, self.max_per_visitor = max_queue, max_per_visitor
        self.demo = None  # the Blocks whose queue holds the GPU events (set once built)
        self._pending = 0  # let in, not started yet
        self._pending_by: Counter[str] = Counter()  # the same per visitor (no zero entries are kept)
        self._admitted: deque[tuple[float, str | None]] = deque()  # when the recent ones were let in, and whose
        self._lock = threading.Lock()

    # -- Gradio's queue ------------------------------------------------------------------------------
    def _gradio_queue(self):
        return getattr(self.demo, "_queue", None)

    def waiting_events(self) -> list:
        """The events waiting in the GPU group of Gradio's queue (not the running one)."""
        per_group = getattr(self._gradio_queue(), "event_queue_per_concurrency_id", {})
        waiting = per_group.get(GPU_GROUP)
        return list(waiting.queue) if waiting is not None else []

    def backlog(self) -> int:
        return len(self.waiting_events())

    def backlog_by_visitor(self) -> Counter:
        return Counter(visitor_of(getattr(e, "request", None), getattr(e, "session_hash", None))
                       for e in self.waiting_events())

    def waiting(self, visitor: str | None = None) -> int:
        """Requests waiting for the GPU (of ``visitor``, if given): those let in and not started yet
        (validators run before Gradio appends an event, so a burst is counted as it arrives), and
        never fewer than Gradio's queue holds."""
        if visitor is None:
            return max(self.backlog(), self._pending)
        return max(self.backlog_by_visitor()[visitor], self._pending_by[visitor])

    def queue_wait(self) -> float | None:
        """Seconds the event being handled now waited in Gradio's queue; None if unknown."""
        try:
            from gradio.context import LocalContext

            event = self._gradio_queue().event_ids_to_events.get(LocalContext.event_id.get(None))
            return max(0.0, time.monotonic() - event.enqueue_time)
        except Exception:  # noqa: BLE001 - no queue (a direct call), or Gradio's bookkeeping changed
            return None

    # -- admission ----------------------------------------------------------------------------------
    def admit(self, visitor: str | None) -> Refusal | None:
        """None if a (not stored) request of ``visitor`` may wait for the GPU, and it is counted as
        waiting until ``started``; else why not. ``visitor`` None (unknown): bounded in all only."""
        with self._lock:
            self._resynchronise()
            if (waiting := self.waiting()) >= self.max_queue:  # first: a full queue refuses everyone alike
                return Refusal("busy", (
                    f"The server is busy: {waiting} requests are waiting for the GPU. Please try again in a minute "
                    "(stored results, such as shared links, are still answered at once)."))
            if visitor is not None and (mine := self.waiting(visitor)) >= self.max_per_visitor:
                return Refusal("share", (
                    f"You already have {mine} request{'s' * (mine != 1)} waiting for the GPU, the most one visitor "
                    f"may have waiting at a time ({self.max_per_visitor}). Please wait for "
                    f"{'them' if mine != 1 else 'it'} to finish, then try again (stored results, such as shared "
                    "links, are still answered at once)."))
            self._pending += 1
            if visitor is not None:
                self._pending_by[visitor] += 1
            self._admitted.append((time.monotonic(), visitor))
            return None

    def started(self, visitor: str | None) -> None:
        """A GPU event's handler begins: one request of ``visitor`` fewer waits."""
        with self._lock:
            self._pending = max(0, self._pending - 1)
            if visitor is not None and self._pending_by[visitor] > 0:
                self._pending_by[visitor] -= 1
            self._resynchronise()

    def _resynchronise(self) -> None:
        """Drops requests let in that never started (see the module's docstring): the counts can never
        exceed Gradio's queue plus what was let in just now, in all and per visitor."""
        now = time.monotonic()
        while self._admitted and now - self._admitted[0][0] > self.ADMISSION_WINDOW:
            self._admitted.popleft()
        self._pending = min(self._pending, self.backlog() + len(self._admitted))
        if self._pending_by:
            bound = self.backlog_by_visitor() + Counter(visitor for _, visitor in self._admitted)
            for visitor in list(self._pending_by):
                self._pending_by[visitor] = min(self._pending_by[visitor], bound[visitor])
            self._pending_by = +self._pending_by  # no zero entries: bounded by the requests waiting


__all__ = ["GPU_GROUP", "GpuAdmission", "Refusal", "VisitorHasher", "trust_space_proxy", "visitor_of"]
