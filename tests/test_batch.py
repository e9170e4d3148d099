"""Batch generation: prompt file in, meshes and a manifest out; resumable; across processes with accelerate."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import trimesh

from triplane_turbo import TriplaneTurboOutput
from triplane_turbo.batch import (BatchSettings, PromptLine, RankManifest, line_seed, merge_manifest, output_name,
                                  pending_lines, read_prompts, read_records, run_batch)

from .conftest import free_port

REPO = Path(__file__).resolve().parents[1]
#: Ten lines: a blank one, a duplicate, one far too long, non-Latin scripts and control characters.
PROMPTS = ["a wooden chair", "", "a red sports car", "a wooden chair", "x" * 1500, "צפרדע ירוקה",
           "一只戴帽子的猫", "a lamp\x07 with a shade", "   ", "a teapot"]
VALID = [1, 3, 4, 6, 7, 8, 10]  # the lines that can be generated



def write_prompts(folder: Path) -> Path:
    path = folder / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path


def test_reading_the_prompt_file(tmp_path):
    lines = read_prompts(write_prompts(tmp_path))
    assert [item.line for item in lines] == [1, 3, 4, 5, 6, 7, 8, 10]  # blank lines skipped
    by_line = {item.line: item for item in lines}
    assert by_line[8].prompt == "a lamp with a shade" and by_line[8].error is None
    assert "1500 characters" in by_line[5].error and len(by_line[5].prompt) < 100
    assert by_line[6].prompt == "צפרדע ירוקה"
    assert {item.line for item in lines if not item.error} == set(VALID)


def test_file_names_come_from_the_line_and_a_hash_never_the_prompt():
    settings = BatchSettings(file_format="obj")
    name = output_name(12, "../../etc/passwd", line_seed(5, 12), settings)
    assert name.startswith("000012-") and name.endswith(".obj") and "passwd" not in name and "/" not in name
    assert name == output_name(12, "../../etc/passwd", 16, settings)
    assert name != output_name(12, "../../etc/passwd", 17, settings)  # another seed
    assert name != output_name(12, "../../etc/passwd", 16, BatchSettings(file_format="obj", mesh_resolution=128))


def test_placement_settings_name_new_files_and_leave_the_old_names_alone():
    """A batch started before --origin/--scale/--print-size resumes with the same names: the new
    fields count only once they leave their defaults."""
    import hashlib

    old = {"mesh_resolution": 160, "file_format": "glb", "texture": "uv", "texture_size": 1024, "target_faces": None,
           "unwrap": "fast"}  # BatchSettings() as it was
    digest = hashlib.sha256(json.dumps(["a chair", 7, old], sort_keys=True).encode()).hexdigest()[:10]
    assert output_name(3, "a chair", 7, BatchSettings()) == f"000003-{digest}.glb"
    placed = {output_name(3, "a chair", 7, BatchSettings(origin="bottom")),
              output_name(3, "a chair", 7, BatchSettings(scale=0.5)),
              output_name(3, "a chair", 7, BatchSettings(file_format="stl", print_size=50.0))}
    assert len(placed) == 3 and f"000003-{digest}.glb" not in placed


def test_the_batch_command_takes_the_placement_options():
    from triplane_turbo import batch

    args = batch.parse_args(["p.txt", "--out", "o", "--format", "usdz", "--origin", "bottom", "--scale", "0.01"])
    assert args.placement == {"origin": "bottom", "scale": 0.01}
    args = batch.parse_args(["p.txt", "--out", "o", "--format", "3mf", "--print-size", "60"])
    assert args.placement == {"print_size": 60.0}
    with pytest.raises(SystemExit):
        batch.parse_args(["p.txt", "--out", "o", "--format", "stl", "--origin", "bottom"])


def test_a_batch_writes_placed_usdz_and_print_ready_3mf(tmp_path, tiny_pipe):
    from pxr import Usd, UsdGeom

    lines = [PromptLine(1, "a wooden chair")]
    for settings in (BatchSettings(32, "usdz", "vertex", origin="bottom", scale=2.0),
                     BatchSettings(32, "3mf", "vertex", print_size=40.0)):
        out = tmp_path / settings.file_format
        out.mkdir()
        assert run_batch(tiny_pipe, lines, out, settings).ok == 1
        record = read_records(out)[1]
        assert record["settings"]["file_format"] == settings.file_format
        path = out / record["file"]
        if settings.file_format == "usdz":
            assert record["settings"]["origin"] == "bottom" and record["settings"]["scale"] == 2.0
            stage = Usd.Stage.Open(str(path))
            (points,) = [UsdGeom.Mesh(p).GetPointsAttr().Get() for p in stage.Traverse() if p.IsA(UsdGeom.Mesh)]
            points = np.array(points)
            assert points[:, 1].min() == 0.0 and 1.6 < np.ptp(points, axis=0).max() < 2.4
        else:
            assert record["settings"]["print_size"] == 40.0 and "origin" not in record["settings"]
            (printed,) = trimesh.load_scene(path).geometry.values()
            assert printed.bounds[0, 2] == 0.0 and np.isclose(np.ptp(printed.vertices, axis=0).max(), 40.0)


def test_a_torn_last_record_is_dropped(tmp_path):
    manifest = RankManifest(tmp_path, 0)
    manifest.append({"line": 1, "status": "ok", "file": "a"})
    with open(manifest.path, "ab") as handle:
        handle.write(b'{"line": 2, "status": "o')  # the process was killed in the middle of this write
    assert len(read_records(tmp_path)) == 1  # readers ignore it
    RankManifest(tmp_path, 0)  # the next run repairs its own file
    assert manifest.path.read_text() == '{"line": 1, "status": "ok", "file": "a"}\n'
    manifest.append({"line": 2, "status": "ok", "file": "b"})
    assert sorted(read_records(tmp_path)) == [1, 2]


class StubPipe:
    """Makes a sphere per prompt; raises CUDA OOM for batches over ``max_batch``, fails on 'boom'."""

    revision = "stub"
    device = torch.device("cpu")

    def __init__(self, max_batch=8):
        self.max_batch, self.calls = max_batch, []

    def __call__(self, prompts, *, seed, **kwargs):
        self.calls.append(len(prompts))
        if len(prompts) > self.max_batch:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        if "boom" in prompts:
            raise RuntimeError("this prompt breaks the model")
        meshes = [trimesh.creation.icosphere(1) if p != "hollow" else trimesh.Trimesh() for p in prompts]
        return TriplaneTurboOutput(meshes, None, None, list(seed), {}, textures=[None] * len(prompts))


def test_out_of_memory_halves_the_batch_and_bad_lines_become_records(tmp_path):
    lines = [PromptLine(i + 1, p) for i, p in enumerate(["a", "b", "boom", "c", "hollow", "d", "e"])]
    pipe = StubPipe(max_batch=2)
    stats = run_batch(pipe, lines, tmp_path, BatchSettings(texture="vertex"), batch_size=8)
    assert pipe.calls[:3] == [7, 4, 2]  # 8 -> OOM -> 4 -> OOM -> 2
    records = read_records(tmp_path)
    assert records[3]["status"] == "error" and "this prompt breaks the model" in records[3]["error"]
    assert records[5]["status"] == "error" and "no surface" in records[5]["error"]
    assert {line for line, r in records.items() if r["status"] == "ok"} == {1, 2, 4, 6, 7}
    assert (stats.ok, stats.errors) == (5, 2)
    assert all((tmp_path / r["file"]).is_file() for r in records.values() if r["status"] == "ok")


def test_resuming_skips_finished_lines_and_redoes_the_rest(tmp_path):
    lines = [PromptLine(i + 1, p) for i, p in enumerate(["a", "b", "c"])]
    settings = BatchSettings(texture="vertex")
    run_batch(StubPipe(), lines[:2], tmp_path, settings)
    (tmp_path / read_records(tmp_path)[2]["file"]).unlink()  # a file lost since
    assert [item.line for item in pending_lines(lines, tmp_path, 0, settings)] == [2, 3]
    assert [item.line for item in pending_lines(lines, tmp_path, 0, BatchSettings(texture="uv"))] == [1, 2, 3]
    merge_manifest(tmp_path, settings)
    assert [json.loads(line)["line"] for line in (tmp_path / "manifest.jsonl").read_text().splitlines()] == [1, 2]


def test_a_rerun_with_other_settings_finishes_and_its_manifest_points_at_the_new_files(tmp_path):
    lines = [PromptLine(1, "a"), PromptLine(2, "b")]
    glb, obj = BatchSettings(texture="vertex"), BatchSettings(texture="vertex", file_format="obj")
    run_batch(StubPipe(), lines, tmp_path, glb)
    merge_manifest(tmp_path, glb)
    run_batch(StubPipe(), pending_lines(lines, tmp_path, 0, obj), tmp_path, obj, rank=1)  # another process's file
    merge_manifest(tmp_path, obj)
    assert pending_lines(lines, tmp_path, 0, obj) == []  # done: a third run has nothing left
    files = [json.loads(line)["file"] for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert all(name.endswith(".obj") for name in files) and len(files) == 2
    assert pending_lines(lines, tmp_path, 0, glb) == []  # and the first settings' files still count


def run_module(args, cwd, env=None, launcher=()):
    environment = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                   "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
    return subprocess.Popen([*launcher, *args], cwd=cwd, env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def accelerate_batch(prompts: Path, out: Path, cwd: Path):
    """Two CPU processes through accelerate's torchrun launcher."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port()), "-m", "triplane_turbo.batch"]
    return run_module([str(prompts), "--out", str(out), "--tiny", "--resolution", "48", "--texture-size", "256",
                       "--batch-size", "2", "-q"], cwd, launcher=launcher)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_processes_killed_part_way_and_resumed_by_one(tmp_path, monkeypatch, capsys):
    """A two-process run killed mid-way (the launcher and both workers), then finished by a run in one
    process (this one, through ``main(argv)``): every line once, nothing made twice. Two processes
    running to the end are in tests/test_evaluate.py."""
    from triplane_turbo import batch

    work, out = tmp_path / "cwd", tmp_path / "out"
    work.mkdir()
    prompts = write_prompts(tmp_path)
    first = accelerate_batch(prompts, out, work)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None:
        done = [len(out.joinpath(f"manifest.rank{rank}.jsonl").read_text().splitlines())
                if out.joinpath(f"manifest.rank{rank}.jsonl").exists() else 0 for rank in (0, 1)]
        if min(done) >= 1 and sum(done) >= 3:  # both processes have written, and the run is not over
            break
        time.sleep(0.1)
    assert first.poll() is None, f"the first run ended before it could be killed:\n{first.stdout.read()}"
    # the launcher and both workers, mid-run (torch's launcher starts each worker in a session of its
    # own: killing the launcher's process group alone leaves them running)
    processes = [psutil.Process(first.pid), *psutil.Process(first.pid).children(recursive=True)]
    assert len(processes) >= 3, processes
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):  # a worker whose share was done may have ended
            process.send_signal(signal.SIGKILL)
    psutil.wait_procs(processes, timeout=30)
    first.wait()
    assert not (out / "manifest.jsonl").exists() and len(read_records(out)) < len(PROMPTS)
    made_before = {r["file"]: (out / r["file"]).stat().st_mtime_ns for r in read_records(out).values()
                   if r["status"] == "ok"}

    monkeypatch.chdir(work)
    assert batch.main([str(prompts), "--out", str(out), "--tiny", "--resolution", "48", "--texture-size", "256",
                       "--batch-size", "2", "-q"]) == 0
    output = capsys.readouterr().out
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["line"] for r in records] == [1, 3, 4, 5, 6, 7, 8, 10]  # one record per non-blank line
    ok = {r["line"]: r for r in records if r["status"] == "ok"}
    assert sorted(ok) == VALID and records[3]["status"] == "error"
    for line, record in ok.items():
        assert record["seed"] == line - 1  # --seed 0: line n uses seed n - 1
        mesh = trimesh.load_scene(out / record["file"], process=False)
        assert sum(len(g.faces) for g in mesh.geometry.values()) > 100
    assert {name: (out / name).stat().st_mtime_ns for name in made_before} == made_before  # not made again
    ranks = {json.loads(line)["rank"] for path in out.glob("manifest.rank*.jsonl")
             for line in path.read_text().splitlines()}
    assert ranks == {0, 1}  # both processes of the first run did work
    expected = {r["file"] for r in ok.values()} | {"manifest.jsonl", "manifest.rank0.jsonl", "manifest.rank1.jsonl"}
    assert {p.name for p in out.iterdir()} == expected  # nothing else in the output folder
    assert list(work.iterdir()) == []  # nor in the working directory
    assert "7 ok, 1 errors" in output and f"this process made {len(VALID) - len(made_before)} meshes" in output


