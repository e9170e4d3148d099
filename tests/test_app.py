"""The web app (app.py): its API through gradio_client against `python app.py --tiny`, the cold start of a
sleeping Space, and the handlers' error paths on stub pipelines.

The live server is the session fixture ``app_server`` (tests/conftest.py): tiny random model, CPU,
a temporary output folder with a 40 MB budget, and an empty current directory.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
import trimesh
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

import app as webapp
from triplane_turbo import GenerationConfig, TriplaneTurboOutput
from triplane_turbo.app_support import ModelLoader, OutputFolderError, ResultStore
from triplane_turbo.config import MAX_SEED

from .conftest import SLOW_LOAD_SECONDS, slow_app

PARAMETERS = ["prompt", "seed", "randomize_seed", "mesh_resolution", "remove_floaters", "simplify", "target_faces",
              "texture"]
STAGES = {"text", "denoise", "decode", "fields", "isosurface", "color", "texture", "export"}
KINDS = ("glb", "obj", "ply", "stl")


@pytest.fixture(scope="module")
def client(app_server, tmp_path_factory):
    return Client(app_server.url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def generate(client, prompt="a frog wearing a sweater", seed=1, resolution=128, **kwargs):
    """One /generate call -> dict(glb, info, seed, files={fmt: path}, link)."""
    args = dict(prompt=prompt, seed=seed, randomize_seed=False, mesh_resolution=resolution, remove_floaters=False,
                simplify=False, target_faces=20000)
    args.update(kwargs)
    glb, info, used_seed, *files, link = client.predict(**args, api_name="/generate")
    return dict(glb=glb, info=info, seed=used_seed, files=dict(zip(KINDS, files)), link=link)


def glb_mesh(path) -> trimesh.Trimesh:
    """The GLB's single geometry (textured, or with COLOR_0 in visual.vertex_attributes["color"])."""
    (geometry,) = trimesh.load_scene(path, process=False).geometry.values()
    return geometry


def load_download(path, kind) -> trimesh.Trimesh:
    if kind == "glb":
        return glb_mesh(path)
    if kind == "obj":  # a zip of name.obj + name.mtl + name.png
        folder = Path(path).with_suffix("")
        with zipfile.ZipFile(path) as archive:
            names = sorted(archive.namelist())
            archive.extractall(folder)
        stem = Path(path).name.removesuffix("-obj.zip")
        assert names == [f"{stem}.mtl", f"{stem}.obj", f"{stem}.png"]
        return trimesh.load(folder / f"{stem}.obj", force="mesh", process=False)
    return trimesh.load(path, force="mesh", process=False)


def entries(output_dir: Path) -> list[Path]:
    return [p for p in (output_dir / "files").iterdir() if len(p.name) == 32]


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------
# The live server
# ---------------------------------------------------------------------------------------------
def test_two_public_endpoints_with_named_parameters(client):
    api = client.view_api(return_format="dict", print_info=False)
    assert sorted(api["named_endpoints"]) == ["/generate", "/variants"]
    assert not api["unnamed_endpoints"]
    assert [p["parameter_name"] for p in api["named_endpoints"]["/generate"]["parameters"]] == PARAMETERS
    assert [p["parameter_name"] for p in api["named_endpoints"]["/variants"]["parameters"]] == \
        ["prompt", "seed", "count", "mesh_resolution"]


