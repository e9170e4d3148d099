"""The web app's parts without a server: input parsing, the result store's rules, the generation
service and the Gradio handlers on stub pipelines (loading, failures, no surface, stored results
answered before queueing), device placement. Out of memory, the Hub failing, each visitor's share
and the request log: tests/test_operations.py."""

from __future__ import annotations

import base64
import io
import pickle
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
import trimesh
from gradio.caching import CacheMissError, ProbeCache
from PIL import Image

import app as webapp
from triplane_turbo import GenerationConfig, TriplaneTurboOutput
from triplane_turbo.config import MAX_SEED
from triplane_turbo.web import GenerationService, Handlers, ModelLoader, OutputFolderError, ResultStore
from triplane_turbo.web import handlers as handlers_module
from triplane_turbo.web import models, settings
from triplane_turbo.web.settings import HISTORY_SIZE, InputError, Settings


# ---------------------------------------------------------------------------------------------
# Stubs
# ---------------------------------------------------------------------------------------------
class StubPipe:
    revision, config = "stub", GenerationConfig()

    def __init__(self, run, dtype=torch.float32):
        from triplane_turbo.triplane import TriplaneFields

        self.run, self.device, self.dtype = run, torch.device("cpu"), dtype
        self.fields = TriplaneFields(1, (4,))  # for baking: sphere_output's triplanes have one channel
        self.calls = 0

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, prompts, *, seed, callback=None, **kwargs):
        self.calls += 1
        return self.run(prompts, seed)


def sphere_output(prompts, seeds):
    sphere = trimesh.creation.icosphere(subdivisions=2)
    sphere.visual.vertex_colors = np.tile([200, 100, 50, 255], (len(sphere.vertices), 1)).astype(np.uint8)
    return TriplaneTurboOutput(meshes=[sphere.copy() for _ in seeds], triplane=torch.zeros(len(seeds), 6, 1, 2, 2),
                               latents=None, seeds=list(seeds), timings={"text": 0.0})


def handlers_for(tmp_path, pipe_or_loader, **store_options) -> Handlers:
    loader = pipe_or_loader if isinstance(pipe_or_loader, ModelLoader) else ModelLoader.loaded(pipe_or_loader)
    return Handlers(GenerationService(loader, ResultStore(tmp_path / "outputs", **store_options)))


class Progress:
    """Records what a handler reports."""

    def __init__(self):
        self.lines = []

    def __call__(self, value, desc=None):
        self.lines.append(desc)


def last(outputs):
    """The final yield of a streaming handler."""
    final = None
    for final in outputs:
        pass
    return final


def call(handlers, prompt="a chair", seed=3, progress=None, texture="vertex"):
    return last(handlers.generate(prompt, seed, False, 128, texture=texture, progress=progress or Progress()))


def slow_loader(pipe, seconds=None, fail=None, wait=None, revision="stub"):
    def build():
        if wait is not None:
            wait.wait(10)
        else:
            time.sleep(seconds)
        if fail:
            raise fail
        return pipe

    return ModelLoader(lambda _: revision, build, device="cpu", dtype="float32")


def entries(output_dir: Path) -> list[Path]:
    return [p for p in (output_dir / "files").iterdir() if len(p.name) == 32]


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed, expected", [(0, 0), ("42", 42), (" +7 ", 7), (3.0, 3), (MAX_SEED, MAX_SEED)])
def test_seeds_are_parsed_strictly(seed, expected):
    assert settings.parse_seed_input(seed) == expected


@pytest.mark.parametrize("seed", ["+-5", "--5", "-+5", "1e3", "²", "٣", "0x10", "1.5", "", " ", None, True, 1.5, -1,
                                  MAX_SEED + 1, "-3"])
def test_odd_seeds_are_clear_errors(seed):
    with pytest.raises(InputError, match="seed") as caught:
        settings.parse_seed_input(seed)
    assert caught.value.field == "seed"


