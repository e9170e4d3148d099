"""Shared test set-up: never touch the network; fixture paths; one tiny pipeline per session."""

import atexit
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported anywhere
if "GRADIO_TEMP_DIR" not in os.environ:  # before gradio is: it makes folders there when an app is built
    os.environ["GRADIO_TEMP_DIR"] = tempfile.mkdtemp(prefix="triplane-turbo-tests-gradio-")
    atexit.register(shutil.rmtree, os.environ["GRADIO_TEMP_DIR"], ignore_errors=True)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no version check or analytics calls from the tests
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # pytest-xdist's workers share the cores (set before torch loads)
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import logging  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

TESTS = Path(__file__).parent
FIXTURES = TESTS / "fixtures"
FIXTURE_A = FIXTURES / "fixture_a"


#: The test modules that take longest (each 35-130 s of a full run on the project's 2-core machine),
#: longest first. pytest-xdist hands whole modules out in collection order (``--dist loadscope
#: --no-loadscope-reorder``, in pyproject.toml); its default, most tests first, left the browser
#: module to start last and one worker idle for 40-50 s at the end.
#: test_soak.py first: its hundred requests in a row (one server of its own) are the longest test;
#: started last, the other worker sat idle for 95 s at the end. Then test_install.py: its first run
#: installs 5 GB (10 to 30 min), a later one takes 25-35 s.
LONGEST_MODULES = ("test_soak.py", "test_install.py", "test_browser.py", "test_training.py", "test_app.py",
                   "test_batch.py", "test_cli.py", "test_parity.py", "test_bench.py", "test_evaluate.py",
                   "test_pipeline.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module's order kept


@pytest.fixture(scope="session", autouse=True)
def temporary_files_under_pytest(tmp_path_factory):
    """Temporary files of this process and its subprocesses go under pytest's own folder: gradio_client
    leaves an empty folder in the system's temporary directory for every file it downloads."""
    folder = tmp_path_factory.mktemp("tempfile")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", str(folder))
        patch.setenv("TMPDIR", str(folder))
        yield folder


@pytest.fixture(scope="session")
def node_packages():
    """tests/.node, holding the npm packages pinned in tests/package.json: installed now with npm if
    they are not there yet (tests/node_packages.py); without Node or npm the test is skipped with the
    command that adds them."""
    from .node_packages import TARGET, ensure

    reason = ensure()
    if reason is not None:
        pytest.skip(reason)
    return TARGET


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random base model and adapter written in Hub layout: (base_dir, adapter_file)."""
    from triplane_turbo.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model_dir):
    """The tiny pipeline, loaded through the real from_pretrained (16x16 latents: fast on CPU; 256²
    textures unless a test asks for another size)."""
    from triplane_turbo import GenerationConfig, TriplaneTurboPipeline

    base_dir, adapter_file = tiny_model_dir
    pipe = TriplaneTurboPipeline.from_pretrained(str(base_dir), str(adapter_file),
                                                 config=GenerationConfig(latent_size=16, texture_size=256))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------
# The web app (tests/test_app.py, tests/test_browser.py): `python app.py --tiny` in a subprocess
# ---------------------------------------------------------------------------------------------
REPO = TESTS.parent
#: Side of the test servers' baked textures (the app's default is 1024; tests about texture sizes
#: set their own).
APP_TEXTURE_SIZE = 256
#: Output-folder budget of the test server: room for about eight tiny results at resolution 128
#: (each about 4.5 MB: GLB, OBJ zip, PLY and STL of ~40k faces).
APP_OUTPUT_MAX_BYTES = 40_000_000
#: Requests that may wait for the GPU on the test server: a bound that tests/test_app.py's crowd of a
#: hundred fills; no other test has more than three requests in flight.
APP_MAX_QUEUE = 8
#: Requests of one visitor that may wait for the GPU on the test servers: every test request comes
#: from one address (loopback), so here one visitor may fill the whole queue. Each visitor's share
#: (the app's default, 2) is tested on a server of its own (tests/test_operations.py).
APP_MAX_WAITING_PER_CLIENT = APP_MAX_QUEUE


@dataclass
class AppServer:
    url: str
    output_dir: Path  # TRIPLANE_TURBO_OUTPUT_DIR
    workdir: Path  # the server's current directory: must stay empty (slow_app: an empty folder, unused)
    tmpdir: Path  # its TMPDIR and GRADIO_TEMP_DIR live here (slow_app: a folder for the test's downloads)
    log: Path
    max_bytes: int
    texture_size: int = APP_TEXTURE_SIZE
    gates: dict = field(default_factory=dict)  # slow_app: what release() lets go on (threading.Event)
    pid: int | None = None  # the server's process (app_server; slow_app serves from the test's own)
    demo: object = None  # slow_app: the served gr.Blocks (its session state can be looked at)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_app(root: Path, command: list[str], ready: tuple[str, ...], extra_env: dict | None = None,
                python: str = sys.executable):
    """An app server in a subprocess of ``python`` (this one's by default), configured only through its
    environment, until the block ends.

    OMP_NUM_THREADS=1: on the 2-vCPU test machines torch's default two threads make the tiny
    model 3-5x slower than one thread (measured), and the app runs one generation at a time.
    """
    workdir, output_dir, tmpdir = root / "cwd", root / "outputs", root / "tmp"
    for folder in (workdir, tmpdir):
        folder.mkdir()
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1",
           "TRIPLANE_TURBO_OUTPUT_DIR": str(output_dir),
           "TRIPLANE_TURBO_OUTPUT_MAX_GB": str(APP_OUTPUT_MAX_BYTES / 1e9),
           "TRIPLANE_TURBO_MAX_QUEUE": str(APP_MAX_QUEUE),
           "TRIPLANE_TURBO_MAX_WAITING_PER_CLIENT": str(APP_MAX_WAITING_PER_CLIENT),
           "TRIPLANE_TURBO_TEXTURE_SIZE": str(APP_TEXTURE_SIZE),
           "TMPDIR": str(tmpdir), "GRADIO_TEMP_DIR": str(tmpdir / "gradio"), "GRADIO_ANALYTICS_ENABLED": "False",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": str(REPO), **(extra_env or {})}
    log = root / "server.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen([python, *command], cwd=workdir, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            text = log.read_text(errors="replace")
            if all(marker in text for marker in ready):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the app did not start (exit code {proc.poll()}):\n{text[-4000:]}")
            time.sleep(0.1)
        yield AppServer(f"http://127.0.0.1:{port}/", output_dir, workdir, tmpdir, log, APP_OUTPUT_MAX_BYTES,
                        pid=proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def app_server(tmp_path_factory):
    """`python app.py --tiny` on a free port, with its model loaded."""
    with running_app(tmp_path_factory.mktemp("app-server"), [str(REPO / "app.py"), "--tiny"],
                     ("Running on local URL", "model ready")) as server:
        yield server


#: A held server whose test never lets it go on (it failed first) is let go when the test ends; this
#: bounds a load or bake left waiting all the same.
LONGEST_HOLD_SECONDS = 600


@contextmanager
def slow_app(tmp_path_factory, name: str, fail: str = "", hold_load: bool = True, hold_bake: bool = False,
             max_waiting_per_client: int = APP_MAX_WAITING_PER_CLIENT):
    """The app's page (``app.build_demo`` on the tiny model, as ``app.py --tiny`` builds it) served from
    this process, whose model load (which then fails with ``fail``, if given) and/or texture bakes
    wait until the test calls ``release(server, "load" | "bake")``: handed out the moment the page
    answers. (In this process: a fresh one would import torch, diffusers and gradio again for each;
    ``python app.py`` itself is the ``app_server`` fixture.)"""
    from gradio.data_classes import _StaticFiles

    import app
    from triplane_turbo import WeightsNotAvailableError, tiny
    from triplane_turbo.mesher import TriplaneMesher
    from triplane_turbo.web import make_loader

    root = tmp_path_factory.mktemp(name)
    workdir, output_dir, tmpdir = root / "cwd", root / "outputs", root / "tmp"
    for folder in (workdir, tmpdir):
        folder.mkdir()
    gates = {"load": threading.Event(), "bake": threading.Event()}
    for what, hold in (("load", hold_load), ("bake", hold_bake)):
        if not hold:
            gates[what].set()
    tiny_pipeline, bake_textures = tiny.tiny_pipeline, TriplaneMesher.bake_textures

    def held_tiny_pipeline(*args, **kwargs):
        gates["load"].wait(LONGEST_HOLD_SECONDS)
        if fail:
            raise WeightsNotAvailableError(fail)
        return tiny_pipeline(*args, **kwargs)

    def held_bake_textures(*args, **kwargs):
        gates["bake"].wait(LONGEST_HOLD_SECONDS)
        return bake_textures(*args, **kwargs)

    log = root / "server.log"
    log_handler = logging.FileHandler(log)
    log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("triplane_turbo")
    level = logger.level
    demo = loader = None
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiny, "tiny_pipeline", held_tiny_pipeline)
        patch.setattr(TriplaneMesher, "bake_textures", held_bake_textures)
        # build_demo allows its output folder in gradio's global static paths: undone with the rest
        patch.setattr(_StaticFiles, "all_paths", list(_StaticFiles.all_paths))
        logger.addHandler(log_handler)
        logger.setLevel(logging.INFO)
        try:
            loader, bake_fields = make_loader(True, "cpu")
            demo = app.build_demo(loader, output_dir, tiny=True, max_bytes=APP_OUTPUT_MAX_BYTES,
                                  bake_fields=bake_fields, texture_size=APP_TEXTURE_SIZE,
                                  max_waiting_per_client=max_waiting_per_client)
            port = free_port()
            demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                        **app.launch_kwargs(demo))
            yield AppServer(f"http://127.0.0.1:{port}/", output_dir, workdir, tmpdir, log, APP_OUTPUT_MAX_BYTES,
                            gates=gates, demo=demo)
        finally:
            for gate in gates.values():  # nothing left waiting
                gate.set()
            if demo is not None:
                demo.close()
            if loader is not None:
                loader.wait(60)
            logger.removeHandler(log_handler)
            logger.setLevel(level)
            log_handler.close()


def release(server: AppServer, what: str) -> None:
    """Lets a ``slow_app`` server's model load (``"load"``) or its texture bakes (``"bake"``) go on."""
    server.gates[what].set()
