"""`python app.py --tiny` held back on purpose, for tests/test_app.py and tests/test_browser.py (not a
test module): a model load (that then fails, if asked) — the cold start of a sleeping Space — and/or
texture bakes that wait until the test lets them go, so the page can be watched mid-way with nothing
left to timing.

Environment: SLOW_APP_LOAD_GATE, SLOW_APP_BAKE_GATE (a file path: the load / each bake waits until
that file exists; unset: no wait), SLOW_APP_FAIL (a failure message for the load, or empty).
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import app  # noqa: E402
from triplane_turbo import WeightsNotAvailableError, tiny  # noqa: E402
from triplane_turbo.mesher import TriplaneMesher  # noqa: E402

tiny_pipeline = tiny.tiny_pipeline
bake_textures = TriplaneMesher.bake_textures
#: A test that never opens a gate (it failed first) is ended by its fixture; this bounds a stray server.
LONGEST_WAIT_SECONDS = 600


def wait_for_gate(variable: str) -> None:
    if gate := os.environ.get(variable):
        deadline = time.monotonic() + LONGEST_WAIT_SECONDS
        while not Path(gate).exists() and time.monotonic() < deadline:
            time.sleep(0.02)


def held_tiny_pipeline(*args, **kwargs):
    wait_for_gate("SLOW_APP_LOAD_GATE")
    if failure := os.environ.get("SLOW_APP_FAIL"):
        raise WeightsNotAvailableError(failure)
    return tiny_pipeline(*args, **kwargs)


def held_bake_textures(*args, **kwargs):
    wait_for_gate("SLOW_APP_BAKE_GATE")
    return bake_textures(*args, **kwargs)


tiny.tiny_pipeline = held_tiny_pipeline
TriplaneMesher.bake_textures = held_bake_textures
app.main(["--tiny"])
