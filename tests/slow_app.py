"""`python app.py --tiny` made slow on purpose, for tests/test_app.py and tests/test_browser.py (not a
test module): a model that takes a while to load (and then fails, if asked) — the cold start of a
sleeping Space — and/or texture baking that takes a while, so the page can be watched mid-way.

Environment: SLOW_APP_SECONDS (extra load time), SLOW_APP_FAIL (a failure message, or empty),
SLOW_APP_BAKE_SECONDS (extra time per texture bake).
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


def slow_tiny_pipeline(*args, **kwargs):
    time.sleep(float(os.environ.get("SLOW_APP_SECONDS", "0")))
    if failure := os.environ.get("SLOW_APP_FAIL"):
        raise WeightsNotAvailableError(failure)
    return tiny_pipeline(*args, **kwargs)


def slow_bake_textures(*args, **kwargs):
    time.sleep(float(os.environ.get("SLOW_APP_BAKE_SECONDS", "0")))
    return bake_textures(*args, **kwargs)


tiny.tiny_pipeline = slow_tiny_pipeline
TriplaneMesher.bake_textures = slow_bake_textures
app.main(["--tiny"])
