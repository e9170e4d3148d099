"""tests/node_packages.py: when the test session installs the pinned npm packages itself, and what it
says when it cannot. A fake ``npm`` (a shell script) stands in for the real one: no network."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

from .node_packages import ADD_NODE, MANIFEST, ensure, missing, pinned

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the fake npm is a shell script")

#: npm as far as the helper uses it: logs its arguments, then installs what the prefix's package.json
#: lists (each package a package.json with its version), or fails like an unreachable registry.
FAKE_NPM = """#!/bin/sh
echo "$@" >> "{log}"
{fail}
prefix="$3"
"{python}" - "$prefix" <<'PY'
import json, pathlib, sys
prefix = pathlib.Path(sys.argv[1])
for name, version in json.loads((prefix / "package.json").read_text())["dependencies"].items():
    (prefix / "node_modules" / name).mkdir(parents=True, exist_ok=True)
    (prefix / "node_modules" / name / "package.json").write_text(json.dumps({{"name": name, "version": version}}))
PY
"""
OFFLINE = 'echo "npm error code ENOTFOUND registry.npmjs.org" >&2; exit 1'


def tools(folder: Path, node: bool = True, npm: str | None = "", log: Path | None = None) -> str:
    """A PATH of only ``folder``, holding a fake ``node`` and a fake ``npm`` (failing with the shell
    line ``npm`` if not empty) as asked."""
    folder.mkdir()
    scripts = {}
    if node:
        scripts["node"] = "#!/bin/sh\nexit 0\n"
    if npm is not None:
        scripts["npm"] = FAKE_NPM.format(log=log, fail=npm, python=sys.executable)
    for name, text in scripts.items():
        (folder / name).write_text(text)
        (folder / name).chmod((folder / name).stat().st_mode | stat.S_IXUSR)
    return str(folder)


def poll(condition, seconds: float = 60) -> bool:
    """Whether ``condition()`` comes true within ``seconds`` (a bound on failure, not a wait)."""
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_the_versions_are_pinned_exactly_in_one_manifest():
    packages = pinned()
    assert set(packages) == {"gltf-validator", "mikktspace"}
    assert all(version[0].isdigit() for version in packages.values())  # exact, no ranges
    for script in ("gltf_validate.mjs", "mikktspace_reference.mjs"):  # the scripts load them from tests/.node
        assert './.node/node_modules/' in (MANIFEST.parent / script).read_text()


def test_missing_packages_are_installed_once_then_found(tmp_path):
    log, target = tmp_path / "npm.log", tmp_path / "node"
    path = tools(tmp_path / "bin", log=log)
    assert ensure(target, path=path) is None
    (call,) = calls(log)
    assert call.startswith(f"install --prefix {target} ")
    assert json.loads((target / "package.json").read_text()) == json.loads(MANIFEST.read_text())
    assert missing(target, pinned()) == []
    assert ensure(target, path=path) is None and len(calls(log)) == 1  # present: npm is not run again


def test_a_package_at_another_version_is_reinstalled(tmp_path):
    log, target = tmp_path / "npm.log", tmp_path / "node"
    path = tools(tmp_path / "bin", log=log)
    assert ensure(target, path=path) is None
    name, version = next(iter(pinned().items()))
    (target / "node_modules" / name / "package.json").write_text(json.dumps({"name": name, "version": "0.0.1"}))
    assert missing(target, pinned()) == [f"{name}@{version}"]
    assert ensure(target, path=path) is None and len(calls(log)) == 2
    assert missing(target, pinned()) == []


def test_without_npm_the_reason_says_how_to_add_it(tmp_path):
    target = tmp_path / "node"
    reason = ensure(target, path=tools(tmp_path / "bin", npm=None))
    assert reason is not None and reason.endswith(ADD_NODE) and "gltf-validator@" in reason
    assert not target.exists()  # nothing made
    reason = ensure(target, path=tools(tmp_path / "bare", node=False, npm=None))
    assert reason is not None and reason.startswith("needs Node.js") and reason.endswith(ADD_NODE)


def test_an_install_that_fails_is_a_skip_with_what_npm_said(tmp_path):
    log, target = tmp_path / "npm.log", tmp_path / "node"
    reason = ensure(target, path=tools(tmp_path / "bin", npm=OFFLINE, log=log))
    assert reason is not None and "ENOTFOUND" in reason and "could not install gltf-validator@" in reason
    assert len(calls(log)) == 1 and missing(target, pinned()) == list(f"{n}@{v}" for n, v in pinned().items())


def test_parallel_sessions_install_once(tmp_path, monkeypatch):
    """Two pytest-xdist workers needing the packages at once: the second waits for the first's install
    (the file lock) instead of running npm beside it."""
    import threading

    from . import node_packages

    log, target, go = tmp_path / "npm.log", tmp_path / "node", tmp_path / "go"
    # npm runs until the test lets it go on (bounded: 600 looks, 0.1 s apart)
    until_go = f'n=0; while [ ! -e "{go}" ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done'
    path = tools(tmp_path / "bin", log=log, npm=until_go)
    checked = {}
    check = node_packages.missing

    def recording_missing(*args):
        absent = check(*args)
        checked.setdefault(threading.current_thread().name, threading.Event()).set()
        return absent

    monkeypatch.setattr(node_packages, "missing", recording_missing)
    results = {}

    def worker(name):
        checked.setdefault(name, threading.Event())
        results[name] = ensure(target, path=path)

    first = threading.Thread(target=worker, args=("first",), name="first")
    first.start()
    assert poll(lambda: calls(log)), "the first worker never ran npm"  # it holds the lock now
    second = threading.Thread(target=worker, args=("second",), name="second")
    second.start()
    assert checked.setdefault("second", threading.Event()).wait(60)  # it has seen the packages missing
    go.touch()
    first.join(60), second.join(60)
    assert results == {"first": None, "second": None}
    assert len(calls(log)) == 1  # one install