def test_a_link_with_odd_values_fills_what_it_can():
    link, warnings = settings.inputs_from_link({"prompt": "a chair", "seed": "--5", "faces": "²", "resolution": "x",
                                                "texture": "png"})
    assert link.prompt == "a chair" and link.randomize and link.seed is None
    assert link.resolution == settings.DEFAULT_RESOLUTION and not link.simplify and link.texture == "uv"
    assert len(warnings) == 4
    link, warnings = settings.inputs_from_link({"prompt": "a chair", "seed": "12", "faces": "5000", "floaters": "1"})
    assert (link.seed, link.randomize, link.simplify, link.faces, link.remove_floaters) == (12, False, True, 5000, True)
    assert warnings == [] and settings.inputs_from_link({"seed": "3"}) == (None, [])


def test_a_link_with_odd_numbers_is_still_answered(tmp_path):
    class Request:
        query_params = {"prompt": "a chair", "seed": "+-5", "faces": "²", "resolution": "x"}

    handlers = handlers_for(tmp_path, StubPipe(sphere_output))
    with pytest.warns(UserWarning):
        status, prompt, seed, randomize, resolution, *_ = handlers.on_load(Request())
    assert prompt == "a chair" and randomize is True and resolution == settings.DEFAULT_RESOLUTION


# ---------------------------------------------------------------------------------------------
# The result store: a folder of its own, bounded
# ---------------------------------------------------------------------------------------------
def test_the_store_refuses_a_folder_with_other_files_and_touches_nothing(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputFolderError, match="'notes.txt'.*--output-dir"):
        ResultStore(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_users_folder_that_looks_like_ours_is_refused_and_untouched(tmp_path):
    """A folder with the app's names but without its marker: refused, nothing deleted or served."""
    user = tmp_path / "user"
    (user / "files").mkdir(parents=True)
    (user / "files" / "notes.txt").write_text("mine")
    (user / ("a" * 32)).mkdir()
    (user / ".staging-x").mkdir()
    before = sorted(str(p.relative_to(user)) for p in user.rglob("*"))
    with pytest.raises(OutputFolderError, match="not empty and was not made by this app"):
        ResultStore(user)
    assert sorted(str(p.relative_to(user)) for p in user.rglob("*")) == before


@pytest.mark.parametrize("path", ["files/notes.txt", "thumbs/notes.txt", "records/notes.txt", ".staging/notes.txt",
                                  f"files/{'a' * 32}/notes.txt"])
def test_a_marked_folder_with_foreign_files_is_refused(tmp_path, path):
    """The app serves files/ and thumbs/ and deletes in all of its folders: anything there that it
    would not have written makes it refuse the folder, untouched."""
    store = ResultStore(tmp_path / "out")
    (store.root / path).parent.mkdir(parents=True, exist_ok=True)
    (store.root / path).write_text("mine")
    with pytest.raises(OutputFolderError, match=f"'{path}'"):
        ResultStore(store.root)
    assert (store.root / path).read_text() == "mine"


def test_an_earlier_versions_folder_is_taken_over(tmp_path):
    """What earlier versions kept beside their results (Gradio's example cache, a temporary folder)
    is the app's own: removed, not refused."""
    store = ResultStore(tmp_path / "out")
    (store.root / "examples" / "abc").mkdir(parents=True)
    (store.root / "examples" / "abc" / "log.csv").write_text("x")
    (store.root / "tmp").mkdir()
    (store.root / "files" / ".empty.glb.x1y2.tmp").write_bytes(b"")  # an atomic write a crash cut short
    ResultStore(store.root)
    assert not (store.root / "examples").exists() and not (store.root / "tmp").exists()


def test_the_app_refuses_the_working_directory_as_output_folder(tmp_path, monkeypatch):
    (tmp_path / "app.py").write_text("# someone's code")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="not empty and was not made by this app \\('app.py'\\)"):
        webapp.main(["--tiny", "--output-dir", "."])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.py"]


def test_the_store_evicts_old_and_least_recently_used_entries_only(tmp_path):
    import os

    store = ResultStore(tmp_path, max_bytes=2500 / (1 - 0.02), max_age_s=3600)
    now = time.time()
    for i, age in enumerate([7200, 300, 200, 100]):  # the first is too old
        key = ResultStore.key(n=i)
        (tmp_path / "files" / key).mkdir()
        (tmp_path / "files" / key / "data").write_bytes(b"x" * 1000)
        (tmp_path / "records" / f"{key}.json").write_text("{}")
        os.utime(tmp_path / "files" / key, (now - age, now - age))
    removed = store.enforce_limits(keep=ResultStore.key(n=1))
    assert removed == [ResultStore.key(n=0), ResultStore.key(n=2)]  # too old, then the oldest unkept
    assert len(store.entries()) == 2 and not (tmp_path / "records" / f"{ResultStore.key(n=0)}.json").exists()


