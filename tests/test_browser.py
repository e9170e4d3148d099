"""The web app in a real browser: Debian's chromium, headless, driven by Playwright for Python.

Generates from the page, checks that the 3D view shows the mesh (the vertex-coloured first look
while the texture bakes, then the textured one), downloads the GLB, opens generation links, the
history, variants and examples. Waits use Playwright's auto-waiting expectations. Screenshots go to
test-artifacts/ (gitignored); assets/screenshot.png (tracked, for the README) is rewritten only when
TRIPLANE_TURBO_UPDATE_SCREENSHOT=1.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
import urllib.parse
import zipfile
from pathlib import Path

import numpy as np
import pytest
import trimesh

import app as webapp
from triplane_turbo.web.store import DOWNLOADS

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
README_SCREENSHOT = REPO / "assets" / "screenshot.png"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LINK_FIELD = "#share-link textarea, #share-link input"
HISTORY_KEY = webapp.HISTORY_STORAGE["storage_key"]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)")]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    sync_api.expect.set_options(timeout=60_000)
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


#: The viewer's GLB once a result is stored (the first look, shown while the texture bakes and with
#: the result's link already, ends in -preview.glb).
STORED_GLB = r"/triplaneturbo-[0-9a-f]{12}\.glb$"


def wait_for_result(page, seed: int | None = None) -> str:
    """Waits until the link field holds a result's link (with ``seed`` if given) and the viewer holds
    a stored result's GLB, not the first look; returns the link."""
    wanted = f"seed={seed}&" if seed is not None else "seed="
    page.wait_for_function(
        "([sel, wanted, glb]) => { const el = document.querySelector(sel); const a = document.querySelector("
        "'#model3d a'); return el && el.value.includes(wanted) && a && new RegExp(glb).test(a.href); }",
        arg=[LINK_FIELD, wanted, STORED_GLB], timeout=90_000)
    return page.locator(LINK_FIELD).first.input_value()


def drawn_canvas(page, name: str, timeout: float = 30.0) -> tuple[np.ndarray, np.ndarray]:
    """The 3D canvas's pixels [H, W, 3] and the mask [H, W] of those that differ from its background,
    once more than 3% do (the mesh is drawn; the viewer swaps models asynchronously), or at the timeout."""
    from PIL import Image

    canvas = page.locator("#model3d canvas").first
    deadline = time.monotonic() + timeout
    while True:
        png = canvas.screenshot(path=str(ARTIFACTS / f"{name}-canvas.png"))
        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
        corners = np.concatenate([pixels[:4, :4].reshape(-1, 3), pixels[-4:, -4:].reshape(-1, 3)])
        covered = np.abs(pixels - np.median(corners, axis=0)).max(axis=2) > 12
        if covered.mean() > 0.03 or time.monotonic() > deadline:
            return pixels, covered
        time.sleep(0.5)


def mesh_coverage(page, name: str, timeout: float = 30.0) -> float:
    """Fraction of the 3D canvas that differs from its background, once the mesh has been drawn."""
    return float(drawn_canvas(page, name, timeout)[1].mean())


def mesh_saturation(page, name: str) -> float:
    """Mean HSV saturation of the canvas pixels the mesh covers, once it is drawn: a texture that failed
    to load shows the material's plain white (saturation ~0); the tiny model's texture is blues and greens."""
    pixels, covered = drawn_canvas(page, name)
    high, low = pixels.max(axis=2), pixels.min(axis=2)
    saturation = (high - low) / np.maximum(high, 1)
    return float(saturation[covered].mean()) if covered.any() else 0.0


