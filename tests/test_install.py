"""The README's install on the lowest Python that pyproject.toml declares (3.10, one of the two ZeroGPU
documents), in a virtual environment of its own; then the CLI and the app on the tiny model there.

The interpreter is pyenv's newest 3.10.x, else ``python3.10`` on the PATH; without either the test is
skipped with a message that names it. The environment lives in the user's cache (``$XDG_CACHE_HOME`` or ~/.cache, triplane-turbo/test-venvs:
outside the checkout, so that fresh clones on one machine share it), one
per interpreter version and hash of requirements.txt and pyproject.toml; environments of older hashes
are removed. A first run makes it with the README's install command, which needs PyPI: on Python 3.10
pip takes torch 2.11.0 from there, a CUDA build (PyPI has no CPU build; this machine's CPU wheel is
for 3.11 only): 2.7 GB of downloads, 5.2 GB in the environment. Measured on the project's 2-core
machine while other work kept it busy (load average 10 to 19): the whole first run 28 min; apart,
downloading the 2.7 GB took 92 s and installing them from disk 10 min (1m20 of it CPU; pip 23.0.1,
the one Python 3.10.13's venv brings). pip's own cache does not spare the downloads on
that machine: its registry proxy sends no caching headers, so pip stores nothing. A later run reuses
the environment (the install is not repeated; the package is installed editable, re-pointed with
``pip install --no-deps -e .`` when the run is from another checkout, so the code under test is this
checkout's) and runs the CLI, while the app starts, and the app: 36 to 66 s
measured (in two runs, as the machine's other work allowed).
TRIPLANE_TURBO_FRESH_INSTALL=1 makes a new environment all the same.
"""

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import trimesh
from packaging.requirements import Requirement

from .conftest import REPO, running_app
from .test_app import generate, glb_mesh, local_client

VENVS = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "triplane-turbo" / "test-venvs"
#: ZeroGPU's list of supported versions, torch and Python (hub-docs, docs/hub/spaces-zerogpu.md,
#: "Supported Versions", read at 242f4a1; docs/SPACE.md)
ZEROGPU_TORCH = ("2.8.0", "2.9.1", "2.10.0", "2.11.0")
ZEROGPU_PYTHON = ("3.10.13", "3.12.12")
#: The README's quick start: make a venv, activate it, install, launch (the launch is left out here).
README_INSTALL = re.compile(r"^python -m venv \.venv && \. \.venv/bin/activate && (pip install [^\n]*?)"
                            r" && python app\.py$", re.MULTILINE)



def lowest_python_version() -> tuple[int, int]:
    """The lowest Python pyproject.toml's requires-python admits, e.g. (3, 10)."""
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    major, minor = re.search(r'^requires-python = ">=(\d+)\.(\d+)"', text, re.MULTILINE).groups()
    return int(major), int(minor)


def find_interpreter(major: int, minor: int) -> Path | None:
    """pyenv's newest installed major.minor.x, else pythonMAJOR.MINOR on the PATH (if it runs)."""
    pyenv = shutil.which("pyenv")
    if pyenv:
        bare = subprocess.run([pyenv, "versions", "--bare"], capture_output=True, text=True).stdout.split()
        versions = [v for v in bare if re.fullmatch(rf"{major}\.{minor}\.\d+", v)]
        if versions:
            newest = max(versions, key=lambda v: tuple(map(int, v.split("."))))
            prefix = subprocess.run([pyenv, "prefix", newest], capture_output=True, text=True, check=True).stdout
            return Path(prefix.strip()) / "bin" / "python"
    found = shutil.which(f"python{major}.{minor}")
    if found and subprocess.run([found, "--version"], capture_output=True).returncode == 0:
        return Path(found)
    return None


def readme_install_command() -> str:
    """The pip part of the README's quick-start command (run inside the activated venv)."""
    match = README_INSTALL.search((REPO / "README.md").read_text(encoding="utf-8"))
    assert match, "the README's quick start no longer reads `python -m venv .venv && . .venv/bin/activate && " \
                  "pip install … && python app.py`: update this test with it"
    return match.group(1)


