"""The result store's downloads written on demand, and its faults: a full disk while storing, a server
killed while writing. (Its folder rules and eviction are in tests/test_web.py; the downloads through
the live app in tests/test_app.py.)"""

from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
import zipfile
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
import trimesh
from starlette.applications import Starlette
from starlette.testclient import TestClient

from triplane_turbo import GenerationConfig, TriplaneTurboOutput, fileio
from triplane_turbo.export import FORMATS, encode_mesh
from triplane_turbo.web import GenerationService, Handlers, ModelLoader, ResultStore
from triplane_turbo.web.downloads import DownloadLink, download_routes
from triplane_turbo.web.service import DISK_FULL_MESSAGE
from triplane_turbo.web import store as store_module
from triplane_turbo.web.downloads import LinkDownloadButton
from triplane_turbo.web.meshsource import file_name
from triplane_turbo.web.store import DOWNLOADS

LAZY = [fmt for fmt in DOWNLOADS if fmt != "glb"]  # the app's downloads written on demand
ENCODABLE = [fmt for fmt in FORMATS if fmt != "glb"]  # what the store can write on demand


class StubPipe:
    """The networks: a coloured icosphere per seed (the texture is baked for real, from a zero triplane)."""

    revision, config = "stub", GenerationConfig()

    def __init__(self):
        from triplane_turbo.triplane import TriplaneFields

        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.fields = TriplaneFields(1, (4,))

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, prompts, *, seed, callback=None, **kwargs):
        sphere = trimesh.creation.icosphere(subdivisions=2)
        rng = np.random.default_rng(seed[0])
        sphere.visual.vertex_colors = rng.integers(0, 256, (len(sphere.vertices), 4), dtype=np.uint8)
        return TriplaneTurboOutput(meshes=[sphere.copy() for _ in seed], triplane=torch.zeros(len(seed), 6, 1, 2, 2),
                                   latents=None, seeds=list(seed), timings={"text": 0.0})


class Recorded:
    """Wraps ``store.save``: what each call was given (mesh, texture)."""

    def __init__(self, store: ResultStore):
        self.calls, self._save = [], store.save
        store.save = self

    def __call__(self, key, mesh, record, texture=None, preview=None):
        self.calls.append((key, mesh.copy(), texture))
        return self._save(key, mesh, record, texture, preview)


def make_handlers(root: Path, **store_options) -> Handlers:
    return Handlers(GenerationService(ModelLoader.loaded(StubPipe()), ResultStore(root, **store_options),
                                      texture_size=64))


def generate(handlers, seed=3, texture="uv", simplify=False):
    final = None
    for final in handlers.generate("a chair", seed, False, 128, False, simplify, 1000, texture,
                                   progress=lambda *a, **k: None):
        pass
    return final


def keys(store: ResultStore) -> list[str]:
    """The stored results' keys, least recently used first (not the first looks' folders)."""
    return [folder.name for _, _, folder in store.entries() if len(folder.name) == 32]


def entry_names(store: ResultStore, key: str) -> list[str]:
    return sorted(p.name.removeprefix(f"triplaneturbo-{key[:12]}") for p in (store.root / "files" / key).iterdir())


def zip_members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