@pytest.mark.timeout(180)
def test_generate_from_the_page(app_server, page):
    ARTIFACTS.mkdir(exist_ok=True)
    from playwright.sync_api import expect

    page.goto(app_server.url)
    expect(page.locator("h1").first).to_contain_text("TriplaneTurbo")
    expect(page.locator("#tiny-banner")).to_contain_text("meaningless")
    expect(page.locator("#speed-note")).to_contain_text("Running on CPU")
    expect(page.get_by_text("a raccoon astronaut holding his helmet")).to_be_visible()
    expect(page.locator("#randomize input")).to_be_checked()

    page.locator("#prompt textarea, #prompt input").first.fill("a frog wearing a sweater")
    page.click("#generate")
    link = wait_for_result(page)
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(link).query)
    assert query["prompt"] == ["a frog wearing a sweater"] and query["resolution"] == ["160"]
    seed_field = page.locator("#seed input").first.input_value()
    assert seed_field == query["seed"][0]  # the seed actually used is written back

    coverage = mesh_coverage(page, "generate")
    assert coverage > 0.03, f"the 3D view shows {coverage:.1%} non-background pixels"
    saturation = mesh_saturation(page, "generate")
    assert saturation > 0.2, f"the textured mesh looks grey (saturation {saturation:.2f})"
    page.screenshot(path=str(ARTIFACTS / "generate-page.png"), full_page=True)
    if os.environ.get("TRIPLANE_TURBO_UPDATE_SCREENSHOT") == "1":
        save_readme_screenshot(ARTIFACTS / "generate-page.png")

    with page.expect_download() as download_info:
        page.click("#download-glb")
    download = download_info.value
    assert download.suggested_filename.startswith("triplaneturbo-") and download.suggested_filename.endswith(".glb")
    path = ARTIFACTS / download.suggested_filename
    download.save_as(path)
    (geometry,) = trimesh.load_scene(path, process=False).geometry.values()
    size = app_server.texture_size
    assert len(geometry.faces) > 100 and geometry.visual.material.baseColorTexture.size == (size, size)
    # the other downloads are written on their first click: same mesh, and the OBJ zip with its texture
    stem = download.suggested_filename.removesuffix(".glb")
    for kind, name in (("obj", f"{stem}-obj.zip"), ("ply", f"{stem}.ply"), ("stl", f"{stem}.stl")):
        with page.expect_download() as download_info:
            page.click(f"#download-{kind}")
        other = download_info.value
        assert other.suggested_filename == name and other.failure() is None
        other.save_as(ARTIFACTS / name)
        if kind == "obj":
            with zipfile.ZipFile(ARTIFACTS / name) as archive:
                assert sorted(archive.namelist()) == [f"{stem}.mtl", f"{stem}.obj", f"{stem}.png"]
        else:
            assert len(trimesh.load(ARTIFACTS / name, force="mesh", process=False).faces) == len(geometry.faces)


@pytest.mark.timeout(150)
def test_a_generation_link_fills_the_inputs_and_renders(app_server, page):
    ARTIFACTS.mkdir(exist_ok=True)
    prompt = "a tiger dressed as a doctor"
    page.goto(app_server.url + "?" + urllib.parse.urlencode({"prompt": prompt, "seed": 1234, "resolution": 128}))
    link = wait_for_result(page, seed=1234)
    assert page.locator("#prompt textarea, #prompt input").first.input_value() == prompt
    assert page.locator("#seed input").first.input_value() == "1234"
    from playwright.sync_api import expect

    expect(page.locator("#randomize input")).not_to_be_checked()
    assert "resolution=128" in link and link.startswith(app_server.url)
    coverage = mesh_coverage(page, "link")
    page.screenshot(path=str(ARTIFACTS / "link-page.png"), full_page=True)
    assert coverage > 0.03, f"the 3D view shows {coverage:.1%} non-background pixels"
    # the same link again: answered from the store in one step, and still drawn
    page.goto(link)
    assert wait_for_result(page, seed=1234) == link
    assert mesh_coverage(page, "link-cached") > 0.03


@pytest.mark.timeout(180)
def test_a_link_opened_while_the_model_loads_ends_with_the_model(tmp_path_factory, page):
    """A shared link waking a sleeping Space: the page answers first; the request waits, then renders."""
    from playwright.sync_api import expect

    from .conftest import release, slow_app

    ARTIFACTS.mkdir(exist_ok=True)
    with slow_app(tmp_path_factory, "browser-cold-start") as server:
        page.goto(server.url + "?" + urllib.parse.urlencode({"prompt": "a lamp", "seed": 77, "resolution": 128}))
        expect(page.locator("#model-status")).to_contain_text("Requests made meanwhile wait", timeout=60_000)
        # the link's request is made and waits: its progress timer runs in the details box
        expect(page.locator("#details")).to_contain_text(re.compile(r"\d\.\ds"), timeout=60_000)
        assert "model ready" not in server.log.read_text()
        release(server, "load")
        link = wait_for_result(page, seed=77)
        assert "seed=77" in link
        coverage = mesh_coverage(page, "cold-start")
        page.screenshot(path=str(ARTIFACTS / "cold-start-page.png"), full_page=True)
        assert coverage > 0.03
        assert page.locator(".toast-body.error, .toast-wrap .error").count() == 0  # no error toast
        assert "Error" not in page.locator("#model3d").inner_text()


def on_first_screen(page, selector: str) -> float:
    """Fraction of the element's height inside the viewport as it is (no scrolling is done here)."""
    box = page.locator(selector).first.bounding_box()
    top, bottom = max(box["y"], 0.0), min(box["y"] + box["height"], page.viewport_size["height"])
    return max(0.0, bottom - top) / box["height"]


