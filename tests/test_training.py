"""PRD training, stage 1, on tiny models on the CPU: the unrolled step, what trains and what does not,
the renderers' gradients, learning from a fixed target, and the command line (checkpoints, resume,
two processes)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from triplane_turbo import GenerationConfig, TriplaneTurboPipeline
from triplane_turbo.adapter import adapter_parameters
from triplane_turbo.checkpoint import read_checkpoint
from triplane_turbo.training import (FixedImageTeacher, NeuSRenderer, PRDTrainer, StableDiffusionTeacher, TrainConfig,
                                     VolumeConfig, sample_cameras)
from triplane_turbo.training.config import TINY_TRAINING, CameraConfig, MeshConfig
from triplane_turbo.triplane import TriplaneFields, sample_bilinear

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a wooden chair", "a red car"]


def tiny_training_pipe(tiny_model_dir):
    base_dir, adapter_file = tiny_model_dir
    pipe = TriplaneTurboPipeline.from_pretrained(str(base_dir), str(adapter_file), fuse_lora=False,
                                                 config=GenerationConfig(latent_size=16))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def snapshot(parameters) -> list[torch.Tensor]:
    return [p.detach().clone() for p in parameters]


def test_the_training_timesteps_are_the_inference_timesteps(tiny_model_dir):
    pipe = tiny_training_pipe(tiny_model_dir)
    trainer = PRDTrainer(pipe, [], TrainConfig(**TINY_TRAINING))
    assert trainer.timesteps().tolist() == pipe.timesteps(4).tolist() == [999, 749, 499, 249]
    with pytest.raises(ValueError, match="fuse_lora=False"):
        PRDTrainer(TriplaneTurboPipeline.from_pretrained(*map(str, tiny_model_dir)), [], TrainConfig())


def test_one_iteration_trains_the_adapter_and_nothing_else(tiny_model_dir):
    pipe = tiny_training_pipe(tiny_model_dir)
    config = TrainConfig(**TINY_TRAINING, accumulate=2, prompts_per_step=2)
    teacher = StableDiffusionTeacher(tiny_model_dir[0], config=config.guidance)
    trainer = PRDTrainer(pipe, [teacher], config)
    trainable = {id(p) for p in trainer.parameters}
    frozen = [p for m in (pipe.text_encoder, pipe.unet, pipe.vae) for p in m.parameters() if id(p) not in trainable]
    adapter_names = {n for m in (pipe.unet, pipe.vae) for n, _ in adapter_parameters(m)}
    assert len(trainable) == len(adapter_names) + len(list(pipe.fields.parameters()))
    base_before, teacher_before = snapshot(frozen), snapshot(teacher.frozen_parameters())
    adapter_before = snapshot(trainer.parameters)
    inputs = []
    forward = pipe.predict_noise
    pipe.predict_noise = lambda x, t, c: (inputs.append(x), forward(x, t, c))[1]

    losses = trainer.train_step(PROMPTS)  # the first of two accumulated iterations: gradients, no update
    assert set(losses) >= {"stable-diffusion/mesh", "stable-diffusion/volume", "eikonal", "sparsity", "total"}
    assert all(np.isfinite(v) for v in losses.values())
    assert all(p.grad is None for p in frozen) and all(p.grad is None for p in teacher.frozen_parameters())
    with_gradient = [p for p in trainer.parameters if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(with_gradient) > 0.9 * len(trainer.parameters)
    # no gradient crosses from step i to step i - 1: each step starts from a detached x̂₀ (plus fresh noise)
    assert len(inputs) == 4 and not any(x.requires_grad for x in inputs)

    trainer.train_step(PROMPTS)  # the optimiser step
    assert trainer.step == 2
    assert all(torch.equal(a, b) for a, b in zip(base_before, frozen))
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, teacher.frozen_parameters()))
    changed = sum(not torch.equal(a, b) for a, b in zip(adapter_before, trainer.parameters))
    assert changed > 0.9 * len(trainer.parameters)


def test_the_double_backward_sampler_passes_gradgradcheck():
    torch.manual_seed(0)
    planes = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    grid = (torch.rand(2, 1, 7, 2, dtype=torch.float64) * 2.2 - 1.1).requires_grad_(True)
    assert torch.allclose(sample_bilinear(planes, grid), torch.nn.functional.grid_sample(
        planes, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    assert torch.autograd.gradcheck(sample_bilinear, (planes, grid))
    assert torch.autograd.gradgradcheck(sample_bilinear, (planes, grid))
    # on a texel's centre (where bilinear interpolation has a kink) the gradient is grid_sample's
    centres = torch.tensor([[[[0.25 - 1 / 6, 0.25], [-0.25 + 1 / 6, -0.75]]]], dtype=torch.float64).expand(2, 1, 2, 2)
    ours = torch.autograd.grad(sample_bilinear(planes, centres.requires_grad_()).sum(), centres)[0]
    theirs = torch.autograd.grad(torch.nn.functional.grid_sample(planes, centres, mode="bilinear", padding_mode="zeros",
                                                                 align_corners=False).sum(), centres)[0]
    assert torch.allclose(ours, theirs)


def test_the_volume_renderer_passes_gradcheck():
    """Colour, opacity, depth and normals of a few rays, against finite differences in the triplane."""
    torch.manual_seed(0)
    fields = TriplaneFields(4, (8,), sphere_radius=0.5, twice_differentiable=True).double()
    renderer = NeuSRenderer(VolumeConfig(coarse_samples=6, fine_samples=3, inv_s=20.0))
    origins = torch.tensor([[[0.0, 0.0, 2.0], [0.1, -0.2, 2.0]]], dtype=torch.float64)
    directions = torch.nn.functional.normalize(torch.tensor([[[0.0, 0.05, -1.0], [0.02, 0.1, -1.0]]],
                                                            dtype=torch.float64), dim=-1)
    background = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    triplane = (torch.randn(1, 6, 4, 5, 5, dtype=torch.float64) * 0.3).requires_grad_(True)
    depths = renderer.sample_depths(fields, triplane.detach(), origins, directions, torch.Generator().manual_seed(1))

    def render(planes):
        out = renderer.render_rays(fields, planes, origins, directions, depths, background)
        return out["rgb"], out["opacity"], out["depth"], out["normal"]

    assert float(render(triplane)[1].detach().max()) > 0.5  # the rays do hit the surface
    assert torch.autograd.gradcheck(render, (triplane,), atol=1e-5)


def test_cameras_look_at_the_object_from_all_sides():
    cameras = sample_cameras(3, CameraConfig(), torch.Generator().manual_seed(0))
    position = cameras.c2w[:, :3, 3]
    assert len(cameras) == 12 and cameras.prompt_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.allclose(position.norm(dim=-1), cameras.distance, atol=1e-5)
    assert ((cameras.distance > 1.38) & (cameras.distance < 1.74)).all()
    elevation = torch.rad2deg(torch.asin(position[:, 2] / cameras.distance))
    assert ((elevation >= -1e-4) & (elevation <= 30.0001)).all()
    azimuth = torch.rad2deg(torch.atan2(position[:, 1], position[:, 0])).reshape(3, 4)
    assert torch.allclose(torch.diff(azimuth, dim=1) % 360, torch.full((3, 3), 90.0), atol=1e-3)
    # the centre ray of every camera passes through the origin; pixel rows run top to bottom
    origins, directions = cameras.rays(2)
    centre = directions.mean(dim=(1, 2))
    assert torch.allclose(torch.nn.functional.normalize(centre, dim=-1), -position / cameras.distance[:, None], atol=1e-5)
    assert (directions[:, 0, :, 2].mean(1) > directions[:, 1, :, 2].mean(1)).all()  # the top row looks higher (+z)


@pytest.mark.timeout(600)
def test_a_fixed_target_image_is_learned(tiny_model_dir):
    """With a teacher that wants every view to be one orange picture, the render loss falls."""
    pipe = tiny_training_pipe(tiny_model_dir)
    target = torch.tensor([1.0, 0.5, 0.1])[:, None, None].expand(3, 8, 8)
    config = TrainConfig(prompts_per_step=1, lr=3e-3, renderers=("volume",), eikonal=(0.0, 0.0), sparsity=(0.0, 0.0),
                         cameras=CameraConfig(views=2), volume=VolumeConfig(coarse_samples=12, fine_samples=4, rays=12,
                                                                            global_rays=0, patch_rays=0),
                         mesh=MeshConfig(grid=16, image=16), gradient_checkpointing=False)
    trainer = PRDTrainer(pipe, [FixedImageTeacher(target)], config)
    losses = [trainer.train_step(["a pumpkin"])["fixed-image/volume"] for _ in range(100)]
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10]), (np.mean(losses[:10]), np.mean(losses[-10:]))


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------
def train(*args, cwd, launcher=()):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=500)


def log_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.timeout(600)
def test_three_steps_export_an_adapter_that_loads_and_resuming_continues(tmp_path, tiny_model_dir):
    (tmp_path / "prompts.txt").write_text("a wooden chair\n\na red car\na teapot\n")
    command = [sys.executable, "-m", "triplane_turbo.train", "--tiny", "--prompts", "prompts.txt", "--output", "run",
               "--save-every", "2", "--preview-every", "3", "-q"]
    result = train(*command, "--steps", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["adapter.pth", "log.jsonl", "previews", "step-0000002", "step-0000003"]
    assert [r["step"] for r in log_records(run) if "seconds" in r] == [1, 2, 3]
    assert (run / "previews" / "step-0000003.png").is_file()

    start = read_checkpoint(tiny_model_dir[1])  # the tiny adapter the run started from (same seed)
    trained = read_checkpoint(run / "adapter.pth")
    assert list(trained) == list(start) and all(trained[k].shape == start[k].shape for k in start)
    changed = [k for k in start if not torch.equal(trained[k], start[k])]
    assert len(changed) > 0.5 * len(start) and "geometry.bbox" not in changed
    pipe = TriplaneTurboPipeline.from_pretrained(str(tiny_model_dir[0]), str(run / "adapter.pth"),
                                                 config=GenerationConfig(latent_size=16))
    pipe.set_progress_bar_config(disable=True)
    assert len(pipe("a wooden chair", seed=1, mesh_resolution=48, texture="vertex").meshes[0].faces) > 100

    result = train(*command, "--steps", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "resuming from run/step-0000003 (step 3)" in result.stderr
    assert [r["step"] for r in log_records(run) if "seconds" in r] == [1, 2, 3, 4]
    assert torch.load(run / "adapter.pth", weights_only=True)["global_step"] == 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(600)
def test_two_processes_train_one_adapter(tmp_path):
    """Data parallel through accelerate: different prompts and cameras per process, gradients averaged,
    so both processes end with the same adapter."""
    (tmp_path / "prompts.txt").write_text("a wooden chair\na red car\na teapot\na lamp\n")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port())]
    result = train("-m", "triplane_turbo.train", "--tiny", "--prompts", "prompts.txt", "--output", "run", "--steps", "2",
                   "--renderers", "volume", "-q", cwd=tmp_path, launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    records = log_records(tmp_path / "run")
    assert records[-1] == {"step": 2, "finished": True, "processes": 2, "in_sync": True}
    prompts = [r["prompts"] for r in records if "seconds" in r]  # [step][process] -> that process's prompts
    assert all(len(step) == 2 for step in prompts) and any(a != b for a, b in prompts)  # different data per process


def test_bad_arguments_are_one_line(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    result = train(sys.executable, "-m", "triplane_turbo.train", "--tiny", "--prompts", "empty.txt", "--output", "run",
                   "--steps", "1", cwd=tmp_path)
    assert result.returncode == 2 and "holds no prompts" in result.stderr and not (tmp_path / "run").exists()
    result = train(sys.executable, "-m", "triplane_turbo.train", "--tiny", "--prompts", "empty.txt", "--output", "run",
                   "--steps", "0", cwd=tmp_path)
    assert result.returncode == 2 and "--steps must be at least 1" in result.stderr