# ---------------------------------------------------------------------------------------------
# Downloads written on demand
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("texture, simplify", [("uv", True), ("uv", False), ("vertex", False)])
def test_a_result_is_shown_with_its_glb_and_each_other_format_is_written_once_as_before(tmp_path, texture, simplify):
    handlers = make_handlers(tmp_path / "out")
    store = handlers.service.store
    saved = Recorded(store)
    outputs = generate(handlers, texture=texture, simplify=simplify)
    ((key, mesh, baked),) = saved.calls
    assert (baked is not None) == (texture == "uv") and (simplify == (baked is not None and baked.normal is not None))
    # shown: the GLB (its bytes as encoded today), the preview, the source; nothing else written
    assert entry_names(store, key) == sorted([".glb", "-preview.png", "-source.npz"])
    stem = f"triplaneturbo-{key[:12]}"
    assert Path(outputs[3]).read_bytes() == encode_mesh(mesh, "glb", stem, baked)[f"{stem}.glb"]
    links = dict(zip(DOWNLOADS, outputs[3:3 + len(DOWNLOADS)]))
    for fmt in LAZY:
        assert isinstance(links[fmt], DownloadLink) and links[fmt].url == f"download/{key}/{fmt}/{links[fmt].name}"
        assert outputs[1]["downloads"][fmt] == f"download/{key}/{fmt}" and outputs[1]["files"][fmt] == links[fmt].name
    for fmt in ENCODABLE:  # every format encode_mesh knows, offered by the app or not (yet)
        path = store.download(key, fmt)
        assert path.parent == store.root / "files" / key and path.name == file_name(stem, fmt)
        assert fmt not in links or path.name == links[fmt].name
        expected = encode_mesh(mesh, fmt, stem, baked)
        if fmt == "obj":  # a zip (its entries carry the time they were written): the same files
            assert zip_members(path.read_bytes()) == expected
            assert len(expected) == (3 if baked is not None else 1)
        else:
            assert path.read_bytes() == expected[f"{stem}.{fmt}"]
        written = path.stat()
        assert store.download(key, fmt) == path and path.stat().st_mtime_ns == written.st_mtime_ns  # kept, not rewritten
    assert entry_names(store, key) == sorted({".glb", "-preview.png", "-source.npz", "-obj.zip", ".ply", ".stl",
                                              *(file_name("", fmt) for fmt in ENCODABLE)})
    again = generate(handlers, texture=texture, simplify=simplify)  # a repeat: from the store
    assert again[1]["cached"] is True and len(saved.calls) == 1


def test_downloads_written_later_count_towards_the_budget_and_go_with_their_entry(tmp_path):
    handlers = make_handlers(tmp_path / "out")
    store = handlers.service.store
    generate(handlers, seed=1)
    (key,) = keys(store)
    size = {folder.name: size for _, size, folder in store.entries()}
    before = size[key]
    for fmt in LAZY:
        store.download(key, fmt)
    after = {folder.name: size for _, size, folder in store.entries()}[key]
    assert after > before + sum(store.paths(key)[fmt].stat().st_size for fmt in LAZY) - 1
    # a budget that held the entry as shown but not with its downloads: another entry is evicted for it
    generate(handlers, seed=2)
    store.max_bytes = (after + before + 1) / (1 - 0.02)
    store.thumb_bytes = store.max_bytes * 0.02
    (other,) = set(keys(store)) - {key}
    for fmt in LAZY:
        store.download(other, fmt)
    assert keys(store) == [other]
    assert store.load(key) is None and store.download(key, "ply") is None  # evicted: gone, not half there


def test_an_entry_of_the_earlier_eager_store_is_still_served(tmp_path):
    """Folders written before the downloads were lazy have every format and no source."""
    handlers = make_handlers(tmp_path / "out")
    store = handlers.service.store
    generate(handlers)
    (key,) = keys(store)
    for fmt in LAZY:
        store.download(key, fmt)
    store.paths(key)["source"].unlink()
    assert ResultStore(store.root).load(key) is not None
    assert store.download(key, "stl") == store.paths(key)["stl"]


def test_the_download_route_writes_on_first_request_then_serves(tmp_path):
    handlers = make_handlers(tmp_path / "out")
    store = handlers.service.store
    outputs = generate(handlers)
    (key,) = keys(store)
    client = TestClient(Starlette(routes=download_routes(store)))
    for fmt in LAZY:
        assert not store.paths(key)[fmt].exists()
        response = client.get(f"/download/{key}/{fmt}")
        assert response.status_code == 200 and response.content == store.paths(key)[fmt].read_bytes()
        assert f'filename="{store.paths(key)[fmt].name}"' in response.headers["content-disposition"]
        named = client.get("/" + outputs[3 + DOWNLOADS.index(fmt)].url)
        assert named.status_code == 200 and named.content == response.content
    assert client.get(f"/download/{key}/stl/other-name.stl").status_code == 404
    assert client.get(f"/download/{key}/exe").status_code == 404
    assert client.get(f"/download/{'0' * 32}/ply").status_code == 404
    assert "no longer stored" in client.get(f"/download/{'0' * 32}/ply").text