@pytest.mark.timeout(90)
def test_generate_returns_a_textured_glb_details_and_downloads(client, app_server):
    result = generate(client, seed=11)
    info = result["info"]
    assert info["seed"] == result["seed"] == 11
    assert info["cached"] is False and info["device"] == "cpu" and info["model_revision"] == "tiny"
    assert set(info["timings"]) == STAGES and all(t >= 0 for t in info["timings"].values())
    mesh = glb_mesh(result["glb"])
    assert len(mesh.faces) == info["faces"] > 100
    image = np.asarray(mesh.visual.material.baseColorTexture.convert("RGB"))
    assert image.shape == (1024, 1024, 3) and image.reshape(-1, 3).std(0).min() > 1  # a texture, not one grey
    assert mesh.visual.material.metallicFactor == 0.0
    # Upright (+Y up) and centred: the tiny model's blob sits around the origin.
    assert np.all(np.abs(mesh.bounds).max(axis=0) < 1.1)
    for kind, path in result["files"].items():
        assert Path(path).name == info["files"][kind] and Path(path).name.startswith("triplaneturbo-")
        assert len(load_download(path, kind).faces) == info["faces"], kind
    on_disk = list(app_server.output_dir.glob(f"files/*/{info['files']['glb']}"))
    assert len(on_disk) == 1 and on_disk[0].read_bytes() == Path(result["glb"]).read_bytes()
    preview = np.asarray(Image.open(on_disk[0].parent / info["files"]["preview"]))
    assert (np.abs(preview.astype(int) - preview[0, 0]).max(-1) > 12).mean() > 0.05  # the object is drawn
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(result["link"]).query)
    assert result["link"].startswith(app_server.url)
    assert query == {"prompt": ["a frog wearing a sweater"], "seed": ["11"], "resolution": ["128"]}


@pytest.mark.timeout(90)
def test_a_new_mesh_shows_with_vertex_colours_while_its_texture_bakes(client):
    """A streamed update: first the vertex-coloured mesh, then the textured one with the downloads."""
    async def outputs():
        job = client.submit(prompt="a glass teapot", seed=21, randomize_seed=False, mesh_resolution=128,
                            api_name="/generate")
        while not job.done():
            await asyncio.sleep(0.2)
        return job.outputs()

    first, last = asyncio.run(outputs())
    assert first[1]["status"] == "baking the texture…" and first[0] != last[0]
    pending, final = glb_mesh(first[0]), glb_mesh(last[0])
    assert np.ptp(np.asarray(pending.visual.vertex_attributes["color"])[:, :3]) > 0  # vertex colours
    assert final.visual.material.baseColorTexture is not None and len(final.faces) == len(pending.faces)


@pytest.mark.timeout(90)
def test_vertex_colours_on_request(client):
    result = generate(client, seed=11, texture="vertex")
    assert result["info"]["texture"] == "vertex" and "texture" not in result["info"]["timings"]
    colors = np.asarray(glb_mesh(result["glb"]).visual.vertex_attributes["color"])
    assert np.ptp(colors[:, :3]) > 0
    assert "texture=vertex" in result["link"]


@pytest.mark.timeout(120)
def test_same_settings_give_the_same_mesh_and_repeats_come_from_the_cache(client, app_server):
    first = generate(client, prompt="a corgi taking a selfie", seed=5, remove_floaters=True)
    again = generate(client, prompt="a corgi taking a selfie", seed=5, remove_floaters=True)
    assert first["info"]["cached"] is False and again["info"]["cached"] is True
    assert Path(again["glb"]).read_bytes() == Path(first["glb"]).read_bytes()
    # Drop the cached entry: a real second generation gives the same vertices.
    (entry,) = [p.parent for p in app_server.output_dir.glob(f"files/*/{first['info']['files']['glb']}")]
    shutil.rmtree(entry)
    fresh = generate(client, prompt="a corgi taking a selfie", seed=5, remove_floaters=True)
    assert fresh["info"]["cached"] is False
    np.testing.assert_array_equal(glb_mesh(fresh["glb"]).vertices, glb_mesh(first["glb"]).vertices)
    # Different settings are a different entry.
    other = generate(client, prompt="a corgi taking a selfie", seed=5, simplify=True, target_faces=2000)
    assert other["info"]["cached"] is False and other["info"]["faces"] <= 2100
    assert glb_mesh(other["glb"]).visual.material.normalTexture is not None  # a simplified mesh gets a normal map


@pytest.mark.timeout(60)
def test_a_random_seed_is_reported_and_written_back(client):
    result = generate(client, seed=0, randomize_seed=True)
    assert isinstance(result["seed"], int) and result["seed"] == result["info"]["seed"]
    assert f"seed={result['seed']}" in result["link"]


