"""`python app.py --tiny` whose model takes a while to load (and then fails, if asked): the cold start
of a sleeping Space, for tests/test_app.py and tests/test_browser.py. Not a test module.

Environment: SLOW_APP_SECONDS (the extra load time), SLOW_APP_FAIL (a failure message, or empty).
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import app  # noqa: E402
from triplane_turbo import WeightsNotAvailableError, tiny  # noqa: E402

tiny_pipeline = tiny.tiny_pipeline


def slow_tiny_pipeline(*args, **kwargs):
    time.sleep(float(os.environ.get("SLOW_APP_SECONDS", "8")))
    if failure := os.environ.get("SLOW_APP_FAIL"):
        raise WeightsNotAvailableError(failure)
    return tiny_pipeline(*args, **kwargs)


tiny.tiny_pipeline = slow_tiny_pipeline
app.main(["--tiny"])