def test_a_line_from_the_batch_equals_the_command_line(tmp_path, monkeypatch, capsys):
    """Both commands through their ``main(argv)``, in this process."""
    from triplane_turbo import __main__ as generate_cli
    from triplane_turbo import batch

    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a wooden chair\na red sports car\na teapot\n")
    assert batch.main([str(prompts), "--out", "out", "--tiny", "--resolution", "48", "--batch-size", "3", "--seed", "7",
                       "--texture", "vertex", "-q"]) == 0
    record = read_records(tmp_path / "out")[2]
    assert generate_cli.main(["a red sports car", "--tiny", "--resolution", "48", "--seed", str(record["seed"]),
                              "--texture", "vertex", "-o", "single.glb", "-q"]) == 0
    capsys.readouterr()
    (a,) = trimesh.load_scene(tmp_path / "out" / record["file"], process=False).geometry.values()
    (b,) = trimesh.load_scene(tmp_path / "single.glb", process=False).geometry.values()
    # the same mesh; batched kernels round differently (~1e-6 on the triplane), nothing more
    np.testing.assert_array_equal(a.faces, b.faces)
    np.testing.assert_allclose(a.vertices, b.vertices, atol=1e-4)
    colors = lambda m: np.asarray(m.visual.vertex_attributes["color"], dtype=int)  # noqa: E731
    assert np.abs(colors(a) - colors(b)).max() <= 1


