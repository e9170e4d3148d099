"""The command lines: generate end to end on the tiny model (in this process, through ``main(argv)``),
bad arguments, loading errors, the option set the three commands share, and a run from a folder
outside the checkout after the README's install (slow: a fresh process)."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh

from triplane_turbo import __main__ as generate_cli
from triplane_turbo import batch, evaluate, train

from .conftest import FIXTURE_A

REPO = Path(__file__).resolve().parents[1]


def run(argv, tmp_path, monkeypatch, capsys) -> tuple[int, str, str]:
    """``python -m triplane_turbo ARGV`` in ``tmp_path``: (exit code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)
    try:
        code = generate_cli.main(argv)
    except SystemExit as exit_:  # argparse's errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_tiny_chair_glb(tmp_path, monkeypatch, capsys):
    """The default: a UV-textured GLB, and nothing else written."""
    code, out, err = run(["a wooden chair", "--tiny", "-o", "chair.glb", "--seed", "3", "--resolution", "64",
                          "--texture-size", "256", "-q"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chair.glb"]
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("chair.glb: ") and "seed 3" in summary and "vertices" in summary
    (mesh,) = trimesh.load_scene(tmp_path / "chair.glb").geometry.values()
    image = np.asarray(mesh.visual.material.baseColorTexture)
    assert len(mesh.faces) > 100 and image.shape[:2] == (256, 256) and image.reshape(-1, image.shape[-1]).std(0).min() > 1


def test_vertex_colours_obj_with_its_texture_and_stl(tmp_path, monkeypatch, capsys):
    code, _, err = run(["a wooden chair", "--tiny", "-o", "vc.glb", "--seed", "3", "--resolution", "64",
                        "--texture", "vertex", "-q"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    (mesh,) = trimesh.load_scene(tmp_path / "vc.glb").geometry.values()
    assert mesh.visual.vertex_attributes["color"][:, :3].std(axis=0).min() > 1
    code, out, err = run(["a wooden chair", "--tiny", "-o", "out/chair.obj", "--seed", "3", "--resolution", "64",
                          "--faces", "1000", "--texture-size", "128", "-q"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["chair.mtl", "chair.obj", "chair.png"]
    assert "(+ chair.mtl, chair.png)" in out
    loaded = trimesh.load(tmp_path / "out" / "chair.obj", force="mesh")
    assert len(loaded.faces) <= 1100 and loaded.visual.material.image.size == (128, 128)
    code, _, err = run(["a lamp", "--tiny", "--format", "stl", "--resolution", "32", "--print-size", "50", "-q"],
                       tmp_path, monkeypatch, capsys)
    assert code == 0, err
    printed = trimesh.load(tmp_path / "mesh.stl")  # print-ready: on the plate, 50 mm on its largest side
    assert printed.faces.shape[0] > 0 and printed.is_watertight and printed.bounds[0, 2] == 0.0
    assert np.isclose(np.ptp(printed.vertices, axis=0).max(), 50.0)


def test_usdz_placed_at_its_base(tmp_path, monkeypatch, capsys):
    """A USDZ with its pivot at the base at half size, simplified (so with a normal map). (The print
    formats from the command line: the STL run above; 3MF through the batch, tests/test_batch.py.)"""
    from pxr import Usd, UsdGeom, UsdUtils

    code, out, err = run(["a wooden chair", "--tiny", "-o", "chair.usdz", "--seed", "3", "--resolution", "48",
                          "--faces", "600", "--texture-size", "64", "--origin", "bottom", "--scale", "0.5", "-q"],
                         tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert out.strip().splitlines()[-1].startswith("chair.usdz: ")
    stage = Usd.Stage.Open(str(tmp_path / "chair.usdz"))
    (points,) = [UsdGeom.Mesh(p).GetPointsAttr().Get() for p in stage.Traverse() if p.IsA(UsdGeom.Mesh)]
    points = np.array(points)
    assert points[:, 1].min() == 0.0 and np.abs(points.min(0) + points.max(0))[[0, 2]].max() < 1e-6
    assert 0.4 < np.ptp(points, axis=0).max() <= 0.5 * 1.2  # the model is about 1 unit across
    checker = UsdUtils.ComplianceChecker(arkit=True)
    checker.CheckCompliance(str(tmp_path / "chair.usdz"))
    assert checker.GetErrors() == [] and checker.GetFailedChecks() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chair.usdz"]


@pytest.mark.parametrize("args, message", [
    (["   ", "--tiny"], "prompt is empty"),
    (["a chair", "--tiny", "--seed", "-5"], "seed must be between"),
    (["a chair", "--tiny", "--seed=--5"], "seed must be a whole number"),
    (["a chair", "--tiny", "--seed", "1e3"], "seed must be a whole number"),
    (["a chair", "--tiny", "--resolution", "9999"], "mesh resolution must be between 32 and 512"),
    (["a chair", "--tiny", "-o", "x.fbx"], "unknown format 'fbx'; choose one of glb, obj, ply, stl, usdz, 3mf"),
    (["a chair", "--tiny", "-o", "x.stl", "--origin", "bottom"], "--origin and --scale apply to glb, obj, ply, usdz"),
    (["a chair", "--tiny", "-o", "x.3mf", "--scale", "2"], "--origin and --scale apply to glb, obj, ply, usdz"),
    (["a chair", "--tiny", "-o", "x.usdz", "--print-size", "50"], "--print-size applies to stl and 3mf"),
    (["a chair", "--tiny", "--scale", "0"], "scale must be a number from"),
    (["a chair", "--tiny", "-o", "x.3mf", "--print-size", "0.5"], "print size must be a number from 1 to 10000"),
    (["a chair", "--tiny", "--origin", "top"], "invalid choice: 'top'"),
    (["a chair", "--steps", "0"], "num_steps must be an integer between 1 and 50"),  # before any loading
    (["a chair", "--tiny", "--steps", "51"], "num_steps must be an integer between 1 and 50"),
    (["a chair", "--tiny", "--texture-size", "32"], "texture size must be between 64 and 4096"),
    (["a chair", "--tiny", "--faces", "3"], "target_faces must be between 100 and"),
    (["a chair", "--tiny", "--device", "cuda:0"], "no CUDA device"),
    (["a chair", "--tiny", "--device", "toaster"], "not a device"),
])
def test_bad_input_exits_with_a_message(tmp_path, monkeypatch, capsys, args, message):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # "no CUDA device" whatever the machine
    code, _, err = run(args, tmp_path, monkeypatch, capsys)
    assert code == 2 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_offline_without_weights_explains(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    code, _, err = run(["a chair"], tmp_path, monkeypatch, capsys)
    assert code == 1 and "Traceback" not in err
    assert "hf download" in err and "--tiny" in err


def test_loading_errors_are_one_line_not_a_traceback(tmp_path, monkeypatch, capsys, tiny_model_dir):
    base_dir, adapter_file = tiny_model_dir
    corrupt = tmp_path / "adapter.pth"
    corrupt.write_bytes(b"not a checkpoint")
    code, _, err = run(["a chair", "--base-model", str(base_dir), "--adapter", str(corrupt)], tmp_path, monkeypatch,
                       capsys)
    assert code == 1 and "Traceback" not in err
    assert f"error: {corrupt}: not a readable TriplaneTurbo checkpoint" in err
    # an adapter for another base model: a CheckpointMismatchError naming the key
    code, _, err = run(["a chair", "--base-model", str(FIXTURE_A / "base"), "--adapter", str(adapter_file)], tmp_path,
                       monkeypatch, capsys)
    assert code == 1 and "Traceback" not in err and "key" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.pth"]


# ---------------------------------------------------------------------------------------------
# One option set for every command
# ---------------------------------------------------------------------------------------------
SHARED = ("--base-model", "--adapter", "--tiny", "--device", "--dtype", "--resolution", "--texture",
          "--texture-size", "--unwrap", "--faces")
#: The placement options of the commands that write meshes.
PLACEMENT = ("--origin", "--scale", "--print-size")
PARSERS = {"generate": (generate_cli.build_parser, ["a chair"]),
           "batch": (batch.build_parser, ["prompts.txt", "--out", "o"]),
           "train": (train.build_parser, ["--prompts", "p.txt", "--steps", "1", "--output", "o"]),
           "evaluate": (evaluate.build_parser, ["--prompts", "p.txt", "--out", "o"])}


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {option: action for action in parser._actions for option in action.option_strings}


def test_the_commands_share_one_option_set_with_the_librarys_bounds(capsys):
    options = {name: _options(build()) for name, (build, _) in PARSERS.items()}
    for option in SHARED:
        actions = [options[name][option] for name in PARSERS]
        assert len({(a.type, tuple(a.choices or ()), a.nargs, a.const) for a in actions}) == 1, option
    for option in PLACEMENT:
        actions = [options[name][option] for name in ("generate", "batch")]
        assert len({(a.type, tuple(a.choices or ()), a.nargs, a.const, a.default) for a in actions}) == 1, option
    from triplane_turbo.config import MAX_RESOLUTION, MIN_RESOLUTION
    from triplane_turbo.inputs import MAX_TARGET_FACES, MIN_TARGET_FACES
    from triplane_turbo.texturing.bake import MAX_TEXTURE_SIZE, MIN_TEXTURE_SIZE

    bounds = {"--resolution": (MIN_RESOLUTION, MAX_RESOLUTION), "--texture-size": (MIN_TEXTURE_SIZE, MAX_TEXTURE_SIZE),
              "--faces": (MIN_TARGET_FACES, MAX_TARGET_FACES)}
    for name, (build, required) in PARSERS.items():
        for option, (low, high) in bounds.items():
            for value in (low, high):  # the library's bounds are accepted ...
                assert getattr(build().parse_args([*required, option, str(value)]), option[2:].replace("-", "_")) == value
            for value in (low - 1, high + 1):  # ... and nothing beyond them
                with pytest.raises(SystemExit):
                    build().parse_args([*required, option, str(value)])
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------
# After the README's install, from a user's own folder (fresh processes: slow)
# ---------------------------------------------------------------------------------------------
#: Runs each command of the test below as ``python -m`` would (runpy), one after the other, in one
#: fresh process: a process per command would import torch, diffusers and transformers three times.
AS_PYTHON_M = """
import runpy, sys
for argv in COMMANDS:
    sys.argv = argv[:]
    try:
        runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        if exit_.code not in (None, 0):
            sys.exit(f"python -m {' '.join(argv)}: exit code {exit_.code}")
"""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_commands_run_from_a_folder_outside_the_checkout(tmp_path):
    """The README's installs put the package itself on the path (``-e .``): the generate, batch and
    train commands then work from any folder, with no PYTHONPATH."""
    home = tmp_path / "user"
    home.mkdir()
    (home / "prompts.txt").write_text("a chair\n", encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    where = subprocess.run([sys.executable, "-c", "import importlib.util; spec = importlib.util.find_spec("
                            "'triplane_turbo'); print(spec and spec.origin)"], cwd=home, env=env, capture_output=True,
                           text=True)
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip() != "None", "the package is not installed: the README's installs put it on the path (-e .)"
    assert Path(where.stdout.strip()).resolve().parent.parent == REPO.resolve(), \
        f"this environment installs another copy of the package: {where.stdout.strip()}"
    commands = [
        ["triplane_turbo", "a chair", "--tiny", "--resolution", "32", "--texture", "vertex", "-q"],
        ["triplane_turbo.batch", "prompts.txt", "--out", "meshes", "--tiny", "--resolution", "32", "--texture",
         "vertex", "-q"],
        ["triplane_turbo.train", "--tiny", "--recipe", "sd", "--prompts", "prompts.txt", "--steps", "1", "--output",
         "run", "--prompts-per-step", "1", "--views", "1", "--renderers", "mesh", "--preview-every", "0", "-q"],
    ]
    run = subprocess.run([sys.executable, "-c", f"COMMANDS = {commands!r}\n{AS_PYTHON_M}"], cwd=home, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (home / "mesh.glb").is_file() and (home / "meshes" / "manifest.jsonl").is_file()
    assert (home / "run" / "adapter.pth").is_file()