def clean_env(**extra: str) -> dict:
    """This process's environment without PYTHONPATH or an active venv: the package must come from the
    install."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def installed_venv(interpreter: Path) -> Path:
    """The environment for ``interpreter``, made with it and installed the README's way, or the one a
    previous run made for the same requirements and checkout."""
    version = subprocess.run([interpreter, "-c", "import platform; print(platform.python_version())"],
                             capture_output=True, text=True, check=True).stdout.strip()
    digest = hashlib.sha256()
    for name in ("requirements.txt", "pyproject.toml"):
        digest.update((REPO / name).read_bytes())
    venv = VENVS / f"py{version}-{digest.hexdigest()[:12]}"
    done = venv / "installed"  # the checkout it was installed from (-e .), once the install succeeded
    for stale in VENVS.glob(f"py{version}-*"):  # environments of older requirements: 5 GB each
        if stale != venv:
            shutil.rmtree(stale, ignore_errors=True)
    fresh = os.environ.get("TRIPLANE_TURBO_FRESH_INSTALL") == "1"
    if not fresh and done.is_file():
        if done.read_text(encoding="utf-8") != str(REPO):  # same requirements, another checkout: -e . here
            subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "-e", REPO],
                           env=clean_env(), check=True, capture_output=True)
            done.write_text(str(REPO), encoding="utf-8")
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([interpreter, "-m", "venv", venv], check=True)  # the README's `python -m venv .venv`
    install = subprocess.run(["bash", "-c", f'. "{venv}/bin/activate" && {readme_install_command()}'], cwd=REPO,
                             env=clean_env(), capture_output=True, text=True)
    assert install.returncode == 0, f"the README's install failed on Python {version}:\n{install.stdout[-3000:]}" \
                                    f"\n{install.stderr[-5000:]}"
    done.write_text(str(REPO), encoding="utf-8")
    return venv


def pinned_torch(python_version: str) -> str:
    """The torch release requirements.txt pins for a Python ("3.10.13"), its markers evaluated."""
    environment = {"python_version": ".".join(python_version.split(".")[:2]), "python_full_version": python_version}
    pins = []
    for line in (REPO / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            requirement = Requirement(line)
            if requirement.name == "torch" and (requirement.marker is None or requirement.marker.evaluate(environment)):
                pins.append(str(requirement.specifier))
    assert len(pins) == 1 and pins[0].startswith("=="), f"torch for Python {python_version}: {pins}"
    return pins[0][2:]


def test_the_space_python_and_its_torch_are_on_zerogpus_list():
    """The README's front matter names a Python ZeroGPU supports, and requirements.txt gives it a torch
    ZeroGPU supports (any other pair fails to build); Python 3.11, CI's, keeps this machine's CPU build."""
    front_matter = (REPO / "README.md").read_text(encoding="utf-8").split("---")[1]
    space_python = re.search(r'^python_version: "([\d.]+)"$', front_matter, re.MULTILINE).group(1)
    assert space_python in ZEROGPU_PYTHON
    for python in ZEROGPU_PYTHON:
        assert pinned_torch(python) in ZEROGPU_TORCH, python
    assert pinned_torch("3.11.7") == "2.13.0"
    sdk = re.search(r"^sdk_version: (\d+)\.", front_matter, re.MULTILINE).group(1)
    assert int(sdk) >= 4  # ZeroGPU: Gradio 4 and newer


@pytest.mark.slow
@pytest.mark.timeout(3600)  # a first run installs 5 GB
def test_the_readme_install_on_the_lowest_python_generates_from_the_cli_and_the_app(tmp_path_factory):
    major, minor = lowest_python_version()
    interpreter = find_interpreter(major, minor)
    if interpreter is None:
        pytest.skip(f"no Python {major}.{minor} here (neither pyenv's {major}.{minor}.x nor python{major}.{minor} "
                    f"on the PATH): the install on the lowest supported Python is not tested")
    venv = installed_venv(interpreter)
    python = venv / "bin" / "python"

    # The versions a Space on this Python would get: torch from ZeroGPU's list
    # (read from the installed distributions: importing torch and gradio here would take seconds more)
    versions = subprocess.run([python, "-c", "import sys, importlib.metadata as m; print(sys.version_info[:2], "
                               "m.version('torch'), m.version('gradio'))"], capture_output=True, text=True,
                              env=clean_env())
    assert versions.returncode == 0, versions.stderr
    assert versions.stdout.split()[:2] == [f"({major},", f"{minor})"], versions.stdout
    torch_version, gradio_version = versions.stdout.split()[2:]
    assert torch_version.split("+")[0] in ZEROGPU_TORCH and int(gradio_version.split(".")[0]) >= 4, versions.stdout

    # The CLI, from a folder of the user's own (while the app starts: both spend most of their time importing)
    home, cli_log = tmp_path_factory.mktemp("user"), tmp_path_factory.mktemp("cli") / "output.txt"
    # (a coarse grid and a small texture: what is tested is that it runs there, not its detail)
    command = [python, "-m", "triplane_turbo", "a chair", "--tiny", "-o", "x.glb", "--resolution", "64",
               "--texture-size", "256"]
    with open(cli_log, "wb") as sink, subprocess.Popen(command, cwd=home, env=clean_env(), stdout=sink,
                                                       stderr=subprocess.STDOUT) as cli:
        # The app, answering one generation through gradio_client (this process's)
        with running_app(tmp_path_factory.mktemp("app-on-lowest-python"), [str(REPO / "app.py"), "--tiny"],
                         ("Running on local URL", "model ready"), extra_env={"PYTHONPATH": ""},
                         python=str(python)) as server:
            client = local_client(server.url, str(tmp_path_factory.mktemp("downloads")))
            result = generate(client, prompt="a small wooden boat", seed=7)
        cli.wait(timeout=600)
    assert cli.returncode == 0, cli_log.read_text(errors="replace")[-3000:]
    mesh = glb_mesh(home / "x.glb")
    assert len(mesh.faces) > 100 and mesh.visual.material.baseColorTexture is not None
    assert result["seed"] == 7 and result["info"]["cached"] is False
    served = glb_mesh(result["glb"])
    assert isinstance(served, trimesh.Trimesh) and len(served.faces) > 100