@pytest.mark.timeout(180)
def test_variants_are_the_meshes_generate_gives_for_each_seed(client, app_server):
    gallery, files = client.predict(prompt="a humanoid robot", seed=10, count=4, mesh_resolution=128,
                                    api_name="/variants")
    assert [item["caption"] for item in gallery] == ["seed 10", "seed 11", "seed 12", "seed 13"]
    for item in gallery:
        preview = np.asarray(Image.open(item["image"]).convert("RGB")).astype(int)
        assert (np.abs(preview - preview[0, 0]).max(-1) > 12).mean() > 0.05, "a blank preview"
    assert len(files) == 4 and all(len(glb_mesh(f).faces) > 100 for f in files)
    twelve = generate(client, prompt="a humanoid robot", seed=12)
    assert Path(twelve["glb"]).read_bytes() == Path(files[2]).read_bytes() and twelve["info"]["cached"]
    # made again from nothing (no cache), generate(seed=12) is the same mesh up to float rounding
    shutil.rmtree(next(app_server.output_dir.glob(f"files/*/{twelve['info']['files']['glb']}")).parent)
    fresh = generate(client, prompt="a humanoid robot", seed=12)
    assert fresh["info"]["cached"] is False
    a, b = glb_mesh(fresh["glb"]), glb_mesh(files[2])
    assert len(a.faces) == len(b.faces) and np.abs(np.sort(a.vertices, 0) - np.sort(b.vertices, 0)).max() < 1e-4


@pytest.mark.parametrize("count, message", [(0, "between 1 and 8"), (99, "between 1 and 8"), (2.5, "whole number"),
                                            ("many", "whole number")])
def test_bad_variant_counts_get_a_clear_error(client, count, message):
    with pytest.raises(AppError, match=message):
        client.predict(prompt="a chair", seed=1, count=count, mesh_resolution=128, api_name="/variants")


BAD_INPUTS = [
    (dict(prompt=""), "empty"),
    (dict(prompt="   \n\t  "), "empty"),
    (dict(prompt="\x00\x07\x1b"), "empty"),
    (dict(prompt="a" * 5000), "5000 characters"),
    (dict(prompt=None), "empty"),
    (dict(prompt=123), "must be text"),
    (dict(prompt=["a frog"]), "must be text"),
    (dict(seed=-1), "between 0 and"),
    (dict(seed=MAX_SEED + 1), "between 0 and"),
    (dict(seed=10**40), "between 0 and"),
    (dict(seed="abc"), "whole number"),
    (dict(seed=1.5), "whole number"),
    (dict(seed=True), "whole number"),
    (dict(seed=None), "Enter a seed"),
    (dict(randomize_seed="yes"), "true or false"),
    (dict(mesh_resolution=100), "must be one of"),
    (dict(mesh_resolution=512), "must be one of"),
    (dict(mesh_resolution="high"), "must be one of"),
    (dict(mesh_resolution=None), "must be one of"),
    (dict(remove_floaters="no"), "true or false"),
    (dict(simplify=True, target_faces=10), "between"),
    (dict(simplify=True, target_faces="many"), "whole number"),
    (dict(seed="²"), "whole number"),
    (dict(texture="png"), "texture must be one of"),
    (dict(texture=None), "texture must be one of"),
]


@pytest.mark.parametrize("kwargs, message", BAD_INPUTS, ids=[repr(kwargs)[:40] for kwargs, _ in BAD_INPUTS])
def test_bad_inputs_get_a_clear_error(client, kwargs, message):
    with pytest.raises(AppError, match=message):
        generate(client, **kwargs)


@pytest.mark.timeout(60)
def test_the_server_keeps_serving_after_errors(client):
    for kwargs, _ in BAD_INPUTS[:3]:
        with pytest.raises(AppError):
            generate(client, **kwargs)
    assert generate(client, seed=12)["info"]["faces"] > 0


@pytest.mark.timeout(120)
def test_odd_prompts_are_just_text(client, app_server):
    cleaned = generate(client, prompt="a frog\x00 wearing\x1b a\tsweater", seed=2)
    assert cleaned["info"]["prompt"] == "a frog wearing a sweater"
    for prompt in ("🐸 צפרדע wearing a sweater 🧶", "../../etc/passwd"):
        result = generate(client, prompt=prompt, seed=2)
        assert result["info"]["prompt"] == prompt
        for path in result["files"].values():
            assert Path(path).name.startswith("triplaneturbo-") and "passwd" not in path
    long_prompt = " ".join(["a very detailed wooden chair"] * 25)  # > 77 tokens, under 1000 characters
    truncated = generate(client, prompt=long_prompt, seed=2)
    assert any("tokens long" in w for w in truncated["info"]["warnings"])
    assert not any("passwd" in p.name for p in app_server.output_dir.rglob("*"))