def test_the_download_button_hands_gradio_the_link(tmp_path):
    button = LinkDownloadButton("Download PLY")
    data = button.postprocess(DownloadLink("http://127.0.0.1:7860/download/k/ply/a.ply", "a.ply"))
    assert (data.path, data.url, data.orig_name) == ("http://127.0.0.1:7860/download/k/ply/a.ply",) * 2 + ("a.ply",)
    assert button.get_block_name() == "downloadbutton" and isinstance(button, gr.DownloadButton)
    glb = tmp_path / "a.glb"
    glb.write_bytes(b"glTF")
    assert button.postprocess(str(glb)).path == str(glb)


# ---------------------------------------------------------------------------------------------
# A full disk while storing
# ---------------------------------------------------------------------------------------------
def no_partial_entry(store: ResultStore) -> None:
    assert [p.name for p in (store.root / "files").iterdir() if len(p.name) == 32] == []
    assert list((store.root / "records").iterdir()) == [] and list((store.root / ".staging").iterdir()) == []
    assert not list(store.root.rglob("*.tmp"))


@pytest.mark.parametrize("failing", ["glb", "preview", "source", "record"])
def test_a_full_disk_while_storing_is_a_clear_message_and_leaves_no_entry(tmp_path, monkeypatch, failing):
    """Injected ENOSPC at each write of ``save``; the next request works once space is back."""
    from PIL import Image

    handlers = make_handlers(tmp_path / "out")
    store = handlers.service.store
    real_write_bytes, real_write_atomic, real_image_save = Path.write_bytes, store_module.write_atomic, Image.Image.save
    full = {"on": True}

    def write_bytes(path, data):
        if full["on"] and (failing == "glb" and path.suffix == ".glb" or failing == "source" and path.suffix == ".npz"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write_bytes(path, data)

    def write_atomic(path, data, *args):
        if full["on"] and failing == "record" and Path(path).parent.name == "records":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write_atomic(path, data, *args)

    def save_image(self, fp, *args, **kwargs):
        if full["on"] and failing == "preview":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_image_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    monkeypatch.setattr("triplane_turbo.web.store.write_atomic", write_atomic)
    monkeypatch.setattr(Image.Image, "save", save_image)
    with pytest.raises(gr.Error, match="disk is full"):
        generate(handlers, texture="vertex")
    no_partial_entry(store)
    full["on"] = False
    assert generate(handlers, texture="vertex")[1]["cached"] is False


def test_a_full_disk_while_writing_a_download_answers_507_and_leaves_no_partial_file(tmp_path, monkeypatch):
    handlers = make_handlers(tmp_path / "out")
    store = handlers.service.store
    generate(handlers)
    (key,) = keys(store)

    def full(path, data, mode=0o644):  # the real write, into a disk that fills up half-way
        with fileio.atomic_path(path, mode) as tmp:
            tmp.write_bytes(data[:100])
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(store_module, "write_atomic", full)
    client = TestClient(Starlette(routes=download_routes(store)))
    response = client.get(f"/download/{key}/ply")
    assert response.status_code == 507 and "disk is full" in response.text
    assert not store.paths(key)["ply"].exists() and not list(store.root.rglob("*.tmp"))
    monkeypatch.undo()
    assert client.get(f"/download/{key}/ply").status_code == 200


def mount_tmpfs(folder: Path, size: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (the injected ENOSPC tests cover the rest)")
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"mount is not permitted here: {done.stderr.strip()}")


def test_a_real_full_disk_gives_a_clear_message_and_the_app_recovers_when_space_is_back(tmp_path):
    """A 3 MB tmpfs, filled up by a ballast file: a result does not fit until the ballast goes."""
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "3m")
    try:
        handlers = make_handlers(disk / "out")
        store = handlers.service.store
        ballast = disk / "ballast"
        with open(ballast, "wb", buffering=0) as handle:  # fill the disk up
            with pytest.raises(OSError) as filled:
                while True:
                    handle.write(b"\0" * 4096)
            assert filled.value.errno == errno.ENOSPC
        with pytest.raises(gr.Error, match="disk is full") as raised:
            generate(handlers)
        assert DISK_FULL_MESSAGE in str(raised.value)
        no_partial_entry(store)
        ballast.unlink()  # space is back
        outputs = generate(handlers)
        assert outputs[1]["cached"] is False and len(keys(store)) == 1
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# ---------------------------------------------------------------------------------------------
# A server killed while writing
# ---------------------------------------------------------------------------------------------
def store_then_hold(root: Path, point: str, hold) -> None:
    """What the killed server does: stores a result and calls ``hold()`` (which never returns) at the
    chosen point of the writing."""
    store = ResultStore(root)
    mesh = trimesh.creation.icosphere(subdivisions=3)
    mesh.visual.vertex_colors = np.full((len(mesh.vertices), 4), 200, np.uint8)
    preview = np.zeros((8, 8, 3), np.uint8)
    key = ResultStore.key(n=1)
    real_write_atomic = store_module.write_atomic
    if point == "staged":  # every file of the entry written, not yet in place
        store_module.os.replace = lambda *a: hold()
    elif point == "renamed":  # the files in place, the record not written
        store_module.write_atomic = lambda path, data: hold() if Path(path).parent.name == "records" else \
            real_write_atomic(path, data)
    elif point == "download":  # the entry stored; a download half-written into its temporary file
        store.save(key, mesh, {}, None, preview)

        def fsync(fd):
            os.ftruncate(fd, 1000)
            hold()

        fileio.os.fsync = fsync
        store.download(key, "ply")
    store.save(key, mesh, {}, None, preview)


