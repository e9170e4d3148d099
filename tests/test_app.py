"""The web app (app.py): its API through gradio_client against `python app.py --tiny`, plus the
handlers' error paths on stub pipelines.

The live server is the session fixture ``app_server`` (tests/conftest.py): tiny random model, CPU,
a temporary output folder with a ~30 MB budget, and an empty current directory.
"""

from __future__ import annotations

import shutil
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
import trimesh
from gradio_client import Client
from gradio_client.exceptions import AppError

import app as webapp
from triplane_turbo import GenerationConfig, TriplaneTurboOutput
from triplane_turbo.app_support import ModelLoader, ResultStore
from triplane_turbo.config import MAX_SEED

PARAMETERS = ["prompt", "seed", "randomize_seed", "mesh_resolution", "remove_floaters", "simplify", "target_faces"]
STAGES = {"text", "denoise", "decode", "fields", "isosurface", "color", "export"}


@pytest.fixture(scope="module")
def client(app_server, tmp_path_factory):
    return Client(app_server.url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def generate(client, prompt="a frog wearing a sweater", seed=1, resolution=128, **kwargs):
    """One /generate call -> dict(glb, info, seed, files={fmt: path}, link)."""
    args = dict(prompt=prompt, seed=seed, randomize_seed=False, mesh_resolution=resolution, remove_floaters=False,
                simplify=False, target_faces=20000)
    args.update(kwargs)
    glb, info, used_seed, *files, link = client.predict(**args, api_name="/generate")
    return dict(glb=glb, info=info, seed=used_seed, files=dict(zip(("glb", "obj", "ply", "stl"), files)), link=link)


def glb_mesh(path) -> trimesh.Trimesh:
    """The GLB's single geometry; trimesh keeps COLOR_0 in visual.vertex_attributes["color"]."""
    (geometry,) = trimesh.load_scene(path, process=False).geometry.values()
    return geometry


def entries(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------
# The live server
# ---------------------------------------------------------------------------------------------
def test_one_public_endpoint_with_named_parameters(client):
    api = client.view_api(return_format="dict", print_info=False)
    assert list(api["named_endpoints"]) == ["/generate"]
    assert not api["unnamed_endpoints"]
    assert [p["parameter_name"] for p in api["named_endpoints"]["/generate"]["parameters"]] == PARAMETERS


@pytest.mark.timeout(60)
def test_generate_returns_a_coloured_glb_details_and_downloads(client, app_server):
    result = generate(client, seed=11)
    info = result["info"]
    assert info["seed"] == result["seed"] == 11
    assert info["cached"] is False and info["device"] == "cpu" and info["model_revision"] == "tiny"
    assert set(info["timings"]) == STAGES and all(t >= 0 for t in info["timings"].values())
    mesh = glb_mesh(result["glb"])
    assert (len(mesh.vertices), len(mesh.faces)) == (info["vertices"], info["faces"]) and info["faces"] > 100
    colors = np.asarray(mesh.visual.vertex_attributes["color"])
    assert colors.shape == (info["vertices"], 4) and np.ptp(colors[:, :3]) > 0  # coloured, not one grey
    # Upright (+Y up) and centred: the tiny model's blob sits around the origin.
    assert np.all(np.abs(mesh.bounds).max(axis=0) < 1.1)
    for fmt, path in result["files"].items():
        assert Path(path).name == info["files"][fmt] and Path(path).name.startswith("triplaneturbo-")
        loaded = trimesh.load(path, force="mesh", process=False) if fmt != "glb" else glb_mesh(path)
        assert len(loaded.faces) == info["faces"], fmt
    on_disk = list(app_server.output_dir.glob(f"*/{info['files']['glb']}"))
    assert len(on_disk) == 1 and on_disk[0].read_bytes() == Path(result["glb"]).read_bytes()
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(result["link"]).query)
    assert result["link"].startswith(app_server.url)
    assert query == {"prompt": ["a frog wearing a sweater"], "seed": ["11"], "resolution": ["128"]}


@pytest.mark.timeout(90)
def test_same_settings_give_the_same_mesh_and_repeats_come_from_the_cache(client, app_server):
    first = generate(client, prompt="a corgi taking a selfie", seed=5, remove_floaters=True)
    again = generate(client, prompt="a corgi taking a selfie", seed=5, remove_floaters=True)
    assert first["info"]["cached"] is False and again["info"]["cached"] is True
    assert Path(again["glb"]).read_bytes() == Path(first["glb"]).read_bytes()
    # Drop the cached entry: a real second generation gives the same vertices.
    (entry,) = [p.parent for p in app_server.output_dir.glob(f"*/{first['info']['files']['glb']}")]
    shutil.rmtree(entry)
    fresh = generate(client, prompt="a corgi taking a selfie", seed=5, remove_floaters=True)
    assert fresh["info"]["cached"] is False
    np.testing.assert_array_equal(glb_mesh(fresh["glb"]).vertices, glb_mesh(first["glb"]).vertices)
    # Different settings are a different entry.
    other = generate(client, prompt="a corgi taking a selfie", seed=5, simplify=True, target_faces=2000)
    assert other["info"]["cached"] is False and other["info"]["faces"] <= 2100


@pytest.mark.timeout(60)
def test_a_random_seed_is_reported_and_written_back(client):
    result = generate(client, seed=0, randomize_seed=True)
    assert isinstance(result["seed"], int) and result["seed"] == result["info"]["seed"]
    assert f"seed={result['seed']}" in result["link"]


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


@pytest.mark.timeout(90)
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


@pytest.mark.timeout(150)
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


@pytest.mark.timeout(120)
def test_the_output_folder_stays_bounded(client, app_server):
    for seed in range(200, 203):
        generate(client, prompt="a steam engine train, high resolution", seed=seed)
        assert folder_bytes(app_server.output_dir) <= app_server.max_bytes
    # This module made well over a dozen results of 5-6 MB each; only the newest fit.
    assert 3 <= len(entries(app_server.output_dir)) <= app_server.max_bytes // 5_000_000


def test_only_the_output_folder_is_served(app_server):
    def status(path) -> int:
        try:
            with urllib.request.urlopen(app_server.url + "gradio_api/file=" + urllib.parse.quote(str(path))) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    glb = next(app_server.output_dir.glob("*/*.glb"))
    assert status(glb) == 200
    for path in (webapp.ASSETS.parent / "app.py", webapp.ASSETS / "examples.txt", Path("/etc/passwd"), app_server.log):
        assert status(path) == 403, path


def test_nothing_is_written_outside_the_output_folder(app_server):
    assert list(app_server.workdir.iterdir()) == []
    mesh_suffixes = {".glb", ".obj", ".ply", ".stl"}
    assert not [p for p in app_server.tmpdir.rglob("*") if p.suffix in mesh_suffixes]  # no copies in Gradio's cache


# ---------------------------------------------------------------------------------------------
# Handlers on stub pipelines: loading, load failures, CUDA out of memory, no surface
# ---------------------------------------------------------------------------------------------
class StubPipe:
    revision, device, dtype, config = "stub", torch.device("cpu"), torch.float32, GenerationConfig()

    def __init__(self, run):
        self.run = run

    def set_progress_bar_config(self, **kwargs):
        pass

    def to(self, *args):
        return self

    def __call__(self, prompt, *, seed, callback=None, **kwargs):
        return self.run(prompt, seed)


def sphere_output(prompt, seed):
    sphere = trimesh.creation.icosphere(subdivisions=2)
    sphere.visual.vertex_colors = np.tile([200, 100, 50, 255], (len(sphere.vertices), 1)).astype(np.uint8)
    return TriplaneTurboOutput(meshes=[sphere], triplane=None, latents=None, seeds=[seed], timings={"text": 0.0})


def stub_app(tmp_path, pipe_or_loader) -> webapp.TriplaneTurboApp:
    loader = pipe_or_loader if isinstance(pipe_or_loader, ModelLoader) else ModelLoader.loaded(pipe_or_loader)
    return webapp.TriplaneTurboApp(loader, ResultStore(tmp_path / "outputs"), device="cpu")


def call(app, prompt="a chair", seed=3):
    return app.generate(prompt, seed, False, 128)


def test_requests_while_the_weights_load_get_a_clear_message(tmp_path):
    import threading

    release = threading.Event()
    loader = ModelLoader(lambda: (release.wait(10), StubPipe(sphere_output))[1])
    app = stub_app(tmp_path, loader)
    with pytest.raises(gr.Error, match="still loading"):
        call(app)
    assert "Loading" in loader.status()
    release.set()
    assert loader.wait(10)
    assert call(app)[1]["faces"] == 320


def test_a_load_failure_is_reported_to_every_request(tmp_path):
    from triplane_turbo import WeightsNotAvailableError

    def fail():
        raise WeightsNotAvailableError("offline: run with --tiny")

    loader = ModelLoader(fail, background=False)
    with pytest.raises(gr.Error, match="could not be loaded: offline: run with --tiny"):
        call(stub_app(tmp_path, loader))
    assert "offline" in loader.status()


def test_cuda_out_of_memory_is_a_clear_error_and_the_app_recovers(tmp_path):
    outcomes = [torch.cuda.OutOfMemoryError("CUDA out of memory"), None]

    def run(prompt, seed):
        if (outcome := outcomes.pop(0)) is not None:
            raise outcome
        return sphere_output(prompt, seed)

    app = stub_app(tmp_path, StubPipe(run))
    with pytest.raises(gr.Error, match="ran out of memory"):
        call(app)
    assert call(app)[1]["cached"] is False


def test_no_surface_is_a_clear_error(tmp_path):
    empty = StubPipe(lambda prompt, seed: TriplaneTurboOutput([trimesh.Trimesh()], None, None, [seed], {}))
    with pytest.raises(gr.Error, match="no surface for this seed"):
        call(stub_app(tmp_path, empty))
    assert entries(tmp_path / "outputs") == []


def test_unexpected_failures_become_a_generic_error(tmp_path):
    def boom(prompt, seed):
        raise RuntimeError("secret internal detail")

    with pytest.raises(gr.Error, match="Generation failed \\(RuntimeError\\)") as caught:
        call(stub_app(tmp_path, StubPipe(boom)))
    assert "secret" not in str(caught.value)


def test_the_store_evicts_old_and_least_recently_used_entries_only(tmp_path):
    import os
    import time

    store = ResultStore(tmp_path, max_bytes=2500, max_age_s=3600)
    now = time.time()
    for i, age in enumerate([7200, 300, 200, 100]):  # the first is too old
        key = ResultStore.key(n=i)
        (tmp_path / key).mkdir()
        (tmp_path / key / "data").write_bytes(b"x" * 1000)
        os.utime(tmp_path / key, (now - age, now - age))
    foreign = tmp_path / "my-notes"
    foreign.mkdir()
    (foreign / "big").write_bytes(b"x" * 10_000)
    removed = store.enforce_limits(keep=ResultStore.key(n=1))
    assert removed == [ResultStore.key(n=0), ResultStore.key(n=2)]  # too old, then the oldest unkept
    assert foreign.exists() and len(store.entries()) == 2


def test_command_line_and_environment(monkeypatch):
    monkeypatch.setenv("TRIPLANE_TURBO_TINY", "1")
    monkeypatch.setenv("TRIPLANE_TURBO_OUTPUT_DIR", "/tmp/somewhere")
    args = webapp.parse_args([])
    assert args.tiny and args.output_dir == "/tmp/somewhere" and not args.share
    assert (args.max_output_gb, args.max_output_age_hours) == (2.0, 24.0)
    args = webapp.parse_args(["--output-dir", "x", "--device", "cpu", "--share"])
    assert (args.output_dir, args.device, args.share) == ("x", "cpu", True)
    assert len(webapp.load_examples()) >= 10
