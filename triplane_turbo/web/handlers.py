"""The Gradio handlers: requests in, component values out; with ``tools`` (the MCP tools) and ``downloads``
(the download links and their route), the only Gradio in ``web``.

How requests flow through Gradio's own queue (``app.py`` wires it):

* Every event that may need the GPU (generate, variants, opening a variant or a history entry, an
  example) is in one concurrency group, ``GPU_GROUP``, with ``concurrency_limit=1``: Gradio queues
  them, shows each visitor its real position, and no worker thread sleeps on a lock.
* Before queueing, Gradio runs the event's **validator** (bad inputs are answered at once, and a
  request that is not stored is let in only while fewer than ``max_queue`` requests in all, and
  fewer than ``max_waiting_per_client`` of its visitor's, wait for the GPU: ``admission``), then
  asks the handler whether the answer is already stored (``answers_from_store``: the protocol of
  ``gr.cache``, whose hits bypass the queue). A stored result — a shared link, a history click, an
  example — is therefore answered at once even while a crowd waits for the GPU.
* Every request ends in one line on the ``triplane_turbo.requests`` logger (``requestlog``).
"""

from __future__ import annotations

import base64
import logging
import time
from contextlib import contextmanager
from urllib.parse import urlsplit

import gradio as gr
from gradio.caching import CacheMissError

from .admission import GPU_GROUP, GpuAdmission, VisitorHasher, visitor_of
from .models import ModelNotReadyError
from .requestlog import RequestLine
from .service import FirstLook, GenerationError, GenerationService, Stored
from .settings import (DEFAULT_FACES, DEFAULT_RESOLUTION, EXAMPLE_SEED, HISTORY_SIZE, InputError, Settings,
                       inputs_from_link, settings_from_entry, settings_from_inputs, texture_label, variant_settings)
from .downloads import DownloadLink, download_url
from .store import DOWNLOADS, Entry
from .thumbnails import checked_thumbnail, read_image, thumbnail_jpeg

logger = logging.getLogger("triplane_turbo.app")

GENERATE_PARAMETERS = ["prompt", "seed", "randomize_seed", "mesh_resolution", "remove_floaters", "simplify",
                       "target_faces", "texture"]
VARIANT_PARAMETERS = ["prompt", "seed", "count", "mesh_resolution"]


def probing() -> bool:
    """Whether Gradio is asking, before queueing, if the answer is already stored. (Gradio 6.31's
    ``gr.cache`` protocol: a handler with a ``cache`` attribute is called once in probe mode at push
    time and raises ``CacheMissError`` to be queued instead; the flag is private to
    ``gradio.caching``, hence the guard: without it every request is simply queued.)"""
    import gradio.caching

    flag = getattr(gradio.caching, "_probe_mode_active", None)
    return bool(flag is not None and flag.get())


def answers_from_store(handler):
    """Marks a handler that answers stored results without queueing (see ``probing``)."""
    handler.cache = True
    return handler


@contextmanager
def user_errors(probe: bool):
    """Service and input errors -> ``gr.Error`` with their message; anything unexpected -> a generic
    one (the log keeps the details). While probing, every failure just means "queue it": an
    exception there would be an HTTP 500 instead of a message."""
    try:
        yield
    except CacheMissError:
        raise
    except Exception as exc:
        if probe:
            raise CacheMissError() from None
        if isinstance(exc, InputError):
            raise gr.Error(str(exc)) from None
        if isinstance(exc, ModelNotReadyError):
            raise gr.Error(str(exc), title="Model not available") from None
        if isinstance(exc, (GenerationError, gr.Error)):
            raise gr.Error(str(exc)) from None
        logger.exception("generation failed")
        raise gr.Error(f"Generation failed ({type(exc).__name__}); the server log has the details.") from exc


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