def test_forged_histories_cannot_push_results_out(tmp_path):
    """Thumbnails from browsers have a small budget of their own inside the total."""
    handlers = handlers_for(tmp_path, StubPipe(sphere_output), max_bytes=3e6)
    results = [call(handlers, seed=s)[-1] for s in (1, 2)]
    kept = sorted(p.name for p in entries(tmp_path / "outputs"))
    rng = np.random.default_rng(0)
    for batch in range(5):  # a history edited to hold many distinct (not stored) entries
        forged = []
        for i in range(HISTORY_SIZE):
            noise = Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8))
            buffer = io.BytesIO()
            noise.save(buffer, format="JPEG", quality=95)
            forged.append({**results[0], "seed": 10_000 + batch * HISTORY_SIZE + i,
                           "thumb": base64.b64encode(buffer.getvalue()).decode()})
        assert len(handlers.history_gallery({"version": 1, "entries": forged})) == HISTORY_SIZE
    thumbs = list((tmp_path / "outputs" / "thumbs").iterdir())
    assert sum(t.stat().st_size for t in thumbs) <= handlers.service.store.thumb_bytes
    handlers.service.store.enforce_limits()
    assert sorted(p.name for p in entries(tmp_path / "outputs")) == kept  # every result is still there


def test_history_shows_stored_previews_and_checks_entries_from_the_browser(tmp_path):
    handlers = handlers_for(tmp_path, StubPipe(sphere_output))
    good = call(handlers, seed=5)[-1]
    bad_settings = {**good, "mesh_resolution": 999}
    not_an_image = {**good, "seed": 6, "thumb": base64.b64encode(b"<script>x</script>").decode()}
    huge = io.BytesIO()
    Image.new("RGB", (2000, 2000)).save(huge, format="JPEG")
    too_big = {**good, "seed": 7, "thumb": base64.b64encode(huge.getvalue()).decode()}
    items = handlers.history_gallery({"version": 1, "entries": [good, bad_settings, not_an_image, too_big, {"x": 1}]})
    assert [caption for _, caption in items] == ["a chair · seed 5"]
    assert Path(items[0][0]).name.endswith("-preview.png")  # a stored result shows its own preview
    gone = {**good, "seed": 8}  # not stored: the browser's thumbnail, re-encoded
    (path, _), = handlers.history_gallery({"version": 1, "entries": [gone]})
    assert Path(path).parent.name == "thumbs" and Image.open(path).size == (96, 96)

    class Select:
        index = 0

    with pytest.raises(gr.Error, match="must be one of"):
        last(handlers.pick_history({"entries": [bad_settings]}, Select(), None, Progress()))
    with pytest.raises(gr.Error, match="damaged"):
        last(handlers.pick_history({"entries": [{"prompt": "a chair"}]}, Select(), None, Progress()))
    restored = last(handlers.pick_history({"entries": [good]}, Select(), None, Progress()))
    assert restored[1]["cached"] is True and restored[2] == 5


def test_history_is_newest_first_bounded_and_clearable(tmp_path):
    handlers = handlers_for(tmp_path, StubPipe(sphere_output))
    result = call(handlers, seed=0)[-1]  # one stored result; the others, as the browser keeps them
    history = {"version": 1, "entries": []}
    for seed in range(HISTORY_SIZE + 3):
        history, gallery = handlers.remember({**result, "seed": seed}, history)
    assert len(history["entries"]) == HISTORY_SIZE == len(gallery)
    assert history["entries"][0]["seed"] == HISTORY_SIZE + 2 and gallery[0][1].endswith(f"seed {HISTORY_SIZE + 2}")
    again, _ = handlers.remember(history["entries"][3], history)  # opening an older one moves it to the top
    assert again["entries"][0] == history["entries"][3] and len(again["entries"]) == HISTORY_SIZE
    cleared, items = handlers.clear_history()
    assert cleared == {"version": 1, "entries": []} and cleared and items == []  # truthy: BrowserState stores it
    for broken in ("x", ["x"], {"entries": "abc"}, {"entries": None}, None):  # whatever the browser's storage holds
        fixed, gallery = handlers.remember(history["entries"][0], broken)
        assert fixed["entries"] == [history["entries"][0]] and len(gallery) == 1


