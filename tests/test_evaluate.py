"""The paper's evaluation (issue 20): metrics against a direct computation, the authors' cameras and
pictures, resuming, several processes, comparing two runs, and awkward prompts, on tiny random models
(the generator and a CLIP built offline with the project's tokenizer)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from triplane_turbo import evaluate as evaluate_cli
from triplane_turbo.batch import read_records
from triplane_turbo.evaluation import (ClipScorer, EvalSettings, ViewMesh, clip_metrics, clip_text, compare_runs,
                                       evaluate_pipeline, read_eval_prompts, render_views)
from triplane_turbo.evaluation import views as views_module
from triplane_turbo.export import export_mesh
from triplane_turbo.texturing.raster import rasterize
from triplane_turbo.tiny import write_tiny_clip
from triplane_turbo.texturing.antialias import antialias

from .conftest import free_port

REPO = Path(__file__).resolve().parents[1]
#: Small, fast settings for the end-to-end tests (the protocol's cameras, smaller grids and pictures).
FAST = dict(mesh_resolution=40, image_size=64)
AWKWARD = ["a wooden chair", "a beagle in a detective's outfit", "a lion's mane jellyfish, highly detailed.",
           "一只戴帽子的猫"]



@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return ClipScorer.from_pretrained(write_tiny_clip(tmp_path_factory.mktemp("clip")), name="tiny")


# -------------------------------------------------------------------------------------------------
# Metrics
# -------------------------------------------------------------------------------------------------

def direct(images: np.ndarray, texts: np.ndarray, targets: np.ndarray, k: int) -> tuple[float, float]:
    """C.S. and R@k written out: 2.5·max(cos, 0) per view; a view is a hit when fewer than k other
    texts score at least as high as its own."""
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    cos = unit(images) @ unit(texts).T
    score = 2.5 * np.maximum(cos, 0)
    own = score[np.arange(len(targets)), targets]
    hits = [sum(score[n, j] >= own[n] for j in range(len(texts)) if j != targets[n]) < k for n in range(len(targets))]
    return float(own.mean() * 100), float(np.mean(hits) * 100)


def test_clip_score_and_recall_equal_a_direct_computation():
    rng = np.random.default_rng(0)
    texts = rng.normal(size=(7, 16))
    targets = np.repeat(np.arange(7), 4)  # four views per prompt
    # views whose features are their own prompt's (at any scale): every view finds its prompt
    own = clip_metrics(texts[targets] * rng.uniform(0.5, 3, (28, 1)), texts, targets)
    assert own.recall[1] == 100 and own.recall[5] == 100 and np.all(own.ranks == 1)
    assert own.clip_score == pytest.approx(250, abs=1e-9)  # 2.5 · cos 1 · 100
    # a cyclic shift: every view carries the next prompt's features, so none finds its own
    shifted = clip_metrics(texts[(targets + 1) % 7], texts, targets)
    assert shifted.recall[1] == 0
    expected_cs, expected_r5 = direct(texts[(targets + 1) % 7], texts, targets, 5)
    assert shifted.clip_score == pytest.approx(expected_cs, abs=1e-9) and shifted.recall[5] == expected_r5
    # anything in between, against the formula written out
    images = texts[targets] + rng.normal(scale=1.2, size=(28, 16))
    mixed = clip_metrics(images, texts, targets)
    for k in (1, 5):
        cs, recall = direct(images, texts, targets, k)
        assert mixed.clip_score == pytest.approx(cs, abs=1e-9) and mixed.recall[k] == pytest.approx(recall)
    assert 0 < mixed.recall[1] < 100


def test_ties_count_as_misses_whatever_the_order():
    texts = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    images = np.array([[-1.0, -1.0], [-1.0, -1.0], [1.0, 0.1]])  # both negative: every text scores 0
    for order in ([0, 1, 2], [2, 1, 0]):
        m = clip_metrics(images, texts[order], [order.index(0), order.index(1), order.index(0)])
        assert list(m.ranks) == [3, 3, 1] and m.recall[1] == pytest.approx(100 / 3)
        assert m.clip_score == pytest.approx(2.5 * (1 / math.hypot(1, 0.1)) * 100 / 3)


def test_texts_and_the_authors_quirks():
    prompt = "a lion's mane jellyfish, highly detailed."
    assert clip_text(prompt, EvalSettings()) == "A photo depicts a lion's mane jellyfish, highly detailed."
    quirks = EvalSettings.authors()
    assert clip_text(prompt, quirks) == "A photo depictsa lion's mane jellyfish highly detailed"
    assert clip_text("an old_fashioned clock", quirks) == "A photo depictsan old fashioned clock"
    with pytest.raises(ValueError, match="prompt"):
        EvalSettings(text_template="no placeholder")


def test_prompt_files_and_the_authors_library(tmp_path):
    library = tmp_path / "dreamfusion.json"
    library.write_text(json.dumps({"train": ["x"], "val": ["y"], "test": ["a chair", "  a\tlamp ", "", "x" * 1200]}))
    lines = read_eval_prompts(library)
    assert [(i.line, i.prompt, i.error is None) for i in lines[:3]] == [(1, "a chair", True), (2, "a lamp", True),
                                                                       (3, "", False)]
    assert "1200 characters" in lines[3].error
    text = tmp_path / "p.txt"
    text.write_text("a chair\n\na lamp\n", encoding="utf-8")
    assert [(i.line, i.prompt) for i in read_eval_prompts(text)] == [(1, "a chair"), (3, "a lamp")]
    bad = tmp_path / "x.json"
    bad.write_text('{"train": []}')
    with pytest.raises(ValueError, match="'test'"):
        read_eval_prompts(bad)


def test_clip_preprocessing_is_pil_bicubic_centre_crop_and_clip_normalisation(tiny_clip):
    image = np.random.default_rng(1).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    pixels = tiny_clip.processor(images=[Image.fromarray(image)], return_tensors="np")["pixel_values"][0]
    resized = np.asarray(Image.fromarray(image).resize((298, 224), Image.BICUBIC), dtype=np.float32) / 255
    crop = resized[:, 37:261]  # the shortest side to 224 (298 = int(128·224/96)), the centre 224 columns
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    np.testing.assert_allclose(pixels, ((crop - mean) / std).transpose(2, 0, 1), atol=1e-5)


# -------------------------------------------------------------------------------------------------
# The pictures
# -------------------------------------------------------------------------------------------------

COLOURS = {"+x": (0, 0, 255), "-x": (255, 255, 0), "+y": (255, 0, 0), "-y": (0, 255, 255), "+z": (0, 255, 0),
           "-z": (255, 0, 255), "bump": (255, 128, 0)}


def coloured_box(low, high, colours: dict) -> trimesh.Trimesh:
    """A box in the MODEL frame, each face one colour (vertices split per face)."""
    box = trimesh.creation.box(bounds=[low, high])
    box = trimesh.Trimesh(box.vertices[box.faces].reshape(-1, 3), np.arange(len(box.faces) * 3).reshape(-1, 3),
                          process=False)
    normals = box.face_normals
    face_colour = np.zeros((len(box.faces), 4), np.uint8)
    for axis, name in enumerate("xyz"):
        for sign in (1, -1):
            face_colour[normals[:, axis] * sign > 0.5] = (*colours[f"{'+' if sign > 0 else '-'}{name}"], 255)
    box.visual.vertex_colors = np.repeat(face_colour, 3, axis=0)
    return box


def rendered(mesh: trimesh.Trimesh, tmp_path: Path, **settings) -> np.ndarray:
    """The protocol's views of a model-frame mesh, through an exported OBJ, as the evaluation sees it."""
    path = export_mesh(mesh, tmp_path / "mesh.obj")
    return render_views(ViewMesh.load(path), EvalSettings(**settings)).rgb