class Handlers:
    """Every event's handler; ``app.py`` lays out the page and wires them.

    Args:
        service: the generation service.
        max_queue: requests that may wait for the GPU; beyond it a new (not stored) request is
            answered "busy, try again" at once.
        max_waiting_per_client: requests of one visitor that may wait for the GPU at a time; beyond
            it the visitor is told so at once (``admission``).
    """

    def __init__(self, service: GenerationService, max_queue: int = 64, max_waiting_per_client: int = 2):
        self.service = service
        self.admission = GpuAdmission(max_queue, max_waiting_per_client)
        self.hash_visitor = VisitorHasher()

    @property
    def demo(self) -> gr.Blocks | None:
        """The Blocks whose queue holds the GPU events (set by app.py once built)."""
        return self.admission.demo

    @demo.setter
    def demo(self, blocks: gr.Blocks | None) -> None:
        self.admission.demo = blocks

    # -- the queue and the log -----------------------------------------------------------------------
    def _line(self, event: str, request) -> RequestLine:
        return RequestLine(event, self.hash_visitor(visitor_of(request)))

    def _busy(self, event: str, batch: list[Settings], request, storable: bool = True) -> str | None:
        """The answer for a request that may not wait for the GPU now (its visitor's share or the
        whole queue is full), else None (and it counts as waiting until its handler starts)."""
        if storable and all(self.service.stored(s) for s in batch):
            return None  # answered from the store, never queued
        refusal = self.admission.admit(visitor_of(request))
        if refusal is None:
            return None
        self._line(event, request).write("refused", reason=refusal.reason)
        return refusal.message

    @contextmanager
    def _logged(self, event: str, request, started: float, probe: bool):
        """A GPU event's handler: unless probing, it has begun (no longer waits for the GPU); its log
        line is written when the block ends however it ends (nothing when probing fails: the request
        is then queued, and logged when it runs)."""
        line = self._line(event, request)
        line.started = started
        if probe:
            line.queue_wait = 0.0  # answered before queueing, if at all
        else:
            self.admission.started(visitor_of(request))
            line.queue_wait = self.admission.queue_wait()
        try:
            yield line
        except GeneratorExit:
            line.write("cancelled")
            raise
        except Exception as exc:
            if not probe:  # while probing, any failure means "queue it" (see user_errors)
                line.write("failed", error=type(exc).__name__)
            raise
        line.write("done")

    def _invalid(self, event: str, request, fields: list[str], exc: InputError) -> list:
        self._line(event, request).write("invalid", field=exc.field)
        return self._verdict(fields, exc.field, str(exc))

    @staticmethod
    def _verdict(fields: list[str], failed: str | None = None, message: str = "") -> list:
        """One ``gr.validate`` per input: all valid, or ``failed`` with ``message``."""
        return [gr.validate(name != failed, message if name == failed else "") for name in fields]

    # -- validators: run before queueing --------------------------------------------------------------
    def validate_generate(self, prompt, seed, randomize_seed, mesh_resolution, remove_floaters=False,
                          simplify=False, target_faces=DEFAULT_FACES, texture="uv", request: gr.Request = None):
        try:
            settings, _ = settings_from_inputs(prompt, seed, randomize_seed, mesh_resolution, remove_floaters,
                                               simplify, target_faces, texture)
        except InputError as exc:
            return self._invalid("generate", request, GENERATE_PARAMETERS, exc)
        # a fresh random seed is never stored
        busy = self._busy("generate", [settings], request, storable=randomize_seed is not True)
        return self._verdict(GENERATE_PARAMETERS, "prompt" if busy else None, busy or "")

    def validate_variants(self, prompt, seed, count, mesh_resolution, request: gr.Request = None):
        try:
            batch, _ = variant_settings(prompt, seed, count, mesh_resolution)
        except InputError as exc:
            return self._invalid("variants", request, VARIANT_PARAMETERS, exc)
        busy = self._busy("variants", batch, request)
        return self._verdict(VARIANT_PARAMETERS, "prompt" if busy else None, busy or "")

    def validate_example(self, prompt, request: gr.Request = None):
        try:
            settings, _ = settings_from_inputs(prompt, EXAMPLE_SEED, False, DEFAULT_RESOLUTION)
        except InputError as exc:
            self._line("example", request).write("invalid", field=exc.field)
            return [gr.validate(False, str(exc))]
        busy = self._busy("example", [settings], request)
        return [gr.validate(busy is None, busy or "")]

    def validate_pick(self, entries, request: gr.Request = None):
        """A click on a variant or a history entry (which one is not known yet): let in when every
        entry of the list is stored or the GPU queue has room for the visitor."""
        batch = []
        for entry in entries if isinstance(entries, list) else history_entries(entries):
            try:
                batch.append(settings_from_entry(entry))
            except InputError:
                continue  # the handler says what is wrong with it
        event = "pick" if isinstance(entries, list) else "history"
        busy = self._busy(event, batch, request) if batch else None
        return [gr.validate(busy is None, busy or "")]

    # -- generate ------------------------------------------------------------------------------------
    @answers_from_store
    def generate(self, prompt, seed, randomize_seed, mesh_resolution, remove_floaters=False, simplify=False,
                 target_faces=DEFAULT_FACES, texture="uv", request: gr.Request = None, progress=gr.Progress()):
        """Text to a textured mesh: the GLB, the details, the seed used, the GLB/OBJ(zip)/PLY/STL files and a
        link that reproduces the result. A new mesh is shown first with vertex colours while its texture bakes."""
        started, probe = time.perf_counter(), probing()
        with user_errors(probe), self._logged("generate", request, started, probe) as line:
            settings, notes = settings_from_inputs(prompt, seed, randomize_seed, mesh_resolution, remove_floaters,
                                                   simplify, target_faces, texture)
            if not probe:
                for note in notes:
                    gr.Warning(note)
            yield from self._show(settings, request, progress, line, probe)

    @answers_from_store
    def generate_example(self, prompt, request: gr.Request = None, progress=gr.Progress()):
        """An example prompt with the example seed and the default settings (stored after its first time)."""
        started, probe = time.perf_counter(), probing()
        with user_errors(probe), self._logged("example", request, started, probe) as line:
            settings, _ = settings_from_inputs(prompt, EXAMPLE_SEED, False, DEFAULT_RESOLUTION)
            yield from self._show(settings, request, progress, line, probe)

    def _show(self, settings: Settings, request, progress, line: RequestLine, probe: bool):
        """generate()'s outputs for ``settings``: from the store at once, else made (first look, then the
        result). Called inside ``user_errors`` and ``_logged``."""
        if (entry := self.service.stored(settings)) is not None:
            line.entries.append(entry)
            yield self._outputs(entry, settings, request, True, line.started, warn=not probe)
            return
        if probe:
            raise CacheMissError()
        report = lambda fraction, desc: progress(fraction, desc=desc)  # noqa: E731
        for event in self.service.produce([settings], report, fail_on_empty=True):
            if isinstance(event, FirstLook):
                # The old downloads cleared, this mesh's link. Not gr.skip(): Gradio keeps a new component
                # in the session per skipped output (~7 kB each), so sessions grew with every mesh.
                yield (str(event.glb), {"prompt": settings.prompt, "seed": settings.seed,
                                        "status": "baking the texture…"}, settings.seed, *[None] * len(DOWNLOADS),
                       settings.share_link(page_url(request)), gr.skip())
            elif isinstance(event, Stored):
                line.entries.append(event.entry)
                yield self._outputs(event.entry, settings, request, not event.entry.fresh, line.started)

    def _outputs(self, entry: Entry, settings: Settings, request, cached: bool, started: float,
                 warn: bool = True) -> tuple:
        """generate()'s outputs for a stored entry: viewer, details, seed, downloads, link, history item.

        The GLB is a file; the other downloads are links that write their file on first request
        (``downloads``), also listed in the details."""
        record = entry.record
        if warn:
            for note in record.get("warnings", []):
                gr.Warning(note)
        page, files = page_url(request), entry.files
        info = {**record, "timings": {k: round(v, 3) for k, v in record["timings"].items()}, "cached": cached,
                "files": {kind: path.name for kind, path in files.items() if kind != "source"},
                "downloads": {fmt: download_url(page, entry.key, fmt) for fmt in DOWNLOADS},
                "total_seconds": round(time.perf_counter() - started, 3)}
        link = settings.share_link(page)
        remembered = {**settings.as_record(), "link": link,
                      "thumb": base64.b64encode(thumbnail_jpeg(read_image(files["preview"]))).decode()}
        downloads = [str(files[fmt]) if fmt == "glb" else
                     DownloadLink(download_url(page, entry.key, fmt, files[fmt].name), files[fmt].name)
                     for fmt in DOWNLOADS]
        return (str(files["glb"]), info, settings.seed, *downloads, link, remembered)

    # -- variants ------------------------------------------------------------------------------------
    @answers_from_store
    def variants(self, prompt, seed, count, mesh_resolution, request: gr.Request = None, progress=gr.Progress()):
        """`count` meshes (1-8) from seeds seed, seed+1, … in one GPU call: preview images (captioned with
        their seeds) and GLB files. Variant i is the result generate() gives for seed + i."""
        started, probe = time.perf_counter(), probing()
        with user_errors(probe), self._logged("variants", request, started, probe) as line:
            batch, notes = variant_settings(prompt, seed, count, mesh_resolution)
            found = [self.service.stored(s) for s in batch]
            if probe and not all(found):
                raise CacheMissError()
            entries: dict[int, Entry] = {i: e for i, e in enumerate(found) if e is not None}
            if len(entries) < len(batch):
                report = lambda fraction, desc: progress(fraction, desc=desc)  # noqa: E731
                for event in self.service.produce(batch, report, fail_on_empty=False, first_look=False):
                    if isinstance(event, Stored):
                        entries[event.index] = event.entry
            line.entries = [entries[i] for i in sorted(entries)]
            if not entries:
                raise GenerationError(f"The model produced no surface for any of the seeds {batch[0].seed}…"
                                      f"{batch[-1].seed}; try other seeds or another prompt.")
        if not probe:
            for note in notes:
                gr.Warning(note)
        if missing := [s.seed for i, s in enumerate(batch) if i not in entries]:
            gr.Warning(f"No surface for seed{'s' * (len(missing) > 1)} {', '.join(map(str, missing))}: left out.")
        made = [(entries[i], s) for i, s in enumerate(batch) if i in entries]
        gallery = [(str(e.files["preview"]), f"seed {s.seed}") for e, s in made]
        chosen = [s.as_record() for _, s in made]
        return gallery, [str(e.files["glb"]) for e, _ in made], chosen

    # -- opening a variant or a history entry ----------------------------------------------------------
    def _entry_inputs(self, settings: Settings) -> tuple:
        return (settings.prompt, False, settings.mesh_resolution, settings.remove_floaters,
                settings.target_faces is not None, settings.target_faces or DEFAULT_FACES,
                texture_label(settings.texture))  # the seed is among generate()'s outputs

    def _open(self, event: str, settings_source, request, progress):
        started, probe = time.perf_counter(), probing()
        with user_errors(probe), self._logged(event, request, started, probe) as line:
            settings = settings_source()
            for outputs in self._show(settings, request, progress, line, probe):
                yield (*outputs, *self._entry_inputs(settings))

    @answers_from_store
    def pick_variant(self, chosen, evt: gr.SelectData, request: gr.Request = None, progress=gr.Progress()):
        """A click on a variant's preview: that mesh in the viewer, with its downloads and link."""
        def settings():
            if not chosen or evt.index is None or not 0 <= evt.index < len(chosen):
                raise InputError("entry", "That variant is no longer available; make the variants again.")
            return settings_from_entry(chosen[evt.index])

        yield from self._open("pick", settings, request, progress)

    @answers_from_store
    def pick_history(self, history, evt: gr.SelectData, request: gr.Request = None, progress=gr.Progress()):
        """A click on a history entry: restored from the store, or made again from its settings."""
        def settings():
            entries = history_entries(history)
            if evt.index is None or not 0 <= evt.index < len(entries):
                raise InputError("entry", "That history entry is gone.")
            return settings_from_entry(entries[evt.index])

        yield from self._open("history", settings, request, progress)

    # -- the history, kept in the browser ----------------------------------------------------------------
    def remember(self, result, history):
        """Puts the latest result first in the browser's history (bounded, no duplicates)."""
        entries = [e for e in history_entries(history) if not _same(e, result)]
        if result:
            entries.insert(0, result)
        history = {"version": 1, "entries": entries[:HISTORY_SIZE]}
        return history, self.history_gallery(history)

    def history_gallery(self, history):
        """Gallery items for the browser's history. A result still stored shows its own preview; for
        one no longer stored the browser's thumbnail is decoded, bounded and re-encoded into the
        store's thumbnail budget. Broken entries are left out."""
        items = []
        for entry in history_entries(history)[:HISTORY_SIZE]:
            try:
                settings = settings_from_entry(entry)
                stored = self.service.stored(settings)
                picture = stored.files["preview"] if stored else self.service.store.thumbnail(
                    checked_thumbnail(entry["thumb"]))
            except (InputError, KeyError, TypeError, ValueError, OSError):
                continue
            items.append((str(picture), f"{settings.prompt[:60]} · seed {settings.seed}"))
        return items

    def clear_history(self):
        history = {"version": 1, "entries": []}  # a truthy value: BrowserState never stores falsy ones
        return history, []

    # -- page load and links ----------------------------------------------------------------------------
    def on_load(self, request: gr.Request):
        """Model status; with ?prompt=…&seed=…&resolution=… fills the inputs and starts a generation."""
        query = dict(request.query_params) if request is not None else {}
        status = self.service.loader.status()
        link, warnings = inputs_from_link(query)
        for warning in warnings:
            gr.Warning(warning)
        if link is None:
            return status, *[gr.skip()] * 9
        return (status, link.prompt, gr.skip() if link.seed is None else link.seed, link.randomize, link.resolution,
                link.remove_floaters, link.simplify, link.faces if link.faces else gr.skip(),
                texture_label(link.texture), time.time_ns())


def history_entries(history) -> list:
    """The entries of a history the browser sent (it can hold anything): a list, or empty."""
    entries = history.get("entries") if isinstance(history, dict) else None
    return entries if isinstance(entries, list) else []


def _same(a, b) -> bool:
    keys = ("prompt", "seed", "mesh_resolution", "remove_floaters", "target_faces", "texture")
    return isinstance(a, dict) and isinstance(b, dict) and all(a.get(k) == b.get(k) for k in keys)


__all__ = ["GENERATE_PARAMETERS", "GPU_GROUP", "Handlers", "VARIANT_PARAMETERS", "answers_from_store", "page_url",
           "probing"]