@pytest.mark.timeout(240)
def test_on_a_phone_a_shared_link_opens_on_the_mesh(app_server, browser):
    """390 x 844 with touch: once the linked result has arrived, the 3D view is on the first screen
    (the prompt and Generate above it), the downloads compact, the details short; at 1280 x 800 the
    form stays left of the viewer, both on the first screen."""
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(exist_ok=True)
    link = app_server.url + "?" + urllib.parse.urlencode({"prompt": "a lighthouse on a rock", "seed": 390,
                                                          "resolution": 128})
    phone = browser.new_context(viewport={"width": 390, "height": 844}, has_touch=True, is_mobile=True)
    try:
        page = phone.new_page()
        page.goto(link)
        wait_for_result(page, seed=390)
        expect(page.locator("#model3d canvas").first).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "phone-link-page.png"))
        assert page.evaluate("window.scrollY") == 0
        shown = on_first_screen(page, "#model3d")
        assert shown >= 0.8, f"{shown:.0%} of the 3D view is on a phone's first screen"
        assert mesh_coverage(page, "phone-link") > 0.03
        viewer = page.locator("#model3d").bounding_box()
        assert page.locator("#generate").bounding_box()["y"] < viewer["y"]  # a new prompt is at hand
        rows = {round(page.locator(f"#download-{kind}").bounding_box()["y"]) for kind in DOWNLOADS}
        assert len(rows) <= (len(DOWNLOADS) + 1) // 2, f"the {len(DOWNLOADS)} downloads take {len(rows)} rows"
        assert page.locator("#details").bounding_box()["height"] <= 200  # folded to a few lines
        assert page.locator("#details").bounding_box()["y"] > viewer["y"] + viewer["height"]
    finally:
        phone.close()
    desktop = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        page = desktop.new_page()
        page.goto(link)
        wait_for_result(page, seed=390)
        page.screenshot(path=str(ARTIFACTS / "desktop-link-page.png"))
        prompt, viewer = page.locator("#prompt").bounding_box(), page.locator("#model3d").bounding_box()
        assert prompt["x"] + prompt["width"] <= viewer["x"] and abs(prompt["y"] - viewer["y"]) < 10  # side by side
        assert on_first_screen(page, "#model3d") == 1.0 and viewer["height"] == 440
        assert page.locator("#details").bounding_box()["y"] > viewer["y"] + viewer["height"]
    finally:
        desktop.close()


def history_captions(page) -> list[str]:
    return page.locator("#history .caption-label").all_inner_texts()


def stored_history(page) -> str | None:
    """The browser's stored history (encrypted: a fresh random IV at every write)."""
    return page.evaluate("(key) => localStorage.getItem(key)", HISTORY_KEY)


def wait_until_stored(page, before: str | None) -> None:
    """Until the history stored in the browser differs from ``before``: BrowserState writes it after
    the page shows the change, and a reload in between would read the older history."""
    page.wait_for_function("([key, before]) => localStorage.getItem(key) !== before", arg=[HISTORY_KEY, before])


@pytest.mark.timeout(240)
def test_history_keeps_results_across_a_reload(app_server, page):
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(app_server.url)
    page.wait_for_selector("#generate")
    page.click("#clear-history")
    for seed in (41, 42):
        page.locator("#randomize input").set_checked(False)
        page.locator("#seed input").first.fill(str(seed))
        page.locator("#prompt textarea, #prompt input").first.fill("a wooden chair")
        before = stored_history(page)
        page.click("#generate")
        wait_for_result(page, seed=seed)
        page.wait_for_function("(n) => document.querySelectorAll('#history .caption-label').length >= n", arg=seed - 40)
        wait_until_stored(page, before)
    assert history_captions(page) == ["a wooden chair · seed 42", "a wooden chair · seed 41"]
    page.reload()
    page.wait_for_function("() => document.querySelectorAll('#history .caption-label').length >= 2")
    assert history_captions(page) == ["a wooden chair · seed 42", "a wooden chair · seed 41"]
    page.screenshot(path=str(ARTIFACTS / "history-page.png"), full_page=True)
    # opening an entry restores it (from the result store) into the viewer and the inputs
    page.locator("#history .thumbnail-item").nth(1).click()
    assert "seed=41" in wait_for_result(page, seed=41)
    assert page.locator("#seed input").first.input_value() == "41"
    # used again, it moves to the front: once the opening has finished (the link shows before that,
    # and a clear made in between would be followed by the re-opened entry)
    expect(page.locator("#history .caption-label")).to_have_text(["a wooden chair · seed 41",
                                                                  "a wooden chair · seed 42"])
    before = stored_history(page)
    page.click("#clear-history")
    page.wait_for_function("() => document.querySelectorAll('#history .caption-label').length == 0")
    wait_until_stored(page, before)
    # the history loads with the page: an event sends the stored history (the cleared one), and the
    # gallery shows the answer once that event is over (the gallery's status tracker hidden again)
    with page.expect_request(lambda r: "/gradio_api/queue/join" in r.url and '"entries"' in (r.post_data or "")) \
            as loading:
        page.reload()
    assert json.loads(loading.value.post_data)["data"] == [{"version": 1, "entries": []}]
    expect(page.locator("#model-status")).to_be_visible()
    expect(page.locator("#history [data-testid=status-tracker]")).to_have_class(re.compile(r"\bhide\b"))
    expect(page.locator("#history .caption-label")).to_have_count(0)


