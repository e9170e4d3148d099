"""The web app through its API (gradio_client) against `python app.py --tiny`: results, downloads,
links, variants, bad inputs, the output folder's rules, a crowd of a hundred, and the cold start of
a sleeping Space.

The live server is the session fixture ``app_server`` (tests/conftest.py): tiny random model, CPU,
a temporary output folder with a 40 MB budget, 8 requests that may wait for the GPU (the crowd fills
them), and an empty current directory. The handlers' error paths on stub pipelines are in
tests/test_web.py. The cold starts are the same page served from this process with its model load
held back (conftest's ``slow_app``).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import trimesh
from gradio_client import Client
from gradio_client.exceptions import AppError, ValidationError
from PIL import Image
from scipy.spatial import cKDTree

import app as webapp
from triplane_turbo.config import MAX_SEED

from .conftest import APP_MAX_QUEUE, release, slow_app

PARAMETERS = ["prompt", "seed", "randomize_seed", "mesh_resolution", "remove_floaters", "simplify", "target_faces",
              "texture"]
STAGES = {"text", "denoise", "decode", "fields", "isosurface", "color", "texture", "export"}
KINDS = ("glb", "obj", "ply", "stl", "usdz", "3mf")


def local_client(url: str, download_files) -> Client:
    """A gradio client of a test server. The servers speak plain HTTP on 127.0.0.1, so there are no
    certificates to check: without ``ssl_verify=False`` every request (and every file download)
    loads the system's CA bundle into a fresh SSL context, about 26 ms of CPU each: 10 of the 11 s
    the crowd of a hundred spent on this side."""
    return Client(url, verbose=False, download_files=download_files, ssl_verify=False)


@pytest.fixture(scope="module")
def client(app_server):
    """A client that downloads nothing by itself: ``generate`` fetches each result's GLB. The other
    downloads are links whose files the app writes on their first request (about 0.4 s of the server's
    CPU for the five formats of a result at resolution 128); only the tests about them follow them
    (``downloading_client``)."""
    return local_client(app_server.url, download_files=False)


@pytest.fixture(scope="module")
def downloading_client(app_server, tmp_path_factory):
    """A client that downloads every file a call answers with, as a visitor clicking each download."""
    return local_client(app_server.url, str(tmp_path_factory.mktemp("downloads")))


def fetched(file) -> str:
    """The local path of a file output: as downloaded by a downloading client, or fetched now from its
    URL (loopback) into a fresh temporary folder, under its own name."""
    if isinstance(file, str):
        return file
    assert file["url"].startswith("http://127.0.0.1:"), file["url"]
    path = Path(tempfile.mkdtemp(prefix="glb-")) / file["orig_name"]
    with urllib.request.urlopen(file["url"], timeout=30) as response:
        path.write_bytes(response.read())
    return str(path)


def generate(client, prompt="a frog wearing a sweater", seed=1, resolution=128, **kwargs):
    """One /generate call -> dict(glb, info, seed, files={fmt: path, or for a client that downloads
    nothing its file data}, link); the GLB is a local path either way."""
    args = dict(prompt=prompt, seed=seed, randomize_seed=False, mesh_resolution=resolution, remove_floaters=False,
                simplify=False, target_faces=20000)
    args.update(kwargs)
    glb, info, used_seed, *files, link = client.predict(**args, api_name="/generate")
    return dict(glb=fetched(glb), info=info, seed=used_seed, files=dict(zip(KINDS, files)), link=link)


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
    if kind == "usdz":  # Pixar's USD reads it (trimesh cannot): one triangle mesh
        from pxr import Usd, UsdGeom

        stage = Usd.Stage.Open(str(path))  # held: its prims expire with it
        (mesh,) = [UsdGeom.Mesh(p) for p in stage.Traverse() if p.IsA(UsdGeom.Mesh)]
        faces = np.asarray(mesh.GetFaceVertexIndicesAttr().Get()).reshape(-1, 3)
        return trimesh.Trimesh(np.asarray(mesh.GetPointsAttr().Get()), faces, process=False)
    return trimesh.load(path, force="mesh", process=False)


def entries(output_dir: Path) -> list[Path]:
    return [p for p in (output_dir / "files").iterdir() if len(p.name) == 32]


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------
# The live server
# ---------------------------------------------------------------------------------------------
def test_the_public_endpoints_have_named_parameters(client):
    """The page's generate and variants; the MCP tools' JSON endpoints (tests/test_mcp.py)."""
    api = client.view_api(return_format="dict", print_info=False)
    assert sorted(api["named_endpoints"]) == ["/generate", "/mcp_generate", "/mcp_variants", "/variants"]
    assert not api["unnamed_endpoints"]
    assert [p["parameter_name"] for p in api["named_endpoints"]["/generate"]["parameters"]] == PARAMETERS
    assert [p["parameter_name"] for p in api["named_endpoints"]["/variants"]["parameters"]] == \
        ["prompt", "seed", "count", "mesh_resolution"]


@pytest.mark.timeout(90)
def test_generate_returns_a_textured_glb_details_and_downloads(downloading_client, app_server):
    result = generate(downloading_client, seed=11)
    info = result["info"]
    assert info["seed"] == result["seed"] == 11
    assert info["cached"] is False and info["device"] == "cpu" and info["model_revision"] == "tiny"
    assert set(info["timings"]) == STAGES and all(t >= 0 for t in info["timings"].values())
    mesh = glb_mesh(result["glb"])
    assert len(mesh.faces) == info["faces"] > 100
    image = np.asarray(mesh.visual.material.baseColorTexture.convert("RGB"))
    size = app_server.texture_size
    assert image.shape == (size, size, 3) and image.reshape(-1, 3).std(0).min() > 1  # a texture, not one grey
    assert mesh.visual.material.metallicFactor == 0.0
    # Centred: the tiny model's blob sits around the origin (upright: the next test).
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


@pytest.mark.timeout(180)
def test_the_glb_is_upright(client, tiny_pipe):
    """+Y up: the GLB holds the model-frame mesh (+Z up; the same tiny weights here) turned by the
    documented rotation (x, y, z) -> (y, z, x). Measured on this blob: the median vertex is about 1e-5
    from the nearest turned one (float rounding), and 0.006 or more after any other axis swap or flip."""
    glb = glb_mesh(generate(client, seed=11, texture="vertex")["glb"])
    model = tiny_pipe("a frog wearing a sweater", seed=11, mesh_resolution=128, texture="vertex").meshes[0]
    distances = cKDTree(model.vertices[:, [1, 2, 0]]).query(glb.vertices)[0]  # written out: not the code under test
    assert np.median(distances) < 1e-3, np.quantile(distances, [0.5, 0.9, 0.99])


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
    pending, final = glb_mesh(fetched(first[0])), glb_mesh(fetched(last[0]))
    assert np.ptp(np.asarray(pending.visual.vertex_attributes["color"])[:, :3]) > 0  # vertex colours
    assert final.visual.material.baseColorTexture is not None and len(final.faces) == len(pending.faces)


@pytest.mark.timeout(90)
def test_vertex_colours_on_request(client):
    result = generate(client, seed=11, texture="vertex")
    assert result["info"]["texture"] == "vertex" and "texture" not in result["info"]["timings"]
    colors = np.asarray(glb_mesh(result["glb"]).visual.vertex_attributes["color"])
    assert np.ptp(colors[:, :3]) > 0
    assert "texture=vertex" in result["link"]


@pytest.mark.timeout(90)
def test_only_the_glb_is_written_before_a_result_is_shown_and_each_download_on_its_first_request(app_server,
                                                                                                  tmp_path):
    """The viewer's GLB (and the preview) are written with the result; the other downloads are links
    that write their file on the first request and serve the same file from then on."""
    client = local_client(app_server.url, download_files=False)
    glb, info, _, *files, link = client.predict(prompt="a lazy armchair", seed=41, randomize_seed=False,
                                                mesh_resolution=128, api_name="/generate")
    assert info["cached"] is False
    (folder,) = [p.parent for p in app_server.output_dir.glob(f"files/*/{info['files']['glb']}")]
    stem = info["files"]["glb"].removesuffix(".glb")
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"{stem}.glb", f"{stem}-preview.png",
                                                               f"{stem}-source.npz"])
    assert set(info["downloads"]) == set(KINDS) == set(webapp.DOWNLOADS)
    for kind, file in zip(KINDS, files):
        assert file["orig_name"] == info["files"][kind]
        if kind == "glb":
            continue
        assert file["url"] == f"{info['downloads'][kind]}/{info['files'][kind]}"
        assert file["url"].startswith(f"{app_server.url}download/{folder.name}/{kind}/")
        with urllib.request.urlopen(info["downloads"][kind]) as response:
            data = response.read()
            assert info["files"][kind] in response.headers["content-disposition"]
        written = folder / info["files"][kind]
        assert written.read_bytes() == data
        saved = tmp_path / info["files"][kind]
        saved.write_bytes(data)
        assert len(load_download(saved, kind).faces) == info["faces"], kind
        first = written.stat().st_mtime_ns
        with urllib.request.urlopen(file["url"]) as response:
            assert response.read() == data and written.stat().st_mtime_ns == first  # served, not written again
    with pytest.raises(urllib.error.HTTPError) as gone:
        urllib.request.urlopen(f"{app_server.url}download/{'0' * 32}/ply")
    assert gone.value.code == 404


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
def test_variants_are_the_meshes_generate_gives_for_each_seed(client, downloading_client, app_server):
    gallery, files = downloading_client.predict(prompt="a humanoid robot", seed=10, count=4, mesh_resolution=128,
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
    with pytest.raises(ValidationError, match=message):
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
    (dict(seed="+-5"), "whole number"),
    (dict(seed="--5"), "whole number"),
    (dict(seed="1e3"), "whole number"),
    (dict(texture="png"), "texture must be one of"),
    (dict(texture=None), "texture must be one of"),
]


@pytest.mark.parametrize("kwargs, message", BAD_INPUTS, ids=[repr(kwargs)[:40] for kwargs, _ in BAD_INPUTS])
def test_bad_inputs_get_a_clear_error(client, kwargs, message):
    """Answered before queueing (Gradio's validator), naming the input."""
    with pytest.raises(ValidationError, match=message):
        generate(client, **kwargs)


@pytest.mark.timeout(60)
def test_the_server_keeps_serving_after_errors(client):
    for kwargs, _ in BAD_INPUTS[:3]:
        with pytest.raises(ValidationError):
            generate(client, **kwargs)
    assert generate(client, seed=12)["info"]["faces"] > 0


@pytest.mark.timeout(120)
def test_odd_prompts_are_just_text(client, downloading_client, app_server):
    cleaned = generate(client, prompt="a frog\x00 wearing\x1b a\tsweater", seed=2, texture="vertex")
    assert cleaned["info"]["prompt"] == "a frog wearing a sweater"
    for prompt in ("🐸 צפרדע wearing a sweater 🧶", "../../etc/passwd"):  # every download written and fetched
        result = generate(downloading_client, prompt=prompt, seed=2)
        assert result["info"]["prompt"] == prompt
        for path in result["files"].values():
            assert Path(path).name.startswith("triplaneturbo-") and "passwd" not in path
    long_prompt = " ".join(["a very detailed wooden chair"] * 25)  # > 77 tokens, under 1000 characters
    truncated = generate(client, prompt=long_prompt, seed=2, texture="vertex")
    assert any("tokens long" in w for w in truncated["info"]["warnings"])
    assert not any("passwd" in p.name for p in app_server.output_dir.rglob("*"))


@pytest.mark.timeout(180)
def test_the_output_folder_stays_bounded(downloading_client, app_server):
    """More results than the budget holds: the folder stays within it, the oldest go, the newest stay.
    (Each result with all its downloads: about 6.6 MB at resolution 128, so the budget is passed in
    fewer generations than with the GLB alone, 1.3 MB.)"""
    client = downloading_client
    def entry_of(result) -> list[Path]:
        return [p.parent for p in app_server.output_dir.glob(f"files/*/{result['info']['files']['glb']}")]

    first = generate(client, prompt="a steam engine train, high resolution", seed=200, texture="vertex")
    (folder,) = entry_of(first)
    made = [first]
    for seed in range(201, 202 + app_server.max_bytes // folder_bytes(folder)):
        made.append(generate(client, prompt="a steam engine train, high resolution", seed=seed, texture="vertex"))
        assert folder_bytes(app_server.output_dir) <= app_server.max_bytes
    assert all(entry_of(r) for r in made[-2:]) and len(entries(app_server.output_dir)) >= 3  # the newest stay
    assert entry_of(first) == []  # the oldest went


def test_only_the_result_files_are_served(app_server):
    def status(path) -> int:
        try:
            with urllib.request.urlopen(app_server.url + "gradio_api/file=" + urllib.parse.quote(str(path))) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    generate(local_client(app_server.url, download_files=False), seed=31)  # at least one result, whatever ran before
    glb = next(app_server.output_dir.glob("files/*/*.glb"))
    assert status(glb) == 200
    record = next(app_server.output_dir.glob("records/*.json"))  # prompts and settings stay private
    for path in (record, app_server.output_dir / ".triplane-turbo-results", webapp.ASSETS.parent / "app.py",
                 app_server.output_dir / ".staging",
                 webapp.ASSETS / "examples.txt", Path("/etc/passwd"), app_server.log):
        assert status(path) == 403, path


@pytest.mark.timeout(120)
def test_nothing_is_written_outside_the_output_folder(app_server, tmp_path):
    client = local_client(app_server.url, str(tmp_path))  # its own results, downloads included
    for texture in ("uv", "vertex"):
        assert generate(client, prompt="a writing desk", seed=33, texture=texture)["info"]["cached"] is False
    assert generate(client, prompt="a writing desk", seed=33, texture="vertex")["info"]["cached"] is True
    assert list(app_server.workdir.iterdir()) == []
    mesh_suffixes = {".glb", ".obj", ".ply", ".stl", ".zip", ".png"}
    assert not [p for p in app_server.tmpdir.rglob("*") if p.suffix in mesh_suffixes]  # no copies in Gradio's cache


@pytest.mark.timeout(60)
def test_vertex_coloured_glbs_carry_normals(client):
    """Smooth shading in every viewer: the GLB holds NORMAL, not only positions and colours."""
    import json
    import struct

    result = generate(client, seed=14, texture="vertex")
    data = Path(result["glb"]).read_bytes()
    length = struct.unpack_from("<I", data, 12)[0]
    gltf = json.loads(data[20:20 + length])
    (primitive,) = gltf["meshes"][0]["primitives"]
    assert {"POSITION", "NORMAL", "COLOR_0"} <= set(primitive["attributes"])
    normals = glb_mesh(result["glb"]).vertex_normals
    assert np.allclose(np.linalg.norm(normals, axis=1), 1, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# A crowd: a hundred requests at once, while stored results and the page keep answering
# ---------------------------------------------------------------------------------------------
CROWD, CROWD_QUEUE, IDENTICAL = 100, APP_MAX_QUEUE, 4


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_crowd_of_a_hundred_gets_meshes_or_a_clear_busy_answer(app_server):
    """100 concurrent generate requests on the test server, which lets 8 wait for the GPU, four of them
    identical (sent a moment ahead) and the rest with distinct seeds: each gets a mesh or "busy, try
    again" (never a bare error), the identical ones one mesh made once; meanwhile a stored result and
    the page answer ahead of the requests waiting for the GPU; afterwards a fresh request works."""
    client = local_client(app_server.url, download_files=False)  # each GLB fetched (the other downloads: links)
    stored = generate(client, prompt="a stored lamp", seed=7, texture="vertex")
    seeds = [42] * IDENTICAL + [1000 + i for i in range(CROWD - IDENTICAL)]

    def submit(seed):
        return client.submit(prompt="a crowd of robots", seed=seed, randomize_seed=False, mesh_resolution=128,
                             texture="vertex", api_name="/generate")

    jobs = [submit(seed) for seed in seeds[:IDENTICAL]]
    try:
        wait_for_progress(jobs, "")  # let in before the rest
        jobs += [submit(seed) for seed in seeds[IDENTICAL:]]
        waiting = last_in_line(jobs)  # the crowd is queued: this one waits for the GPU behind others
        again = generate(client, prompt="a stored lamp", seed=7, texture="vertex")
        assert again["info"]["cached"] is True
        assert Path(again["glb"]).read_bytes() == Path(stored["glb"]).read_bytes()
        with urllib.request.urlopen(app_server.url, timeout=10) as page:
            assert page.status == 200 and b"TriplaneTurbo" in page.read()
        # both answered ahead of a request that was already waiting for the GPU: neither was queued
        # behind it (the queue is first come, first served)
        assert not waiting.done(), "a request queued before the stored one was answered first"
        meshes, busy, identical = 0, 0, []
        for seed, job in zip(seeds, jobs):
            try:
                glb, info, *_ = job.result(timeout=300)
                glb = fetched(glb)
                assert info["faces"] > 100 and Path(glb).is_file()
                meshes += 1
                if seed == 42:
                    identical.append((Path(glb).read_bytes(), info["cached"]))
            except ValidationError as exc:
                assert "busy" in str(exc) and "try again" in str(exc), str(exc)
                busy += 1
        assert meshes + busy == CROWD and meshes >= CROWD_QUEUE and busy > 0  # the bound, no fewer
        # identical requests: the same mesh, made once (the others found it stored: single flight)
        assert len(identical) == IDENTICAL and len({glb for glb, _ in identical}) == 1
        assert sum(not cached for _, cached in identical) == 1
        assert generate(client, prompt="after the crowd", seed=5, texture="vertex")["info"]["cached"] is False
    finally:  # the server is shared: nothing of the crowd is left running for the next test
        for job in jobs:
            job.cancel()


# ---------------------------------------------------------------------------------------------
# A sleeping Space waking up: the page answers before the model is loaded
# ---------------------------------------------------------------------------------------------
def wait_for_progress(jobs, text: str, timeout: float = 60) -> None:
    """Until every submitted job is in the server's queue (or past it) and one of them has reported a
    progress line starting with ``text``."""
    from gradio_client.utils import Status

    deadline, said = time.monotonic() + timeout, set()
    while True:
        statuses = [job.status() for job in jobs]
        said |= {unit.desc for status in statuses for unit in (status.progress_data or []) if unit.desc}
        queued = all(Status.ordering(status.code) >= Status.ordering(Status.IN_QUEUE) for status in statuses)
        if queued and any(line.startswith(text) for line in said):
            return
        assert time.monotonic() < deadline, f"no job said {text!r}: {said}, {[s.code for s in statuses]}"
        time.sleep(0.05)


def last_in_line(jobs, behind: int = 2, timeout: float = 120):
    """The submitted job furthest back in the server's queue, once one waits with at least ``behind``
    others ahead of it."""
    from gradio_client.utils import Status

    deadline = time.monotonic() + timeout
    while True:
        ranks = [(status.rank, job) for job in jobs
                 if (status := job.status()).code == Status.IN_QUEUE and status.rank is not None]
        if ranks and max(rank for rank, _ in ranks) >= behind:
            return max(ranks, key=lambda item: item[0])[1]
        assert time.monotonic() < deadline, f"no request waits behind {behind} others: {sorted(r for r, _ in ranks)}"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_requests_made_while_the_model_loads_wait_and_succeed(tmp_path_factory):
    """The page answers while the weights load; requests made meanwhile are told so, wait, and succeed."""
    with slow_app(tmp_path_factory, "cold-start") as server:
        client = local_client(server.url, download_files=False)  # each GLB fetched (the other downloads: links)
        jobs = [client.submit(prompt="a frog wearing a sweater", seed=seed, randomize_seed=False, mesh_resolution=128,
                              api_name="/generate") for seed in (3, 4, 3)]
        wait_for_progress(jobs, "Loading the model")  # they are told
        assert not any(job.done() for job in jobs) and "model ready" not in server.log.read_text()
        release(server, "load")
        results = [job.result(timeout=90) for job in jobs]  # they waited, and succeed
        assert all(info["faces"] > 100 for _, info, *_ in results)
        assert Path(fetched(results[0][0])).read_bytes() == Path(fetched(results[2][0])).read_bytes()


@pytest.mark.timeout(120)
def test_a_failed_load_is_a_clear_error_for_every_caller(tmp_path_factory):
    with slow_app(tmp_path_factory, "failed-start", fail="offline with nothing cached: run with --tiny") as server:
        client = local_client(server.url, str(server.tmpdir / "client"))
        jobs = [client.submit(prompt="a frog wearing a sweater", seed=seed, randomize_seed=False, mesh_resolution=128,
                              api_name="/generate") for seed in (1, 2, 3)]
        wait_for_progress(jobs, "Loading the model")  # all three are in before the load fails
        release(server, "load")
        for job in jobs:
            with pytest.raises(AppError, match="could not be loaded: offline with nothing cached: run with --tiny"):
                job.result(timeout=90)
        with pytest.raises(AppError, match="could not be loaded"):  # and later ones
            generate(client, seed=4)