@pytest.mark.parametrize("overlap", [False, True], ids=["cpu-turns", "overlap"])
def test_baking_on_worker_threads_writes_the_same_files(tmp_path, tiny_pipe, overlap):
    """Textures baked and files written on threads (side by side between batches, or while the
    networks make the next batch): the same bytes as in line, every line recorded once, and the
    calling thread's torch thread count untouched by the threads' one each."""
    lines = [PromptLine(1, "a wooden chair"), PromptLine(2, "a teapot"), PromptLine(3, "a lamp")]
    settings = BatchSettings(mesh_resolution=48, texture="uv", texture_size=128)
    threads = torch.get_num_threads()
    for workers in (0, 2):
        out = tmp_path / f"workers-{workers}"
        out.mkdir()
        stats = run_batch(tiny_pipe, lines, out, settings, batch_size=2, workers=workers, overlap=overlap)
        assert stats.ok == 3 and stats.errors == 0 and stats.batch_sizes == [2, 1]
    assert torch.get_num_threads() == threads
    records = {w: read_records(tmp_path / f"workers-{w}") for w in (0, 2)}
    assert sorted(records[2]) == [1, 2, 3] and all(r["status"] == "ok" for r in records[2].values())
    for line in (1, 2, 3):
        name = records[0][line]["file"]
        assert records[2][line]["file"] == name
        assert (tmp_path / "workers-0" / name).read_bytes() == (tmp_path / "workers-2" / name).read_bytes()