@pytest.mark.timeout(240)
def test_variants_open_in_the_viewer(app_server, page):
    page.goto(app_server.url)
    page.wait_for_selector("#generate")
    page.locator("#prompt textarea, #prompt input").first.fill("a teapot")
    page.get_by_text("Variants", exact=True).first.click()  # open the accordion
    page.locator("#randomize input").set_checked(False)
    page.locator("#seed input").first.fill("500")
    page.click("#make-variants")
    page.wait_for_function("() => document.querySelectorAll('#variants .caption-label').length == 4", timeout=120_000)
    assert page.locator("#variants .caption-label").all_inner_texts() == ["seed 500", "seed 501", "seed 502", "seed 503"]
    page.locator("#variants .thumbnail-item").nth(2).click()
    assert "seed=502" in wait_for_result(page, seed=502)
    page.screenshot(path=str(ARTIFACTS / "variants-page.png"), full_page=True)
    assert mesh_coverage(page, "variant") > 0.03


@pytest.mark.timeout(240)
def test_examples_are_stored_results_like_any_other(app_server, page):
    """An example runs with the example seed the first time and comes from the result store after."""
    page.goto(app_server.url)
    page.wait_for_selector("#generate")
    example = "a lion reading the newspaper"
    page.get_by_text(example, exact=True).click()
    wait_for_result(page, seed=0)
    from playwright.sync_api import expect

    # the event has ended once the history holds its result (a click on an example while its last
    # event still runs is dropped by Gradio, which starts an event once at a time)
    expect(page.locator("#history .caption-label").first).to_have_text(f"{example} · seed 0")
    records = sorted(p.name for p in (app_server.output_dir / "records").iterdir())
    page.locator("#prompt textarea, #prompt input").first.fill("something else")
    page.get_by_text(example, exact=True).click()
    page.wait_for_function("(p) => document.querySelector('#prompt textarea, #prompt input').value === p", arg=example)
    wait_for_result(page, seed=0)
    # the link and viewer were this result's already: the second answer is the one from the store
    expect(page.locator("#details")).to_contain_text(re.compile(r'"cached"\s*:\s*true'))
    assert sorted(p.name for p in (app_server.output_dir / "records").iterdir()) == records  # nothing made again
    assert not (app_server.output_dir / "examples").exists() and not list(app_server.workdir.iterdir())


@pytest.mark.timeout(240)
def test_the_vertex_coloured_mesh_is_drawn_while_the_texture_bakes(tmp_path_factory, page):
    """The first look is seen: while the texture bakes (held here until the test has looked), the
    viewer already draws the vertex-coloured mesh, uncovered by the progress display."""
    from playwright.sync_api import expect

    from .conftest import release, slow_app

    ARTIFACTS.mkdir(exist_ok=True)
    with slow_app(tmp_path_factory, "slow-bake", hold_load=False, hold_bake=True) as server:
        page.goto(server.url)
        page.wait_for_selector("#generate")
        page.locator("#prompt textarea, #prompt input").first.fill("a wooden chair")
        page.click("#generate")
        expect(page.locator("#details")).to_contain_text("baking the texture", timeout=90_000)
        coverage = mesh_coverage(page, "first-look")
        page.screenshot(path=str(ARTIFACTS / "first-look-page.png"), full_page=True)
        assert coverage > 0.03, f"while baking, the 3D view shows {coverage:.1%} non-background pixels"
        release(server, "bake")
        wait_for_result(page)
        # then the textured mesh: the viewer holds the result's GLB (not the first look's), and every
        # frame drawn over the next two seconds is coloured (a texture that failed to load shows
        # white; the first look and the textured mesh look alike, so one frame could be either)
        expect(page.locator("#model3d a").first).to_have_attribute("href", re.compile(STORED_GLB))
        for frame in range(4):
            assert mesh_saturation(page, "first-look-final") > 0.2, frame
            time.sleep(0.5)


def save_readme_screenshot(source: Path, limit: int = 500_000) -> None:
    """Copies a screenshot to assets/, shrunk (palette PNG, then smaller) until under ``limit`` bytes."""
    from PIL import Image

    shutil.copyfile(source, README_SCREENSHOT)
    image = Image.open(source).convert("RGB")
    while README_SCREENSHOT.stat().st_size > limit:
        image = image.resize((image.width * 4 // 5, image.height * 4 // 5), Image.LANCZOS)
        image.quantize(colors=256).save(README_SCREENSHOT, optimize=True)
