"""The model behind the app: loading it once (in the background, or up front on ZeroGPU), where it
runs, and in which dtype.

``ModelLoader`` gets the weights in two phases, once:

1. *fetch*: find or download the files (``hub.resolve``) — this alone fixes the weights' revision,
   which is all a stored result needs;
2. *build*: load them onto the target device in the target dtype.

The request that needs the model waits for the phase it needs (with a progress line, the download's
bytes where there are some) instead of failing while the model loads; a failure becomes one clear
message for every later request. A fetch that fails in a way that may pass (the Hub unreachable or
answering 5xx/429) is tried again with growing pauses (``RetryPolicy``); meanwhile the page's status
line and every request say what failed and when the next try is. ``make_loader`` picks the weights,
the device and the dtype, with ZeroGPU's rules (``spaces``: build at start-up on the main thread,
``.to("cuda")`` before launch).
"""

from __future__ import annotations

import copy
import errno
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..devices import default_dtype

logger = logging.getLogger(__name__)

#: ZeroGPU's time budget per call, by mesh resolution (seconds); shorter budgets queue first there.
GPU_SECONDS = {128: 20, 160: 25, 256: 40, 384: 60}


class ModelNotReadyError(RuntimeError):
    """The weights could not be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class RetryPolicy:
    """Pauses between tries of a failed fetch: ``first_delay_s``, doubled each time up to
    ``max_delay_s``; after ``tries`` failed tries the loader gives up (about 20 minutes by default)."""

    first_delay_s: float = 5.0
    max_delay_s: float = 300.0
    tries: int = 10

    def delay(self, failures: int) -> float | None:
        """Seconds to wait after the ``failures``-th failed try, or None to give up."""
        if failures >= self.tries:
            return None
        return min(self.first_delay_s * 2 ** (failures - 1), self.max_delay_s)


def may_pass(exc: BaseException) -> bool:
    """Whether trying a failed fetch again may succeed: not when the cause needs someone to act (the
    repository or file does not exist, access is refused, HF_HUB_OFFLINE is set, the disk is full)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RemoteEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    permanent = (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError,
                 OfflineModeIsEnabled, ValueError)  # ValueError: e.g. an incompatible base model
    seen, cause = set(), exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        status = getattr(getattr(cause, "response", None), "status_code", None)
        if (isinstance(cause, permanent) or (isinstance(cause, HfHubHTTPError) and status in (400, 401, 403, 404))
                or (isinstance(cause, LocalEntryNotFoundError) and constants.HF_HUB_OFFLINE)
                or (isinstance(cause, OSError) and cause.errno == errno.ENOSPC)):
            return False
        cause = cause.__cause__ or cause.__context__
    return True


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
        retry: when to try a failed fetch again (``may_pass`` says which failures are tried again).
        sleep: waits between tries (tests pass their own).
    """

    def __init__(self, fetch: Callable[[type], str], build: Callable[[], object], *, device: str, dtype: str,
                 background: bool = True, describe: str = "Loading the model…", retry: RetryPolicy = RetryPolicy(),
                 sleep: Callable[[float], None] = time.sleep):
        self.device, self.dtype, self.describe = device, dtype, describe
        self.pipe = self.revision = self.error = None
        self._fetch, self._build = fetch, build
        self.retry, self._sleep = retry, sleep
        self.failures, self._next_try = 0, 0.0  # failed fetches so far; when the next one starts (monotonic)
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

    def _fetch_with_retries(self) -> str:
        """The weights' revision, fetched; a failure that may pass is tried again after a pause."""
        while True:
            self.phase = "fetching"
            try:
                return self._fetch(self._bars.tqdm_class())
            except Exception as exc:
                self.failures += 1
                if not may_pass(exc):
                    raise
                if (delay := self.retry.delay(self.failures)) is None:
                    raise ModelNotReadyError(
                        f"{exc} (gave up after {self.failures} tries; restart the app to try again: on a Space, "
                        "“Restart this Space” in its settings)") from exc
                logger.warning("getting the weights failed (try %d of %d), trying again in %.0f s: %s",
                               self.failures, self.retry.tries, delay, exc)
                self.error, self._next_try, self.phase = exc, time.monotonic() + delay, "retrying"
            self._sleep(delay)

    def _load(self) -> None:
        try:
            self.revision = self._fetch_with_retries()
            self.error = None
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

    def _retrying(self) -> str:
        seconds = max(0.0, self._next_try - time.monotonic())
        return (f"getting the weights failed (try {self.failures} of {self.retry.tries}): {self.error} The app tries "
                f"again in {seconds:.0f} s.")

    def _wait(self, event: threading.Event, report: Callable[[str], None] | None, poll: float = 0.5) -> None:
        """Until ``event``; a request waiting while a failed fetch waits for its next try is told so."""
        while not event.is_set():
            if self.phase == "retrying":
                raise ModelNotReadyError(f"The model is not ready: {self._retrying()} Please try again in a minute.")
            if not event.wait(poll) and report:
                report(self.progress_line())

    def known_revision(self) -> str | None:
        """The weights' revision if the fetch phase has finished, else None (never waits)."""
        return self.revision if self._fetched.is_set() else None

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
        if self.phase == "failed":
            return f"**The model could not be loaded.** {self.error}"
        if self.ready():
            return f"Model ready (weights `{self.pipe.revision}`, {self.device}, {self.dtype})."
        if self.phase == "retrying":
            return f"**The model is not ready:** {self._retrying()} Requests made meanwhile are told so."
        detail = self._bars.describe() if self.phase == "fetching" else None
        if self.failures and self.phase == "fetching":
            detail = f"try {self.failures + 1} of {self.retry.tries}" + (f", {detail}" if detail else "")
        return self.describe + (f" ({detail})" if detail else "") + " Requests made meanwhile wait for it."