@pytest.mark.timeout(240)
def test_twenty_concurrent_requests_are_all_answered(client):
    seeds = [100 + i % 5 for i in range(20)]  # five distinct results, each asked four times
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda s: generate(client, prompt="a humanoid robot playing the cello", seed=s),
                                seeds))
    assert [r["seed"] for r in results] == seeds
    by_seed = {}
    for r in results:
        by_seed.setdefault(r["seed"], set()).add(Path(r["glb"]).read_bytes())
    assert all(len(glbs) == 1 for glbs in by_seed.values())
    assert sum(not r["info"]["cached"] for r in results) == 5


@pytest.mark.timeout(180)
def test_the_output_folder_stays_bounded(client, app_server):
    for seed in range(200, 204):
        generate(client, prompt="a steam engine train, high resolution", seed=seed)
        assert folder_bytes(app_server.output_dir) <= app_server.max_bytes
    # This module made well over a dozen results of about 6 MB each; only the newest fit.
    assert 3 <= len(entries(app_server.output_dir)) <= app_server.max_bytes // 5_000_000


def test_only_the_result_files_are_served(app_server):
    def status(path) -> int:
        try:
            with urllib.request.urlopen(app_server.url + "gradio_api/file=" + urllib.parse.quote(str(path))) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    glb = next(app_server.output_dir.glob("files/*/*.glb"))
    assert status(glb) == 200
    record = next(app_server.output_dir.glob("records/*.json"))  # prompts and settings stay private
    for path in (record, app_server.output_dir / ".triplane-turbo-results", webapp.ASSETS.parent / "app.py",
                 webapp.ASSETS / "examples.txt", Path("/etc/passwd"), app_server.log):
        assert status(path) == 403, path


def test_nothing_is_written_outside_the_output_folder(app_server):
    assert list(app_server.workdir.iterdir()) == []
    mesh_suffixes = {".glb", ".obj", ".ply", ".stl", ".zip", ".png"}
    assert not [p for p in app_server.tmpdir.rglob("*") if p.suffix in mesh_suffixes]  # no copies in Gradio's cache


# ---------------------------------------------------------------------------------------------
# A sleeping Space waking up: the page answers before the model is loaded
# ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_requests_made_while_the_model_loads_wait_and_succeed(tmp_path_factory):
    with slow_app(tmp_path_factory, "cold-start") as server:
        started = time.monotonic()
        client = Client(server.url, verbose=False, download_files=str(server.tmpdir / "client"))
        assert "model ready" not in server.log.read_text()  # the page answers while the weights load
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda seed: generate(client, seed=seed), (3, 4, 3)))
        assert all(r["info"]["faces"] > 100 for r in results)
        assert time.monotonic() - started >= SLOW_LOAD_SECONDS * 0.5  # they did wait for the model
        assert Path(results[0]["glb"]).read_bytes() == Path(results[2]["glb"]).read_bytes()


@pytest.mark.timeout(120)
def test_a_failed_load_is_a_clear_error_for_every_caller(tmp_path_factory):
    with slow_app(tmp_path_factory, "failed-start", fail="offline with nothing cached: run with --tiny") as server:
        client = Client(server.url, verbose=False, download_files=str(server.tmpdir / "client"))
        with ThreadPoolExecutor(3) as pool:
            calls = [pool.submit(generate, client, seed=s) for s in (1, 2, 3)]
            for call in calls:
                with pytest.raises(AppError, match="could not be loaded: offline with nothing cached: run with --tiny"):
                    call.result()
        with pytest.raises(AppError, match="could not be loaded"):  # and later ones
            generate(client, seed=4)


# ---------------------------------------------------------------------------------------------
# Handlers on stub pipelines: loading, load failures, CUDA out of memory, no surface, the cache
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


