"""The command line end to end on the tiny model, in a fresh process."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh

from .conftest import FIXTURE_A

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd, env=None):
    environment = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "triplane_turbo", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.timeout(300)
def test_tiny_chair_glb(tmp_path):
    """The default: a UV-textured GLB."""
    result = run_cli("a wooden chair", "--tiny", "-o", "chair.glb", "--seed", "3", "--resolution", "64",
                     "--texture-size", "512", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chair.glb"]  # nothing else written
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("chair.glb: ") and "seed 3" in summary and "vertices" in summary
    (mesh,) = trimesh.load_scene(tmp_path / "chair.glb").geometry.values()
    image = np.asarray(mesh.visual.material.baseColorTexture)
    assert len(mesh.faces) > 100 and image.shape[:2] == (512, 512) and image.reshape(-1, image.shape[-1]).std(0).min() > 1


@pytest.mark.timeout(300)
def test_vertex_colours_and_obj_with_its_texture(tmp_path):
    result = run_cli("a wooden chair", "--tiny", "-o", "vc.glb", "--seed", "3", "--resolution", "64",
                     "--texture", "vertex", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (mesh,) = trimesh.load_scene(tmp_path / "vc.glb").geometry.values()
    assert mesh.visual.vertex_attributes["color"][:, :3].std(axis=0).min() > 1
    result = run_cli("a wooden chair", "--tiny", "-o", "out/chair.obj", "--seed", "3", "--resolution", "64",
                     "--faces", "1000", "--texture-size", "512", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["chair.mtl", "chair.obj", "chair.png"]
    assert "(+ chair.mtl, chair.png)" in result.stdout
    loaded = trimesh.load(tmp_path / "out" / "chair.obj", force="mesh")
    assert len(loaded.faces) <= 1100 and loaded.visual.material.image.size == (512, 512)


@pytest.mark.timeout(300)
def test_format_from_flag(tmp_path):
    result = run_cli("a lamp", "--tiny", "--format", "stl", "--resolution", "32", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert trimesh.load(tmp_path / "mesh.stl").faces.shape[0] > 0


@pytest.mark.parametrize("args, message", [
    (["   ", "--tiny"], "prompt is empty"),
    (["a chair", "--tiny", "--seed", "-5"], "seed must be between"),
    (["a chair", "--tiny", "--resolution", "9999"], "resolution must be between"),
    (["a chair", "--tiny", "-o", "x.fbx"], "unknown format"),
    (["a chair", "--steps", "0"], "num_steps must be an integer between 1 and 50"),  # before any loading
    (["a chair", "--tiny", "--steps", "51"], "num_steps must be an integer between 1 and 50"),
    (["a chair", "--tiny", "--texture-size", "128"], "--texture-size must be between 512 and 4096"),
    (["a chair", "--tiny", "--faces", "3"], "--faces must be between"),
])
def test_bad_input_exits_with_a_message(tmp_path, args, message):
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_offline_without_weights_explains(tmp_path):
    result = run_cli("a chair", cwd=tmp_path, env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf")})
    assert result.returncode == 1
    assert "hf download" in result.stderr and "--tiny" in result.stderr


def test_loading_errors_are_one_line_not_a_traceback(tmp_path, tiny_model_dir):
    base_dir, _ = tiny_model_dir
    corrupt = tmp_path / "adapter.pth"
    corrupt.write_bytes(b"not a checkpoint")
    result = run_cli("a chair", "--base-model", str(base_dir), "--adapter", str(corrupt), cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: {corrupt}: not a readable TriplaneTurbo checkpoint" in result.stderr
    # an adapter for another base model: a CheckpointMismatchError naming the key
    result = run_cli("a chair", "--base-model", str(FIXTURE_A / "base"), "--adapter",
                     str(tiny_model_dir[1]), cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr and "key" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.pth"]