# ---------------------------------------------------------------------------------------------
# Handlers and service on stub pipelines
# ---------------------------------------------------------------------------------------------
def test_requests_while_the_weights_load_wait_for_them(tmp_path):
    release = threading.Event()
    pipe = StubPipe(sphere_output)
    loader = slow_loader(pipe, wait=release)
    handlers = handlers_for(tmp_path, loader)

    class LoadReported(Progress):
        """Lets the load finish once the request has said that it waits for it."""

        def __call__(self, value, desc=None):
            super().__call__(value, desc)
            if desc and desc.startswith("Loading the model") and not release.is_set():
                assert not loader.ready() and pipe.calls == 0
                release.set()

    assert "Loading" in loader.status() and "wait" in loader.status()
    assert call(handlers, progress=LoadReported())[1]["faces"] == 320
    assert release.is_set(), "the request never said that it waits for the model (the stub's 10 s let it go)"
    assert loader.status().startswith("Model ready") and pipe.calls == 1


def test_a_load_failure_is_reported_to_every_request(tmp_path):
    from triplane_turbo import WeightsNotAvailableError

    loader = slow_loader(StubPipe(sphere_output), 0.2, fail=WeightsNotAvailableError("offline: run with --tiny"))
    handlers = handlers_for(tmp_path, loader)
    with ThreadPoolExecutor(3) as pool:
        for future in [pool.submit(call, handlers, seed=s) for s in (1, 2, 3)]:
            with pytest.raises(gr.Error, match="could not be loaded: offline: run with --tiny"):
                future.result()
    assert "offline" in loader.status()


def probe(handler, *args, **kwargs):
    """What Gradio does before queueing an event whose handler answers from the store."""
    assert getattr(handler, "cache", False), "the handler does not take part in Gradio's store check"
    with ProbeCache():
        return last(handler(*args, **kwargs))


def test_stored_results_are_answered_before_queueing_even_while_the_model_loads(tmp_path):
    """Gradio asks the handler before queueing: a stored result is answered then (no model, no
    GPU, no queue); anything else is queued, never an error at that point."""
    handlers = handlers_for(tmp_path, StubPipe(sphere_output))
    first = call(handlers, seed=8)
    never, loading_pipe = threading.Event(), StubPipe(sphere_output)
    loading = Handlers(GenerationService(slow_loader(loading_pipe, wait=never), handlers.service.store))
    again = probe(loading.generate, "a chair", 8, False, 128, texture="vertex", progress=Progress())
    assert again[1]["cached"] is True and again[0] == first[0]
    # answered while the model is still loading (waiting for it would have let the stub's 10 s pass)
    assert not loading.service.loader.ready() and loading_pipe.calls == 0
    with pytest.raises(CacheMissError):  # not stored: queued
        probe(loading.generate, "a chair", 9, False, 128, texture="vertex", progress=Progress())
    with pytest.raises(CacheMissError):  # an error, even: queued (the validator has answered bad inputs)
        probe(loading.generate, "", 9, False, 128, progress=Progress())
    never.set()


def test_the_store_key_includes_weights_device_and_dtype(tmp_path):
    call(handlers_for(tmp_path, StubPipe(sphere_output, dtype=torch.float16)), seed=4)
    full = StubPipe(sphere_output)
    result = call(Handlers(GenerationService(ModelLoader.loaded(full), ResultStore(tmp_path / "outputs"))), seed=4)
    assert result[1]["cached"] is False and full.calls == 1  # a float16 result is not served to a float32 app