def stub_app(tmp_path, pipe_or_loader) -> webapp.TriplaneTurboApp:
    loader = pipe_or_loader if isinstance(pipe_or_loader, ModelLoader) else ModelLoader.loaded(pipe_or_loader)
    return webapp.TriplaneTurboApp(loader, ResultStore(tmp_path / "outputs"))


class Progress:
    """Records what a handler reports."""

    def __init__(self):
        self.lines = []

    def __call__(self, value, desc=None):
        self.lines.append(desc)


def call(app, prompt="a chair", seed=3, progress=None):
    return webapp._last(app.generate(prompt, seed, False, 128, texture="vertex", progress=progress or Progress()))


def slow_loader(pipe, seconds=None, fail=None, wait=None):
    def build():
        if wait is not None:
            wait.wait(10)
        else:
            time.sleep(seconds)
        if fail:
            raise fail
        return pipe

    return ModelLoader(lambda _: "stub", build, device="cpu", dtype="float32")


def test_requests_while_the_weights_load_wait_for_them(tmp_path):
    release = threading.Event()
    loader = slow_loader(StubPipe(sphere_output), wait=release)
    app = stub_app(tmp_path, loader)
    threading.Timer(1.5, release.set).start()
    progress = Progress()
    assert "Loading" in loader.status() and "wait" in loader.status()
    assert call(app, progress=progress)[1]["faces"] == 320
    assert any(line and line.startswith("Loading the model") for line in progress.lines)
    assert loader.status().startswith("Model ready")


def test_a_load_failure_is_reported_to_every_request(tmp_path):
    from triplane_turbo import WeightsNotAvailableError

    loader = slow_loader(StubPipe(sphere_output), 0.2, fail=WeightsNotAvailableError("offline: run with --tiny"))
    app = stub_app(tmp_path, loader)
    with ThreadPoolExecutor(3) as pool:
        for future in [pool.submit(call, app, seed=s) for s in (1, 2, 3)]:
            with pytest.raises(gr.Error, match="could not be loaded: offline: run with --tiny"):
                future.result()
    assert "offline" in loader.status()


def test_cached_results_need_neither_the_model_nor_the_gpu(tmp_path):
    """A shared link to a stored result is answered while the model loads and while the GPU is busy."""
    app = stub_app(tmp_path, StubPipe(sphere_output))
    first = call(app, seed=8)
    never = threading.Event()
    waiting = webapp.TriplaneTurboApp(slow_loader(StubPipe(sphere_output), wait=never), app.store)
    with waiting._gpu:  # another generation holds the GPU
        started = time.monotonic()
        again = call(waiting, seed=8)
    assert again[1]["cached"] is True and again[0] == first[0] and time.monotonic() - started < 5
    never.set()


def test_the_cache_key_includes_device_and_dtype(tmp_path):
    half = StubPipe(sphere_output, dtype=torch.float16)
    call(stub_app(tmp_path, half), seed=4)
    full = StubPipe(sphere_output)
    result = call(webapp.TriplaneTurboApp(ModelLoader.loaded(full), ResultStore(tmp_path / "outputs")), seed=4)
    assert result[1]["cached"] is False and full.calls == 1  # a float16 result is not served to a float32 app


def test_cuda_out_of_memory_is_a_clear_error_and_the_app_recovers(tmp_path):
    outcomes = [torch.cuda.OutOfMemoryError("CUDA out of memory"), None]

    def run(prompts, seeds):
        if (outcome := outcomes.pop(0)) is not None:
            raise outcome
        return sphere_output(prompts, seeds)

    app = stub_app(tmp_path, StubPipe(run))
    with pytest.raises(gr.Error, match="ran out of memory"):
        call(app)
    assert call(app)[1]["cached"] is False


def test_no_surface_is_a_clear_error(tmp_path):
    empty = StubPipe(lambda prompts, seeds: TriplaneTurboOutput([trimesh.Trimesh()], torch.zeros(1), None, seeds, {}))
    with pytest.raises(gr.Error, match="no surface for this seed"):
        call(stub_app(tmp_path, empty))
    assert entries(tmp_path / "outputs") == []