# -------------------------------------------------------------------------------------------------
# Which device, which dtype, which weights
# -------------------------------------------------------------------------------------------------

def pick_device(requested: str | None, zero_gpu: bool = False) -> str:
    """The device the app runs on: as asked, else CUDA (ZeroGPU included), else Apple's MPS, else the CPU."""
    if requested:
        return requested
    if zero_gpu or torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def speed_note(tiny: bool, device: str) -> str:
    """What a generation costs on ``device``, for the page."""
    if device.startswith(("cuda", "mps")):
        return "Running on a GPU: a generation takes about a second (plus any wait in the queue)."
    if tiny:
        return "Running on CPU: about 1–3 s per model (the tiny demo model)."
    return ("Running on CPU: one model takes a minute or two here (about a second on a GPU). Progress is shown "
            "while it works.")


def gpu_seconds(prompts, seeds, resolution, *args, **kwargs) -> int:
    """ZeroGPU's time budget for one call of the networks: by resolution, a little more per extra object."""
    return int(GPU_SECONDS.get(resolution, 60) * (1 + 0.25 * (len(prompts) - 1)))


def make_loader(tiny: bool, device: str, zero_gpu: bool = False):
    """The loader for the chosen weights on ``device``, and (on ZeroGPU) the CPU copy of the heads
    that textures are baked with outside the GPU function.

    On ZeroGPU everything happens now, on this (the main) thread, before ``launch()``: the networks
    in float16, placed on ``device`` ("cuda", which ``spaces`` emulates here and streams to each GPU
    worker). Elsewhere the loader works in a background thread and the page comes up at once.
    """
    dtype = torch.float16 if zero_gpu else default_dtype(device)
    dtype_name = str(dtype).removeprefix("torch.")
    if tiny:
        from ..tiny import tiny_pipeline

        fetch, build = (lambda _: "tiny"), (lambda: tiny_pipeline(dtype=dtype))
        describe = "Building the tiny offline model…"
    else:
        from .. import TriplaneTurboPipeline, WeightSources, hub

        sources = WeightSources.resolve()
        fetched = {}

        def fetch(tqdm_class) -> str:
            fetched["weights"] = hub.resolve(sources.base_model, sources.adapter, sources.adapter_filename,
                                             variant="fp16" if dtype == torch.float16 else None, tqdm_class=tqdm_class)
            return fetched["weights"].revision

        def build():
            return TriplaneTurboPipeline.from_resolved(fetched["weights"], dtype=dtype)

        describe = ("Loading the model… The first start downloads about 2.7 GB (float16) or 5.3 GB (float32) from the "
                    "Hugging Face Hub (Stable Diffusion 2.1-base and the TriplaneTurbo adapter); later starts use the "
                    "cache.")
    if not zero_gpu:
        return ModelLoader(fetch, lambda: build().to(device), device=device, dtype=dtype_name, describe=describe), None
    baking = {}

    def build_for_zero_gpu():
        pipe = build()
        baking["fields"] = copy.deepcopy(pipe.fields)  # stays on the CPU
        return pipe.to(device)

    loader = ModelLoader(fetch, build_for_zero_gpu, device=device, dtype=dtype_name, background=False,
                         describe=describe)
    return loader, baking.get("fields")


__all__ = ["GPU_SECONDS", "ModelLoader", "ModelNotReadyError", "RetryPolicy", "gpu_seconds", "make_loader", "may_pass",
           "pick_device", "speed_note"]