def forked_writer(root: Path, point: str) -> int:
    """A process that runs ``store_then_hold`` and waits, once it holds, to be killed: a fork of this
    one (it has the store's modules imported already; a fresh interpreter spent about 4 s of CPU
    importing them). Returns its pid once it holds; what it said instead if it ended first fails the
    test. The child never returns into pytest: it only leaves through ``os._exit``."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.close(read_end)

            def hold():
                os.write(write_end, b"ready\n")
                while True:  # until SIGKILL
                    signal.pause()

            store_then_hold(root, point, hold)
            os.write(write_end, b"stored without holding\n")
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the test
            os.write(write_end, f"{type(exc).__name__}: {exc}\n".encode())
        finally:
            os._exit(1)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as said:
        line = said.readline().decode()  # blocks until the child holds (or ends: then it says why)
    if line != "ready\n":
        os.waitpid(pid, 0)
        pytest.fail(f"the writer did not hold: {line}")
    return pid


@pytest.mark.parametrize("point", ["staged", "renamed", "download"])
def test_a_server_killed_while_writing_leaves_no_half_written_result(tmp_path, point):
    root = tmp_path / "out"
    pid = forked_writer(root, point)
    try:
        left = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    finally:
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    key = ResultStore.key(n=1)
    if point == "staged":
        assert any(name.startswith(".staging/") for name in left)
    elif point == "renamed":
        assert f"files/{key}" in {str(Path(n).parent) for n in left} and f"records/{key}.json" not in left
    else:
        assert any(name.startswith(f"files/{key}/.") and name.endswith(".tmp") for name in left)
    store = ResultStore(root)  # the server started again
    assert list((root / ".staging").iterdir()) == [] and not list(root.rglob("*.tmp"))
    if point == "download":  # the entry was complete: still served; the half download is gone, written anew
        assert store.load(key) is not None and not store.paths(key)["ply"].exists()
        assert trimesh.load(store.download(key, "ply"), force="mesh").faces.shape == (1280, 3)
    else:
        assert store.load(key) is None and not (root / "files" / key).exists()
        assert not (root / "records" / f"{key}.json").exists()
        mesh = trimesh.creation.icosphere(subdivisions=1)
        store.save(key, mesh, {}, None, np.zeros((8, 8, 3), np.uint8))  # usable
        assert store.load(key) is not None