def share(view: np.ndarray, colour) -> float:
    return float((np.abs(view.astype(int) - colour).max(-1) <= 2).mean())


def test_camera_conventions_match_the_protocol(tmp_path):
    # a box with six colours and, on its front (model +y) face, an orange bump on the model's +x side
    box = coloured_box([-0.5, -0.5, -0.5], [0.5, 0.5, 0.5], COLOURS)
    bump = coloured_box([0.2, 0.5, -0.1], [0.4, 0.62, 0.1], {k: COLOURS["bump"] for k in COLOURS})
    views = rendered(trimesh.util.concatenate([box, bump]), tmp_path, image_size=128)
    assert views.shape == (4, 128, 128, 3) and views.dtype == np.uint8
    front, right, back, left = views
    # azimuth 0 faces the model's +y side (the authors' --front_dir +y), 90 its +x side, and so on
    for view, face, hidden in ((front, "+y", "-y"), (right, "+x", "-x"), (back, "-y", "+y"), (left, "-x", "+x")):
        assert share(view, COLOURS[face]) > 0.15 and share(view, COLOURS[hidden]) == 0
        assert share(view, COLOURS["-z"]) == 0  # the bottom is never seen from above
    # from 15° up the front face's upper edge is nearer than its lower one: wider on screen
    rows, cols = np.nonzero(np.abs(front.astype(int) - COLOURS["+y"]).max(-1) <= 2)
    assert np.ptp(cols[rows == rows.min()]) > np.ptp(cols[rows == rows.max()]) + 4
    # the y/z swap is a mirror: the bump on the model's +x side shows on the right of the front view
    columns = np.nonzero(np.abs(front.astype(int) - COLOURS["bump"]).max(-1) <= 2)[1]
    assert len(columns) > 10 and columns.min() > 64

    # a flat slab (its top well below the camera's height of 3·sin 15° ≈ 0.78): the top (model +z)
    # shows in every view, above the side facing the camera, foreshortened; the bottom never does
    slab = rendered(coloured_box([-0.5, -0.5, -0.15], [0.5, 0.5, 0.15], COLOURS), tmp_path, image_size=128)
    for view, face in zip(slab, ("+y", "+x", "-y", "-x")):
        top = np.nonzero(np.abs(view.astype(int) - COLOURS["+z"]).max(-1) <= 2)[0]
        side = np.nonzero(np.abs(view.astype(int) - COLOURS[face]).max(-1) <= 2)[0]
        assert 0.05 < share(view, COLOURS["+z"]) and share(view, COLOURS["-z"]) == 0
        assert top.max() <= side.min() + 1 and len(side) > 100


