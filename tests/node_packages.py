"""The npm packages that some tests run under Node: the Khronos glTF validator (tests/gltf_validate.mjs)
and the MikkTSpace reference (tests/mikktspace_reference.mjs).

Their versions are pinned, exactly, in tests/package.json (the one place they are written). The first
test that needs them installs them into tests/.node (ignored by git) with npm; later sessions find them
there and touch no network. Parallel pytest-xdist workers take turns through a file lock, so one
installs and the others find the result. Without Node and npm the tests are skipped with the command
that adds them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

TESTS = Path(__file__).parent
MANIFEST = TESTS / "package.json"
TARGET = TESTS / ".node"
#: What a Debian or Ubuntu machine lacks for these tests (npm's own install then does the rest).
ADD_NODE = "apt-get install nodejs npm"
#: Seconds npm may take for the install: two small packages, so anything near this is a stuck network.
INSTALL_TIMEOUT = 300


def pinned(manifest: Path = MANIFEST) -> dict[str, str]:
    """{package: exact version} from the manifest."""
    return json.loads(manifest.read_text())["dependencies"]


def missing(target: Path, packages: dict[str, str]) -> list[str]:
    """``name@version`` of each package not installed under ``target`` at its pinned version."""
    absent = []
    for name, version in packages.items():
        try:
            installed = json.loads((target / "node_modules" / name / "package.json").read_text()).get("version")
        except (OSError, ValueError):
            installed = None
        if installed != version:
            absent.append(f"{name}@{version}")
    return absent


def ensure(target: Path = TARGET, manifest: Path = MANIFEST, path: str | None = None) -> str | None:
    """None once Node and every pinned package under ``target`` are there (installing the packages
    with npm if they are not), else why not: a skip reason naming the command that fixes it.

    ``path`` is the PATH to look for ``node`` and ``npm`` on (default: this process's).
    """
    packages = pinned(manifest)
    node, npm = shutil.which("node", path=path), shutil.which("npm", path=path)
    if node is None:
        return f"needs Node.js to run the npm packages {', '.join(packages)}: {ADD_NODE}"
    if not missing(target, packages):
        return None
    if npm is None:
        return f"needs npm to install {', '.join(missing(target, packages))} into {target}: {ADD_NODE}"
    from filelock import FileLock

    target.mkdir(parents=True, exist_ok=True)
    with FileLock(target / ".install.lock"):
        absent = missing(target, packages)  # another worker may have installed them while this one waited
        if not absent:
            return None
        shutil.copyfile(manifest, target / "package.json")  # npm installs what the prefix's manifest lists
        command = [npm, "install", "--prefix", str(target), "--no-audit", "--no-fund", "--loglevel=error",
                   "--fetch-retries=1"]
        env = dict(os.environ, PATH=path) if path is not None else None
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, env=env)
            said = (out.stderr or out.stdout).strip()
        except subprocess.TimeoutExpired:
            said = f"no answer in {INSTALL_TIMEOUT} s"
        still = missing(target, packages)
        if still:
            tail = "\n".join(said.splitlines()[-5:])
            return (f"could not install {', '.join(still)} into {target} (is the npm registry reachable? the "
                    f"next test session tries again); npm said: {tail}")
    return None