def test_examples_follow_the_weights(tmp_path):
    """Examples are results like any other, keyed by the weights: another adapter, another mesh."""
    store = ResultStore(tmp_path / "outputs")
    pipes = {revision: StubPipe(sphere_output) for revision in ("adapter-a", "adapter-b")}
    shown = {}
    for revision, pipe in pipes.items():
        handlers = Handlers(GenerationService(slow_loader(pipe, 0, revision=revision), store))
        for _ in range(2):
            shown.setdefault(revision, []).append(last(handlers.generate_example("a lion", progress=Progress())))
    assert [o[1]["cached"] for o in shown["adapter-a"]] == [False, True] == [o[1]["cached"] for o in shown["adapter-b"]]
    assert shown["adapter-a"][0][0] != shown["adapter-b"][0][0] and all(p.calls == 1 for p in pipes.values())
    assert shown["adapter-a"][1][2] == settings.EXAMPLE_SEED


def test_no_surface_is_a_clear_error(tmp_path):
    empty = StubPipe(lambda prompts, seeds: TriplaneTurboOutput([trimesh.Trimesh()], torch.zeros(1), None, seeds, {}))
    with pytest.raises(gr.Error, match="no surface for this seed"):
        call(handlers_for(tmp_path, empty))
    assert entries(tmp_path / "outputs") == []


def test_unexpected_failures_become_a_generic_error(tmp_path):
    def boom(prompts, seeds):
        raise RuntimeError("secret internal detail")

    with pytest.raises(gr.Error, match="Generation failed \\(RuntimeError\\)") as caught:
        call(handlers_for(tmp_path, StubPipe(boom)))
    assert "secret" not in str(caught.value)


def test_a_variant_without_a_surface_is_left_out(tmp_path):
    def some_empty(prompts, seeds):
        out = sphere_output(prompts, seeds)
        out.meshes[1] = trimesh.Trimesh()
        return out

    handlers = handlers_for(tmp_path, StubPipe(some_empty))
    with pytest.warns(UserWarning, match="No surface for seed 21"):
        gallery, files, chosen = handlers.variants("a chair", 20, 3, 128, progress=Progress())
    assert [caption for _, caption in gallery] == ["seed 20", "seed 22"] and len(files) == 2
    assert [c["seed"] for c in chosen] == [20, 22]


def test_variants_whose_only_missing_seed_has_no_surface_return_the_others(tmp_path):
    """The one seed left to make has no surface: the stored others are still the answer."""
    def empty_for_31(prompts, seeds):
        out = sphere_output(prompts, seeds)
        out.meshes = [trimesh.Trimesh() if s == 31 else m for s, m in zip(seeds, out.meshes)]
        return out

    pipe = StubPipe(empty_for_31)
    handlers = handlers_for(tmp_path, pipe)
    for seed in (30, 32):
        call(handlers, seed=seed, texture="uv")
    with pytest.warns(UserWarning, match="No surface for seed 31"):
        gallery, files, _ = handlers.variants("a chair", 30, 3, 128, progress=Progress())
    assert [caption for _, caption in gallery] == ["seed 30", "seed 32"] and pipe.calls == 3


def test_validators_answer_bad_inputs_and_a_full_queue(tmp_path):
    handlers = handlers_for(tmp_path, StubPipe(sphere_output))
    handlers.admission.max_queue = 2
    verdicts = handlers.validate_generate("a chair", "--5", False, 128)
    assert [v["is_valid"] for v in verdicts] == [True, False] + [True] * 6 and "whole number" in verdicts[1]["message"]
    call(handlers, seed=1)
    for seed in (2, 3):  # two are let through to the GPU queue ...
        assert all(v["is_valid"] for v in handlers.validate_generate("a chair", seed, False, 128, texture="vertex"))
    busy = handlers.validate_generate("a chair", 4, False, 128, texture="vertex")  # ... a third is told to wait
    assert not busy[0]["is_valid"] and "busy" in busy[0]["message"] and "try again" in busy[0]["message"]
    assert all(v["is_valid"] for v in handlers.validate_generate("a chair", 1, False, 128, texture="vertex")), \
        "a stored result is answered whatever the queue"


