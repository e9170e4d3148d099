"""The web app in a real browser: Debian's chromium, headless, driven by Playwright for Python.

Generates from the page, checks that the 3D view shows the mesh, downloads the GLB, and opens a
generation link. Screenshots go to test-artifacts/ (gitignored); a full-page screenshot is copied
to assets/screenshot.png for the README when that file is missing, or when
TRIPLANE_TURBO_UPDATE_SCREENSHOT=1 (so that test runs do not keep changing a tracked file).
"""

from __future__ import annotations

import io
import os
import shutil
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import trimesh

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
README_SCREENSHOT = REPO / "assets" / "screenshot.png"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LINK_FIELD = "#share-link textarea, #share-link input"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()


def wait_for_result(page, seed: int | None = None) -> str:
    """Waits until the link field holds a result's link (with ``seed`` if given); returns it."""
    wanted = f"seed={seed}&" if seed is not None else "seed="
    page.wait_for_function(
        "([sel, wanted]) => { const el = document.querySelector(sel); return el && el.value.includes(wanted); }",
        arg=[LINK_FIELD, wanted], timeout=90_000)
    return page.locator(LINK_FIELD).first.input_value()


def mesh_coverage(page, name: str, timeout: float = 30.0) -> float:
    """Fraction of the 3D canvas that differs from its background, once the mesh has been drawn."""
    from PIL import Image

    canvas = page.locator("#model3d canvas").first
    deadline, coverage = time.monotonic() + timeout, 0.0
    while time.monotonic() < deadline:
        png = canvas.screenshot(path=str(ARTIFACTS / f"{name}-canvas.png"))
        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
        corners = np.concatenate([pixels[:4, :4].reshape(-1, 3), pixels[-4:, -4:].reshape(-1, 3)])
        background = np.median(corners, axis=0)
        coverage = float((np.abs(pixels - background).max(axis=2) > 12).mean())
        if coverage > 0.03:
            break
        time.sleep(0.5)
    return coverage


@pytest.mark.timeout(150)
def test_generate_from_the_page(app_server, page):
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(app_server.url)
    page.wait_for_selector("#generate")
    assert "TriplaneTurbo" in page.locator("h1").first.inner_text()
    assert "meaningless" in page.locator("#tiny-banner").inner_text()
    assert "Running on CPU" in page.locator("#speed-note").inner_text()
    assert page.get_by_text("a raccoon astronaut holding his helmet").is_visible()
    assert page.locator("#randomize input").is_checked()

    page.locator("#prompt textarea, #prompt input").first.fill("a frog wearing a sweater")
    page.click("#generate")
    link = wait_for_result(page)
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(link).query)
    assert query["prompt"] == ["a frog wearing a sweater"] and query["resolution"] == ["160"]
    seed_field = page.locator("#seed input").first.input_value()
    assert seed_field == query["seed"][0]  # the seed actually used is written back

    coverage = mesh_coverage(page, "generate")
    assert coverage > 0.03, f"the 3D view shows {coverage:.1%} non-background pixels"
    page.screenshot(path=str(ARTIFACTS / "generate-page.png"), full_page=True)
    if not README_SCREENSHOT.exists() or os.environ.get("TRIPLANE_TURBO_UPDATE_SCREENSHOT") == "1":
        save_readme_screenshot(ARTIFACTS / "generate-page.png")

    with page.expect_download() as download_info:
        page.click("#download-glb")
    download = download_info.value
    assert download.suggested_filename.startswith("triplaneturbo-") and download.suggested_filename.endswith(".glb")
    path = ARTIFACTS / download.suggested_filename
    download.save_as(path)
    (geometry,) = trimesh.load_scene(path, process=False).geometry.values()
    assert len(geometry.faces) > 100 and np.asarray(geometry.visual.vertex_attributes["color"]).shape[1] == 4


@pytest.mark.timeout(120)
def test_a_generation_link_fills_the_inputs_and_renders(app_server, page):
    ARTIFACTS.mkdir(exist_ok=True)
    prompt = "a tiger dressed as a doctor"
    page.goto(app_server.url + "?" + urllib.parse.urlencode({"prompt": prompt, "seed": 1234, "resolution": 128}))
    link = wait_for_result(page, seed=1234)
    assert page.locator("#prompt textarea, #prompt input").first.input_value() == prompt
    assert page.locator("#seed input").first.input_value() == "1234"
    assert not page.locator("#randomize input").is_checked()
    assert "resolution=128" in link and link.startswith(app_server.url)
    coverage = mesh_coverage(page, "link")
    page.screenshot(path=str(ARTIFACTS / "link-page.png"), full_page=True)
    assert coverage > 0.03, f"the 3D view shows {coverage:.1%} non-background pixels"


def save_readme_screenshot(source: Path, limit: int = 500_000) -> None:
    """Copies a screenshot to assets/, shrunk (palette PNG, then smaller) until under ``limit`` bytes."""
    from PIL import Image

    shutil.copyfile(source, README_SCREENSHOT)
    image = Image.open(source).convert("RGB")
    while README_SCREENSHOT.stat().st_size > limit:
        image = image.resize((image.width * 4 // 5, image.height * 4 // 5), Image.LANCZOS)
        image.quantize(colors=256).save(README_SCREENSHOT, optimize=True)