def test_unexpected_failures_become_a_generic_error(tmp_path):
    def boom(prompts, seeds):
        raise RuntimeError("secret internal detail")

    with pytest.raises(gr.Error, match="Generation failed \\(RuntimeError\\)") as caught:
        call(stub_app(tmp_path, StubPipe(boom)))
    assert "secret" not in str(caught.value)


def test_history_is_newest_first_bounded_and_clearable(tmp_path):
    app = stub_app(tmp_path, StubPipe(sphere_output))
    history = {"version": 1, "entries": []}
    for seed in range(webapp.HISTORY_SIZE + 3):
        result = call(app, seed=seed)[-1]
        history, gallery = app.remember(result, history)
    assert len(history["entries"]) == webapp.HISTORY_SIZE == len(gallery)
    assert history["entries"][0]["seed"] == webapp.HISTORY_SIZE + 2 and gallery[0][1].endswith(f"seed {webapp.HISTORY_SIZE + 2}")
    assert all(Path(path).parent == app.store.root / "thumbs" for path, _ in gallery)
    again, _ = app.remember(history["entries"][3], history)  # opening an older one moves it to the top
    assert again["entries"][0] == history["entries"][3] and len(again["entries"]) == webapp.HISTORY_SIZE
    cleared, items = app.clear_history()
    assert cleared == {"version": 1, "entries": []} and cleared and items == []  # truthy: BrowserState stores it


# ---------------------------------------------------------------------------------------------
# The result store
# ---------------------------------------------------------------------------------------------
def test_the_store_evicts_old_and_least_recently_used_entries_only(tmp_path):
    import os

    store = ResultStore(tmp_path, max_bytes=2500, max_age_s=3600)
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