# ---------------------------------------------------------------------------------------------
# Placement per device
# ---------------------------------------------------------------------------------------------
def test_on_zero_gpu_the_model_is_built_up_front_and_the_networks_return_cpu_data(monkeypatch, tmp_path):
    """make_loader's ZeroGPU branch on the real tiny model: built on the calling (main) thread before
    it returns, float16, fields for baking kept as a CPU copy; the networks' call — wrapped by the
    real `spaces.GPU`, which outside a Space returns it unchanged — hands back CPU data only."""
    spaces = pytest.importorskip("spaces")
    from triplane_turbo import tiny

    threads = []
    real = tiny.tiny_pipeline
    monkeypatch.setattr(tiny, "tiny_pipeline", lambda **kw: (threads.append(threading.current_thread()), real(**kw))[1])
    loader, bake_fields = models.make_loader(True, "cpu", zero_gpu=True)
    assert loader.ready() and threads == [threading.current_thread()] and loader.dtype == "float16"
    assert loader.pipe.dtype == torch.float16 and bake_fields is not loader.pipe.fields
    assert bake_fields.bbox.device.type == "cpu" and bake_fields.bbox.dtype == torch.float32
    def in_a_worker(fn):
        """What ZeroGPU does to the call besides the GPU: arguments and result cross a process boundary."""
        wrapped = spaces.GPU(duration=models.gpu_seconds)(fn)

        def call(*args, **kwargs):
            args, kwargs = pickle.loads(pickle.dumps((args, kwargs)))
            return pickle.loads(pickle.dumps(wrapped(*args, **kwargs)))
        return call

    service = GenerationService(loader, ResultStore(tmp_path / "outputs"), bake_fields=bake_fields,
                                on_device=in_a_worker)
    progress = Progress()
    events = list(service.produce([Settings("a chair", 3, 128)], lambda f, line: progress(f, line), fail_on_empty=True))
    stored = [e for e in events if type(e).__name__ == "Stored"]
    assert len(stored) == 1 and stored[0].entry.record["texture_size"] == service.texture_size
    assert "Running the networks on the GPU" in progress.lines


def test_the_gpu_duration_grows_with_resolution_and_batch():
    """ZeroGPU's budget (its callable receives the networks' call's arguments): more for finer grids
    and for more objects, and an integer number of seconds."""
    by_resolution = [models.gpu_seconds(["a"], [1], r, False, None, object()) for r in settings.RESOLUTIONS]
    assert by_resolution == sorted(by_resolution) and len(set(by_resolution)) == len(by_resolution)
    by_count = [models.gpu_seconds(["a"] * n, list(range(n)), 160) for n in range(1, settings.MAX_VARIANTS + 1)]
    assert by_count == sorted(by_count) and by_count[0] < by_count[-1]
    assert all(isinstance(s, int) and s > 0 for s in by_resolution + by_count)


def test_the_device_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert models.pick_device(None) == "cpu" and models.pick_device("cuda:1") == "cuda:1"
    assert models.pick_device(None, zero_gpu=True) == "cuda"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert models.pick_device(None) == "mps"


def test_command_line_and_environment(monkeypatch):
    monkeypatch.setenv("TRIPLANE_TURBO_TINY", "1")
    monkeypatch.setenv("TRIPLANE_TURBO_OUTPUT_DIR", "/tmp/somewhere")
    monkeypatch.setenv("TRIPLANE_TURBO_MAX_QUEUE", "7")
    args = webapp.parse_args([])
    assert args.tiny and args.output_dir == "/tmp/somewhere" and not args.share and args.max_queue == 7
    assert (args.max_output_gb, args.max_output_age_hours) == (2.0, 24.0)
    args = webapp.parse_args(["--output-dir", "x", "--device", "cpu", "--share"])
    assert (args.output_dir, args.device, args.share) == ("x", "cpu", True)
    assert len(webapp.load_examples()) >= 10


def test_settings_make_links_and_records():
    s = Settings("a chair", 5, 256, True, 5000, "vertex")
    assert s.share_link("http://x/") == "http://x/?prompt=a+chair&seed=5&resolution=256&floaters=1&faces=5000&texture=vertex"
    assert s.as_record() == {"prompt": "a chair", "seed": 5, "mesh_resolution": 256, "remove_floaters": True,
                             "target_faces": 5000, "texture": "vertex"}