def project(points: np.ndarray, azimuth: float, size: int) -> np.ndarray:
    """Pixel positions (x right, y down, in pixel units from the image's top-left corner) of points in
    the renderer's frame, for a camera at radius 3, 15° up, fov 50°, written out independently."""
    el, az = math.radians(15), math.radians(azimuth)
    eye = 3 * np.array([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)])
    forward = -eye / np.linalg.norm(eye)
    right = np.cross(forward, [0, 1, 0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    rel = points - eye
    depth = rel @ forward
    focal = 1 / math.tan(math.radians(25))
    x, y = focal * (rel @ right) / depth, focal * (rel @ up) / depth
    return np.stack([(x + 1) / 2 * size, (1 - y) / 2 * size], -1)


def test_the_object_fills_the_frame_as_the_protocol_says(tmp_path):
    # an off-centre box 0.4 × 0.6 × 0.2 (model frame): recentred and scaled by 1.8 / 0.6, then y and z swapped
    low, high = np.array([0.1, -0.2, 0.3]), np.array([0.5, 0.4, 0.5])
    views = rendered(coloured_box(low, high, {k: (90, 90, 90) for k in COLOURS}), tmp_path, image_size=256)
    half = (high - low) / 2 * 3.0
    signs = [(sx, sy, sz) for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]
    corners = np.array([[sx * half[0], sz * half[2], sy * half[1]] for sx, sy, sz in signs])  # (x, z, y)
    assert np.abs(corners).max() == pytest.approx(0.9)
    for view, azimuth in zip(views, (0, 90, 180, 270)):
        pixels = project(corners, azimuth, 256)
        drawn = np.abs(view.astype(int) - 90).max(-1) <= 2  # fully covered pixels
        rows, cols = np.nonzero(drawn)
        # a pixel is covered when its centre is inside; antialiasing may only soften the outermost ring
        assert cols.min() == pytest.approx(pixels[:, 0].min(), abs=1.5) and cols.max() + 1 == pytest.approx(
            pixels[:, 0].max(), abs=1.5)
        assert rows.min() == pytest.approx(pixels[:, 1].min(), abs=1.5) and rows.max() + 1 == pytest.approx(
            pixels[:, 1].max(), abs=1.5)


def test_white_background_and_antialiased_silhouettes(tmp_path):
    views = rendered(coloured_box([-0.5] * 3, [0.5] * 3, COLOURS), tmp_path, image_size=64)
    assert np.all(views[:, :3, :3] == 255) and np.all(views[:, -3:, -3:] == 255)  # white, exactly
    pixels = views.astype(int)
    pure = np.zeros(pixels.shape[:3], bool)
    for colour in list(COLOURS.values()) + [(255, 255, 255)]:
        pure |= np.abs(pixels - colour).max(-1) <= 1
    assert (~pure).sum(axis=(1, 2)).min() > 20  # every view has blended pixels along its outline
    # kire's rim: a background pixel an edge partly covers blends black (the albedo off the mesh) with
    # white, so it is grey whatever the face's colour
    grey = (pixels[..., 0] == pixels[..., 1]) & (pixels[..., 1] == pixels[..., 2]) & (pixels[..., 0] < 250)
    assert grey.sum(axis=(1, 2)).min() > 10

    # the edge itself: a square whose right edge lies at x = 10.3 pixels on a 16-pixel canvas
    edge = 10.3 / 8 - 1
    clip = torch.tensor([[-2.0, -2.0, 0, 1], [edge, -2.0, 0, 1], [edge, 2.0, 0, 1], [-2.0, 2.0, 0, 1]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    rast = rasterize(clip, faces, (16, 16))
    alpha = antialias((rast[..., 3:] > 0).float(), rast, clip, faces)[0, :, :, 0]
    assert torch.all(alpha[:, :10] == 1) and torch.all(alpha[:, 11:] == 0)
    np.testing.assert_allclose(alpha[:, 10], 0.3, atol=1e-5)  # 10.3 − (10.5 − ½): the covered share of the segment
    # kire's composition: albedo (zero off the mesh) · alpha + white · (1 − alpha), truncated to 8 bits
    from triplane_turbo.evaluation.views import to_uint8

    assert to_uint8(torch.tensor(0.0 * 0.3 + (1 - 0.3))).item() == 178


# -------------------------------------------------------------------------------------------------
# End to end
# -------------------------------------------------------------------------------------------------

class Counting:
    """The tiny pipeline, counting the prompts it is asked for; raises KeyboardInterrupt (what a kill
    looks like to Python) when asked for ``stop_at``."""

    def __init__(self, pipe, stop_at: str | None = None):
        self.pipe, self.stop_at, self.prompts = pipe, stop_at, []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, prompts, **kwargs):
        if self.stop_at in prompts:
            raise KeyboardInterrupt
        self.prompts += prompts
        return self.pipe(prompts, **kwargs)


def test_an_interrupted_run_resumes_without_recomputing(tiny_pipe, tiny_clip, tmp_path, monkeypatch):
    prompts = ["a wooden chair", "a red car", "a teapot"]
    settings = EvalSettings(**FAST)
    first = Counting(tiny_pipe, stop_at="a red car")
    with pytest.raises(KeyboardInterrupt):
        evaluate_pipeline(first, prompts, tmp_path / "run", settings, tiny_clip)
    assert first.prompts == ["a wooden chair"] and not (tmp_path / "run" / "metrics.json").exists()

    renders = []
    real = views_module.render_views
    monkeypatch.setattr(views_module, "render_views", lambda mesh, *a, **k: renders.append(1) or real(mesh, *a, **k))
    second = Counting(tiny_pipe)
    result = evaluate_pipeline(second, prompts, tmp_path / "run", settings, tiny_clip)
    assert second.prompts == ["a red car", "a teapot"]  # the chair's mesh was kept
    assert len(renders) == 3  # no views existed yet: all three meshes rendered
    view = tmp_path / "run" / result.metrics["prompts"][0]["views"][2]["image"]
    stamp = view.stat().st_mtime_ns
    view_of_the_car = tmp_path / "run" / result.metrics["prompts"][1]["views"][0]["image"]
    view_of_the_car.unlink()  # lost since

    third = Counting(tiny_pipe)
    again = evaluate_pipeline(third, prompts, tmp_path / "run", settings, tiny_clip, info={"step": 3})
    assert third.prompts == [] and len(renders) == 4 and view.stat().st_mtime_ns == stamp  # only the car re-rendered
    fresh = evaluate_pipeline(tiny_pipe, prompts, tmp_path / "fresh", settings, tiny_clip)
    for metrics in (result.metrics, again.metrics):
        assert [v["clip_score"] for p in metrics["prompts"] for v in p["views"]] == \
            [v["clip_score"] for p in fresh.metrics["prompts"] for v in p["views"]]
    assert again.clip_score == fresh.clip_score and again.r_at_1 == fresh.r_at_1
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["info"] == {"step": 3}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["contact_sheet.png", "meshes", "metrics.json",
                                                                    "metrics.md", "views"]


def run_cli(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = evaluate_cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_apostrophes_commas_and_other_scripts_evaluate(tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(AWKWARD) + "\n", encoding="utf-8")
    options = ["--tiny", "--resolution", "40", "--image-size", "64", "-q"]
    code, out, err = run_cli(["--prompts", str(prompts), "--out", "all", *options], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "all" / "metrics.json").read_text(encoding="utf-8"))
    assert [p["prompt"] for p in metrics["prompts"]] == AWKWARD and metrics["failed_lines"] == []
    assert metrics["prompts"][2]["text"] == "A photo depicts a lion's mane jellyfish, highly detailed."
    assert metrics["views_scored"] == 16 and metrics["unique_texts"] == 4
    assert metrics["clip"]["model"] == "tiny random CLIP" and metrics["generator"]["revision"] == "tiny"
    per_view = [v["clip_score"] for p in metrics["prompts"] for v in p["views"]]
    assert metrics["clip_score"] == pytest.approx(np.mean(per_view), abs=1e-9)
    assert metrics["r_at_1"] == pytest.approx(100 * np.mean([v["rank"] == 1 for p in metrics["prompts"]
                                                             for v in p["views"]]))
    assert f"C.S. {metrics['clip_score']:.2f}" in out
    table = (tmp_path / "all" / "metrics.md").read_text(encoding="utf-8")
    assert "| 4 | 一只戴帽子的猫 |" in table and "detective's outfit" in table
    sheet = Image.open(tmp_path / "all" / "contact_sheet.png")
    assert sheet.width > 4 * 4 * 64 and sheet.height > 64

    code, _, err = run_cli(["--prompts", str(prompts), "--out", "quirks", "--authors-quirks", *options], tmp_path,
                           monkeypatch, capsys)
    assert code == 0, err
    quirks = json.loads((tmp_path / "quirks" / "metrics.json").read_text(encoding="utf-8"))
    assert [d["line"] for d in quirks["dropped"]] == [2, 3]  # both hold an apostrophe
    assert [p["text"] for p in quirks["prompts"]] == ["A photo depictsa wooden chair", "A photo depicts一只戴帽子的猫"]
    assert quirks["settings"]["strip_punctuation"] and quirks["views_scored"] == 8
    # the meshes are the same files as the default run's (same prompt, seed and settings), and the
    # tiny CLIP, written afresh by each run, has the same revision (a hash of its files' contents)
    assert quirks["prompts"][0]["mesh"] == metrics["prompts"][0]["mesh"]
    assert quirks["clip"]["revision"] == metrics["clip"]["revision"]


def test_compare_two_runs_of_different_seeds(tiny_pipe, tiny_clip, tmp_path, monkeypatch, capsys):
    prompts = ["a wooden chair", "a red car", "a teapot", "a lamp"]
    for seed in (0, 1):
        evaluate_pipeline(tiny_pipe, prompts, tmp_path / f"seed{seed}", EvalSettings(seed=seed, **FAST), tiny_clip,
                          contact_sheet=False)
    result = compare_runs(tmp_path / "seed0", tmp_path / "seed1", tmp_path / "cmp")
    assert len(result.rows) == 4 and result.wins + result.losses + result.ties == 4
    assert result.wins + result.losses > 0  # other seeds, other meshes, other scores
    table = (tmp_path / "cmp" / "compare.md").read_text(encoding="utf-8")
    assert "settings.seed: 0 vs 1" in table and f"B wins {result.wins}, loses {result.losses}" in table
    assert sum(line.startswith("| ") and line.split("|")[1].strip().isdigit() for line in table.splitlines()) == 4
    plot = np.asarray(Image.open(tmp_path / "cmp" / "compare.png").convert("RGB"))
    assert plot.shape == (560, 560, 3)
    dots = (np.all(plot == (30, 140, 60), -1) | np.all(plot == (200, 50, 40), -1)).sum()
    assert dots > 20 * (result.wins + result.losses)
    code, out, err = run_cli(["--compare", str(tmp_path / "seed0"), str(tmp_path / "seed1"), "--out", "cli"],
                             tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert "4 shared prompts" in out
    assert (tmp_path / "cli" / "compare.md").read_text(encoding="utf-8") == table


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_processes_give_the_metrics_of_one(tmp_path, monkeypatch, capsys):
    """Two processes under accelerate's launcher, and meanwhile one (this one) through ``main(argv)``."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(AWKWARD + ["a teapot", "a red car"]) + "\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["--prompts", str(prompts), "--tiny", "--resolution", "40", "--image-size", "64", "-q"]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port())]
    two = subprocess.Popen([*launcher, "-m", "triplane_turbo.evaluate", *args, "--out", "two"], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    code, _, err = run_cli([*args, "--out", str(tmp_path / "one")], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    output, _ = two.communicate(timeout=400)
    assert two.returncode == 0, output
    a, b = (json.loads((tmp_path / name / "metrics.json").read_text(encoding="utf-8")) for name in ("one", "two"))
    for key in ("r_at_1", "r_at_5", "failed_lines", "settings", "azimuths"):
        assert a[key] == b[key]
    # the same meshes and the same pictures, byte for byte, whichever process made them
    for p, q in zip(a["prompts"], b["prompts"]):
        assert (p["line"], p["mesh"], p["seed"]) == (q["line"], q["mesh"], q["seed"])
        assert (tmp_path / "one" / p["mesh"]).read_bytes() == (tmp_path / "two" / q["mesh"]).read_bytes()
        for v, w in zip(p["views"], q["views"]):
            assert (tmp_path / "one" / v["image"]).read_bytes() == (tmp_path / "two" / w["image"]).read_bytes()
            assert (v["rank"], v["top1_line"]) == (w["rank"], w["top1_line"])
            # CLIP is loaded afresh by each run: float32 kernels may round differently (seen: 2e-7)
            assert v["clip_score"] == pytest.approx(w["clip_score"], abs=1e-4)
    assert a["clip_score"] == pytest.approx(b["clip_score"], abs=1e-4)
    manifest = (tmp_path / "two" / "meshes" / "manifest.jsonl").read_text().splitlines()
    ranks = {json.loads(line)["rank"] for line in manifest}
    assert ranks == {0, 1}  # both processes made meshes
    assert len(read_records(tmp_path / "two" / "meshes")) == 6


# -------------------------------------------------------------------------------------------------
# The authors' texts and precision (issue 31)
# -------------------------------------------------------------------------------------------------

def test_the_authors_texts_keep_the_library_s_double_spaces(tmp_path, monkeypatch):
    """Two DreamFusion prompts start with two spaces (datasets/dreamfusion_415_prompt_library.json:844,
    846 in its test list; 409, 411 in train); the authors' caption is ``"A photo depicts" + the folder name`` (compute.py:51, 179), so their
    text is "A photo depicts  Coffee cup with many holes" (CLIP's tokenizer reads "depicts coffee"), not
    the cleaned prompt glued on ("A photo depictsCoffee…")."""
    from triplane_turbo.evaluation import run as run_module

    library = tmp_path / "dreamfusion.json"
    spaced = ["  Coffee cup with many holes", "  Luminescent wild horses", "a lion's mane jellyfish, detailed."]
    library.write_text(json.dumps({"test": spaced}))
    lines = read_eval_prompts(library)
    assert [line.prompt for line in lines] == ["Coffee cup with many holes", "Luminescent wild horses",
                                               "a lion's mane jellyfish, detailed."]
    quirks = EvalSettings.authors()
    assert [clip_text(line.prompt, quirks, line.raw) for line in lines[:2]] == [
        "A photo depicts  Coffee cup with many holes", "A photo depicts  Luminescent wild horses"]
    assert clip_text(lines[0].prompt, EvalSettings(), lines[0].raw) == "A photo depicts Coffee cup with many holes"
    text_file = tmp_path / "p.txt"
    text_file.write_text("\n".join(spaced) + "\n", encoding="utf-8")
    assert [clip_text(line.prompt, quirks, line.raw) for line in read_eval_prompts(text_file)][:1] == [
        "A photo depicts  Coffee cup with many holes"]
    # the evaluation's jobs carry that text (the meshes themselves come from the cleaned prompt)
    monkeypatch.setattr(run_module, "run_split", lambda *args, **kwargs: None)
    jobs = run_module.generate_meshes(None, lines, tmp_path / "meshes", quirks, run_module.SingleProcess())
    assert [job.text for job in jobs[:2]] == ["A photo depicts  Coffee cup with many holes",
                                              "A photo depicts  Luminescent wild horses"]


def authors_script(images, texts, targets, w=2.5):
    """compute.py's arithmetic written out (lines 132-135, 154-159, 202) on float16 numpy features."""
    images, texts = images.astype(np.float16), texts.astype(np.float16)
    images = images / np.sqrt(np.sum(images ** 2, axis=1, keepdims=True))
    texts = texts / np.sqrt(np.sum(texts ** 2, axis=1, keepdims=True))
    per = w * np.clip(np.sum(images * texts[targets], axis=1), 0, None)
    recall = (np.clip(images @ texts.T, 0, None).argmax(axis=-1) == targets).mean()
    return np.mean(per), recall


def test_authors_precision_scores_in_float16_as_their_script():
    from triplane_turbo.evaluation import authors_float16_metrics

    rng = np.random.default_rng(3)
    texts = rng.normal(size=(9, 64)).astype(np.float32)
    targets = np.repeat(np.arange(9), 4)
    images = (texts[targets] + rng.normal(scale=1.5, size=(36, 64))).astype(np.float32)
    cs, recall = authors_script(images, texts, targets)
    theirs = authors_float16_metrics(images, texts, targets)
    assert theirs.clip_score == float(cs) * 100 and theirs.recall[1] == pytest.approx(recall * 100)
    assert theirs.scores.dtype == np.float64 and np.all(theirs.scores == theirs.scores.astype(np.float16))
    ours = clip_metrics(images, texts, targets)
    assert ours.clip_score != theirs.clip_score and abs(ours.clip_score - theirs.clip_score) < 0.2
    # ties (every text scores 0): argmax picks the first text, so a view of text 0 is a hit, of text 1 a miss
    tie_texts = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    tied = authors_float16_metrics(np.array([[-1.0, -1.0], [-1.0, -1.0]]), tie_texts, [0, 1])
    assert list(tied.ranks) == [1, 2] and tied.recall[1] == 50
    args = evaluate_cli.parse_args(["--prompts", "p.txt", "--out", "o", "--authors-precision"])
    assert args.settings.authors_precision and not evaluate_cli.parse_args(
        ["--prompts", "p.txt", "--out", "o"]).settings.authors_precision