@pytest.mark.parametrize("overlap, batch_size, overlaps", [(False, 2, False), (True, 2, True), (None, 2, False),
                                                          (None, 1, True)],
                         ids=["turns", "overlap", "cpu-default-batches", "cpu-default-singles"])
def test_baking_threads_take_turns_with_cpu_networks_or_overlap_them(tmp_path, tiny_pipe, monkeypatch, overlap,
                                                                      batch_size, overlaps):
    """Taking turns, a batch's two meshes bake at the same time (a barrier both must reach) and the
    networks never run during a bake; overlapping, the first meshes' bakes wait until the next
    networks have started (taking turns they would time out), and those run on the cores the two
    threads leave. On the CPU the default overlaps for one prompt per call only. The caller's
    thread count is what it was."""
    from triplane_turbo import TriplaneTurboPipeline

    lock, baking, networks_during_bake, calls = threading.Lock(), [0], [], []
    side_by_side = threading.Barrier(2, timeout=30)
    next_networks = threading.Event()
    bake, call = tiny_pipe.mesher.bake_textures, TriplaneTurboPipeline.__call__
    threads = 3  # more than the two baking threads, whatever this worker was given
    original = torch.get_num_threads()
    torch.set_num_threads(threads)

    def watched_bake(*args, **kwargs):
        with lock:
            baking[0] += 1
        try:
            if overlaps:
                assert next_networks.wait(timeout=30), "the next networks did not start during the bake"
            else:
                side_by_side.wait()
            return bake(*args, **kwargs)
        finally:
            with lock:
                baking[0] -= 1

    def watched_call(self, *args, **kwargs):
        with lock:
            networks_during_bake.append(baking[0] > 0)
            calls.append(torch.get_num_threads())
        if len(calls) == 2:
            next_networks.set()
        return call(self, *args, **kwargs)

    monkeypatch.setattr(tiny_pipe.mesher, "bake_textures", watched_bake)
    monkeypatch.setattr(TriplaneTurboPipeline, "__call__", watched_call)
    lines = [PromptLine(i + 1, p) for i, p in enumerate(["a wooden chair", "a teapot", "a lamp", "a frog"])]
    settings = BatchSettings(mesh_resolution=48, texture="uv", texture_size=64)
    try:
        stats = run_batch(tiny_pipe, lines, tmp_path, settings, batch_size=batch_size, workers=2, overlap=overlap)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(original)
    assert stats.ok == 4 and stats.errors == 0 and len(calls) == 4 // batch_size
    assert calls == [1 if overlaps else threads] * len(calls)  # networks on the core the threads leave
    if not overlaps:
        assert networks_during_bake == [False] * len(calls)