# ---------------------------------------------------------------------------------------------
# The Space: weights fetched when it is built, not at run time
# ---------------------------------------------------------------------------------------------
def test_the_space_preloads_exactly_the_files_the_loader_fetches():
    """README front matter: `preload_from_hub` lists, per repository, files the ZeroGPU loader reads
    (float16 variant of the base model, the adapter file) — all of them, and nothing else."""
    import fnmatch

    import yaml

    from triplane_turbo import hub
    from triplane_turbo.config import DEFAULT_ADAPTER_FILENAME, DEFAULT_ADAPTER_REPO, DEFAULT_BASE_MODEL

    text = (Path(webapp.__file__).parent / "README.md").read_text(encoding="utf-8")
    front = yaml.safe_load(text.split("---")[1])
    listed = {}
    for line in front["preload_from_hub"]:
        repo, files, *revision = line.split()
        listed[repo] = files.split(",")
    assert set(listed) == {DEFAULT_BASE_MODEL, DEFAULT_ADAPTER_REPO}
    assert listed[DEFAULT_ADAPTER_REPO] == [DEFAULT_ADAPTER_FILENAME]
    patterns = hub.base_model_files("fp16")  # what make_loader fetches on ZeroGPU (float16)
    base = listed[DEFAULT_BASE_MODEL]
    assert all(any(fnmatch.fnmatch(f, p) for p in patterns) for f in base), "a listed file the loader never reads"
    assert all(any(fnmatch.fnmatch(f, p) for f in base) for p in patterns), "a file the loader reads is not listed"
    assert set(hub.weight_files("fp16")) <= set(base)


def test_the_gpu_backlog_is_read_from_gradios_queue(tmp_path):
    """The validator's "busy" answer counts the requests waiting in Gradio's queue for the GPU group
    (Gradio keeps them per concurrency id); checked against the installed Gradio's own classes."""
    from gradio.queueing import EventQueue

    loader = ModelLoader.loaded(StubPipe(sphere_output))
    demo = webapp.build_demo(loader, tmp_path / "outputs", max_queue=3)
    handlers = next(fn.fn.__self__ for fn in demo.fns.values() if getattr(fn.fn, "__name__", "") == "generate")
    assert handlers.admission.backlog() == 0
    waiting = EventQueue(handlers_module.GPU_GROUP, 1)
    waiting.queue.extend(["event"] * 3)
    demo._queue.event_queue_per_concurrency_id[handlers_module.GPU_GROUP] = waiting
    assert handlers.admission.backlog() == 3
    busy = handlers.validate_generate("a chair", 5, False, 128)
    assert not busy[0]["is_valid"] and "3 requests are waiting" in busy[0]["message"]


def test_a_burst_fills_the_queue_to_its_bound_and_no_further(tmp_path, monkeypatch):
    """Requests let in are counted once, whether or not Gradio's queue shows them yet; those that
    never start (the visitor left) stop counting when the next one starts."""
    from gradio.queueing import EventQueue

    loader = ModelLoader.loaded(StubPipe(sphere_output))
    demo = webapp.build_demo(loader, tmp_path / "outputs", max_queue=5)
    handlers = next(fn.fn.__self__ for fn in demo.fns.values() if getattr(fn.fn, "__name__", "") == "generate")
    queue = EventQueue(handlers_module.GPU_GROUP, 1)
    demo._queue.event_queue_per_concurrency_id[handlers_module.GPU_GROUP] = queue
    let_in = 0
    for seed in range(20):  # Gradio appends each event a moment after its validator let it in
        if all(v["is_valid"] for v in handlers.validate_generate("a chair", seed, False, 128, texture="vertex")):
            let_in += 1
            queue.queue.append(f"event {seed}")
    assert let_in == 5 and handlers.admission.waiting() == 5
    queue.queue[:] = queue.queue[:2]  # two start in turn ... and three visitors left while queued
    monkeypatch.setattr(time, "monotonic", lambda: 1e9)  # long after they were let in
    handlers.admission.started(None)
    assert handlers.admission.waiting() == 2
    assert all(v["is_valid"] for v in handlers.validate_generate("a chair", 99, False, 128, texture="vertex"))