def test_the_store_refuses_a_folder_with_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputFolderError, match="'notes.txt'.*--output-dir"):
        ResultStore(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    # the first app version's entries are its own: cleared, not refused
    old = tmp_path / "old"
    (old / ("a" * 32)).mkdir(parents=True)
    (old / ".staging-x").mkdir()
    ResultStore(old)
    assert sorted(p.name for p in old.iterdir()) == [".staging", ".triplane-turbo-results", "files", "records", "thumbs"]


def test_the_app_refuses_the_working_directory_as_output_folder(tmp_path):
    import subprocess
    import sys

    (tmp_path / "app.py").write_text("# someone's code")
    result = subprocess.run([sys.executable, str(webapp.ASSETS.parent / "app.py"), "--tiny", "--output-dir", "."],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "already holds files this app did not make ('app.py')" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.py"]


def test_command_line_and_environment(monkeypatch):
    monkeypatch.setenv("TRIPLANE_TURBO_TINY", "1")
    monkeypatch.setenv("TRIPLANE_TURBO_OUTPUT_DIR", "/tmp/somewhere")
    args = webapp.parse_args([])
    assert args.tiny and args.output_dir == "/tmp/somewhere" and not args.share
    assert (args.max_output_gb, args.max_output_age_hours) == (2.0, 24.0)
    args = webapp.parse_args(["--output-dir", "x", "--device", "cpu", "--share"])
    assert (args.output_dir, args.device, args.share) == ("x", "cpu", True)
    assert len(webapp.load_examples()) >= 10


# ---------------------------------------------------------------------------------------------
# Placement per device (ZeroGPU itself cannot run here: `spaces` needs a CUDA build of torch)
# ---------------------------------------------------------------------------------------------
def test_zero_gpu_builds_on_the_main_thread_and_places_the_model_on_cuda_before_launch(monkeypatch, tiny_pipe):
    """The ZeroGPU branch of make_loader: loaded at once on this thread in float16, fields for baking
    kept on the CPU, `.to("cuda")` called here (spaces' emulation intercepts it on the main thread)."""
    from triplane_turbo import TriplaneTurboPipeline, hub

    calls = []
    stub = copy_of(tiny_pipe)
    monkeypatch.setattr(hub, "resolve", lambda *a, **k: hub.ResolvedWeights(Path("."), Path("."), "rev", k["variant"]))
    monkeypatch.setattr(TriplaneTurboPipeline, "from_resolved", classmethod(
        lambda cls, weights, **kw: (calls.append(("build", weights.variant, kw, threading.current_thread())), stub)[1]))
    monkeypatch.setattr(stub, "to", lambda device: (calls.append(("to", device, threading.current_thread())), stub)[1])
    loader, bake_fields = webapp.make_loader(False, "cuda", zero_gpu=True)
    assert loader.ready() and loader.device == "cuda" and loader.dtype == "float16"
    (_, variant, kwargs, build_thread), (_, device, move_thread) = calls
    assert variant == "fp16" and kwargs == {"dtype": torch.float16} and device == "cuda"
    assert build_thread is move_thread is threading.main_thread()
    assert bake_fields is not stub.fields and bake_fields.bbox.device.type == "cpu"


def copy_of(pipe):
    import copy

    return copy.copy(pipe)


def test_the_gpu_duration_grows_with_resolution_and_batch():
    assert webapp._gpu_seconds(["a"], [1], 160, False, None, object()) == 25
    assert webapp._gpu_seconds(["a"] * 4, [1, 2, 3, 4], 160, False, None, object()) == 43
    assert webapp._gpu_seconds(["a"], [1], 384) == 60


def test_the_device_and_dtype_follow_the_hardware(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert webapp.pick_device(None) == "cpu" and webapp.pick_device("cuda:1") == "cuda:1"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert webapp.pick_device(None) == "mps"
    assert webapp.app_dtype("mps") == webapp.app_dtype("cuda") == torch.float16  # MPS: not run here (no Apple GPU)


def test_history_entries_from_the_browser_are_checked(tmp_path):
    """The history lives in the browser's storage, where anyone can edit it."""
    import base64

    app = stub_app(tmp_path, StubPipe(sphere_output))
    good = call(app, seed=5)[-1]
    bad_settings = {**good, "mesh_resolution": 999}
    not_an_image = {**good, "seed": 6, "thumb": base64.b64encode(b"<script>x</script>").decode()}
    huge = io.BytesIO()
    Image.new("RGB", (2000, 2000)).save(huge, format="JPEG")
    too_big = {**good, "seed": 7, "thumb": base64.b64encode(huge.getvalue()).decode()}
    items = app.history_gallery({"version": 1, "entries": [good, bad_settings, not_an_image, too_big, {"x": 1}]})
    assert [caption for _, caption in items] == ["a chair · seed 5"]
    assert all(Image.open(path).size == (96, 96) for path, _ in items)  # re-encoded, not the browser's bytes

    class Select:
        index = 0

    with pytest.raises(gr.Error, match="must be one of"):
        webapp._last(app.pick_history({"entries": [bad_settings]}, Select(), None, Progress()))
    with pytest.raises(gr.Error, match="damaged"):
        webapp._last(app.pick_history({"entries": [{"prompt": "a chair"}]}, Select(), None, Progress()))
    restored = webapp._last(app.pick_history({"entries": [good]}, Select(), None, Progress()))
    assert restored[1]["cached"] is True and restored[2] == 5


def test_a_variant_without_a_surface_is_left_out(tmp_path):
    def some_empty(prompts, seeds):
        out = sphere_output(prompts, seeds)
        out.meshes[1] = trimesh.Trimesh()
        return out

    app = stub_app(tmp_path, StubPipe(some_empty))
    with pytest.warns(UserWarning, match="No surface for seed 21"):
        gallery, files, chosen = app.variants("a chair", 20, 3, 128, progress=Progress())
    assert [caption for _, caption in gallery] == ["seed 20", "seed 22"] and len(files) == 2
    assert [c["seed"] for c in chosen] == [20, 22]


def test_a_link_with_odd_numbers_is_still_answered(tmp_path):
    class Request:
        query_params = {"prompt": "a chair", "seed": "²", "faces": "²", "resolution": "x"}

    app = stub_app(tmp_path, StubPipe(sphere_output))
    with pytest.warns(UserWarning):
        status, prompt, seed, randomize, resolution, *_ = app.on_load(Request())
    assert prompt == "a chair" and randomize is True and resolution == webapp.DEFAULT_RESOLUTION
