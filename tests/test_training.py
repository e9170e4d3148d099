"""PRD training on tiny models on the CPU: the unrolled step, what trains and what does not, the
renderers (gradients, normals and depth of a sphere, antialiasing, a forced surface), the learned
background, Adan, the schedules, data parallelism through accelerate, exact resumption, and the
command line (recipes, prompt sources, checkpoints)."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import torch

from triplane_turbo import GenerationConfig, TriplaneTurboPipeline
from triplane_turbo.adapter import adapter_parameters
from triplane_turbo.checkpoint import read_checkpoint
from triplane_turbo.training import (Adan, FixedImageTeacher, LearnedBackground, MeshRenderer, NeuSRenderer, PRDTrainer,
                                     StableDiffusionTeacher, Teacher, TrainConfig, VolumeConfig, sample_cameras)
from triplane_turbo.texturing.antialias import antialias, edge_neighbours
from triplane_turbo.training.config import (TINY_TRAINING, TINY_TRAINING_LATENT, BackgroundConfig, CameraConfig,
                                             MeshConfig, OptimizerConfig)
from triplane_turbo.training.mesh import differentiable_mesh
from triplane_turbo.training.recipes import RECIPES
from triplane_turbo.training.teachers import Renders
from triplane_turbo.triplane import TriplaneFields, sample_bilinear

from .conftest import free_port

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a wooden chair", "a red car"]



def tiny_training_pipe(tiny_model_dir):
    base_dir, adapter_file = tiny_model_dir
    pipe = TriplaneTurboPipeline.from_pretrained(str(base_dir), str(adapter_file), fuse_lora=False,
                                                 config=GenerationConfig(latent_size=TINY_TRAINING_LATENT))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def loaded_training_pipe(tiny_model_dir):
    """The tiny model loaded for training once per module; never trained itself (``training_pipe``)."""
    return tiny_training_pipe(tiny_model_dir)


@pytest.fixture
def training_pipe(loaded_training_pipe):
    """A pipeline of this test's own, as ``tiny_training_pipe`` loads it: a copy of the loaded one (a
    trainer changes its weights and flags; the copy is bit for bit a fresh load, at a third of the CPU)."""
    return copy.deepcopy(loaded_training_pipe)


def snapshot(parameters) -> list[torch.Tensor]:
    return [p.detach().clone() for p in parameters]


def test_the_training_timesteps_are_the_inference_timesteps(tiny_model_dir, training_pipe):
    pipe = training_pipe
    trainer = PRDTrainer(pipe, [], TrainConfig(**TINY_TRAINING))
    assert trainer.timesteps().tolist() == pipe.timesteps(4).tolist() == [999, 749, 499, 249]
    with pytest.raises(ValueError, match="fuse_lora=False"):
        PRDTrainer(TriplaneTurboPipeline.from_pretrained(*map(str, tiny_model_dir)), [], TrainConfig())


def test_one_iteration_trains_the_adapter_and_nothing_else(tiny_model_dir, training_pipe):
    pipe = training_pipe
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

    background_before = snapshot(trainer.background.parameters())
    trainer.train_step(PROMPTS)  # the optimiser step
    assert (trainer.iteration, trainer.optimizer_steps) == (2, 1)
    assert all(not torch.equal(a, b) for a, b in zip(background_before, trainer.background.parameters()))
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
    triplane = (torch.randn(1, 6, 4, 4, 4, dtype=torch.float64) * 0.3).requires_grad_(True)
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


def test_a_fixed_target_image_is_learned(training_pipe):
    """With a teacher that wants every view to be one orange picture, the render loss halves within a
    dozen iterations (Adan at 3e-3; the learned background is off, or it alone could match the colour)."""
    pipe = training_pipe
    target = torch.tensor([1.0, 0.5, 0.1])[:, None, None].expand(3, 8, 8)
    config = TrainConfig(prompts_per_step=1, renderers=("volume",), eikonal=(0.0, 0.0), sparsity=(0.0, 0.0),
                         cameras=CameraConfig(views=2), volume=VolumeConfig(coarse_samples=12, fine_samples=4, rays=12,
                                                                            global_rays=0, patch_rays=0),
                         gradient_checkpointing=False, learned_background=False, optimizer=OptimizerConfig(lr=3e-3))
    trainer = PRDTrainer(pipe, [FixedImageTeacher(target)], config)
    losses = [trainer.train_step(["a pumpkin"])["fixed-image/volume"] for _ in range(12)]
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses


# ---------------------------------------------------------------------------------------------
# Normals, depth, antialiasing and the forced surface
# ---------------------------------------------------------------------------------------------
def sphere_fields() -> TriplaneFields:
    """Fields whose SDF is exactly the sphere prior |p| − 0.5 (the heads' last layers zeroed)."""
    torch.manual_seed(0)
    fields = TriplaneFields(4, (8,), sphere_radius=0.5, twice_differentiable=True)
    with torch.no_grad():
        fields.sdf_network.layers[-1].weight.zero_()
        fields.deformation_network.layers[-1].weight.zero_()
    return fields


def analytic_sphere(cameras, size: int, radius: float = 0.5):
    """Per pixel: whether the ray hits the sphere, the distance along it, and the outward normal there."""
    origins, directions = cameras.rays(size)
    b = (origins * directions).sum(-1)
    disc = b * b - ((origins * origins).sum(-1) - radius ** 2)
    t = -b - disc.clamp(min=0).sqrt()
    normal = torch.nn.functional.normalize(origins + t[..., None] * directions, dim=-1)
    return disc > 0, t, normal


@pytest.mark.parametrize("renderer", ["volume", "mesh"])
def test_normal_and_depth_renders_of_a_sphere_match_the_analytic_ones(renderer):
    fields, triplane = sphere_fields(), torch.randn(1, 6, 4, 8, 8)
    cameras = sample_cameras(1, CameraConfig(views=2), torch.Generator().manual_seed(0))
    size = 40
    if renderer == "volume":
        out = NeuSRenderer(VolumeConfig(rays=size, global_rays=0, patch_rays=0, coarse_samples=64, fine_samples=32)).render(
            fields, triplane, cameras, torch.Generator().manual_seed(0))
    else:
        out = MeshRenderer(MeshConfig(grid=64, image=size)).render(fields, triplane, cameras)
    hit, distance, normal = analytic_sphere(cameras, size)
    opacity = out.opacity[:, 0].detach()
    inside = hit & (opacity > 0.999)
    assert inside.sum() > 0.6 * hit.sum()  # most of the disc is opaque
    assert float(opacity[~hit].max()) < 0.6 and float(opacity[hit].min()) > 0.4  # the silhouette is where it should be
    depth, normals = out.depth[:, 0].detach(), out.normal.permute(0, 2, 3, 1).detach()
    # distance along the ray (NeuS' expected depth with a fixed sharpness s = 100 is off by O(1/s); the
    # marching-cubes mesh is a polyhedron with vertices on the sphere, cells 0.03 wide)
    assert float((depth[inside] - distance[inside]).abs().max()) < 0.03
    assert float((normals[inside] * normal[inside]).sum(-1).min()) > 0.995  # world-space, outward, unit
    assert float(normals[~hit].norm(dim=-1).max()) < 0.6 and float(depth[~hit].abs().max()) < 0.6 * 2  # premultiplied


def test_antialiasing_gives_coverage_and_silhouette_gradients():
    """nvdiffrast's antialias: a vertical edge at x = 5.3 pixels covers 0.3 of pixel 5, and moving the edge
    changes the covered area at the rate of its length (10 pixels tall: d(area)/d(x_ndc) = 10 · W/2)."""
    from triplane_turbo.texturing.raster import rasterize

    w = h = 10
    ndc = lambda px, py: [px / w * 2 - 1, py / h * 2 - 1, 0.0, 1.0]  # noqa: E731
    positions = torch.tensor([ndc(-20, -20), ndc(5.3, -20), ndc(5.3, 40)], requires_grad=True)
    faces = torch.tensor([[0, 1, 2]])
    rast = rasterize(positions.detach(), faces, (h, w))
    out = antialias((rast[..., 3:] > 0).float(), rast, positions, faces, backend="torch")
    assert torch.allclose(out[0, :, :, 0].sum(1), torch.full((h,), 5.3), atol=1e-4)
    out.sum().backward()
    assert abs(float(positions.grad[:, 0].sum()) - h * w / 2) < 1e-2
    # a closed mesh (tetrahedron): every edge has its neighbour; an open one (two triangles) has boundaries
    tetra = torch.tensor([[0, 1, 2], [0, 3, 1], [1, 3, 2], [2, 3, 0]])
    neighbours = edge_neighbours(tetra)
    assert (neighbours >= 0).all() and all(int(neighbours[t, i]) not in tetra[t].tolist() for t in range(4) for i in range(3))
    assert edge_neighbours(torch.tensor([[0, 1, 2], [2, 1, 3]])).tolist() == [[3, -1, -1], [-1, -1, 0]]


def test_an_sdf_without_surface_gets_one_forced():
    fields, triplane = sphere_fields(), torch.randn(1, 6, 4, 8, 8)
    fields.sphere_radius = -0.5  # |p| + 0.5 > 0 everywhere: no zero crossing
    vertices, faces, forced = differentiable_mesh(fields, triplane, 16, force_surface=True)
    assert forced and len(faces) > 0 and float(vertices.detach().norm(dim=-1).max()) < 0.3  # a small blob at the centre
    assert len(differentiable_mesh(fields, triplane, 16, force_surface=False)[1]) == 0
    out = MeshRenderer(MeshConfig(grid=16, image=16)).render(fields, triplane.requires_grad_(True), sample_cameras(1))
    assert out.forced == [True] and float(out.opacity.detach().sum()) > 0
    out.rgb.sum().backward()
    assert triplane.grad is not None and float(triplane.grad.abs().sum()) > 0


# ---------------------------------------------------------------------------------------------
# The learned background and Adan
# ---------------------------------------------------------------------------------------------
def test_the_learned_background_trains_and_is_white_at_evaluation():
    torch.manual_seed(0)
    background = LearnedBackground(32, BackgroundConfig(levels=4, log2_table=10, hidden=16))
    text = torch.randn(2, 32)
    directions = torch.nn.functional.normalize(torch.randn(2, 50, 3), dim=-1)
    target = torch.tensor([[0.2, 0.6, 0.9], [0.9, 0.3, 0.1]])[:, None, :]  # a colour per prompt
    optimizer = Adan(background.parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        loss = ((background(directions, text) - target) ** 2).mean()
        first = first if first is not None else float(loss.detach())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 0.1 * first
    assert background.encoding.table.grad.abs().sum() > 0  # the hash grid trains, not only the hypernetwork
    colors = background(directions, text).detach()
    assert torch.allclose(colors.mean(1), target[:, 0], atol=0.1)  # each prompt its own colour
    background.eval()
    assert torch.equal(background(directions, text), torch.ones(2, 50, 3))


def adan_by_hand(theta: torch.Tensor, grads: list[torch.Tensor], lr: float, betas, eps: float) -> list[torch.Tensor]:
    """Adan's update rule (the authors' convention: each beta weighs the *old* average), step by step."""
    b1, b2, b3 = betas
    m = d = n = torch.zeros_like(theta)
    previous, out = grads[0], []
    for k, g in enumerate(grads, start=1):
        diff = g - previous
        m = b1 * m + (1 - b1) * g
        d = b2 * d + (1 - b2) * diff
        n = b3 * n + (1 - b3) * (g + b2 * diff) ** 2
        step = (m / (1 - b1 ** k) + b2 * d / (1 - b2 ** k)) / ((n / (1 - b3 ** k)).sqrt() + eps)
        theta = theta - lr * step
        previous = g
        out.append(theta)
    return out


class InvertedBetasAdan(Adan):
    """The other published convention (adan-pytorch's): each beta weighs the *new* value. Given the
    authors' numbers it must not pass the test below."""

    def __init__(self, params, betas, **kwargs):
        super().__init__(params, betas=tuple(1 - b for b in betas), **kwargs)


@pytest.mark.parametrize("optimizer_class, matches", [(Adan, True), (InvertedBetasAdan, False)])
def test_adan_follows_the_update_rule_with_the_authors_betas(optimizer_class, matches):
    betas, lr, eps = (0.98, 0.92, 0.99), 0.1, 1e-15
    start = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    param = start.clone().requires_grad_(True)
    optimizer = optimizer_class([param], lr=lr, betas=betas, eps=eps)
    seen, grads = [], []
    for _ in range(2):  # a quadratic bowl: the gradient changes between the two steps
        optimizer.zero_grad()
        ((param - torch.tensor([3.0, 1.0, -1.0], dtype=torch.float64)) ** 2 * torch.tensor([1.0, 4.0, 0.5])).sum().backward()
        grads.append(param.grad.clone())
        optimizer.step()
        seen.append(param.detach().clone())
    assert not torch.allclose(grads[0], grads[1])
    expected = adan_by_hand(start, grads, lr, betas, eps)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(seen, expected)) == matches


def test_adan_is_the_default_optimiser_with_the_authors_settings(training_pipe):
    trainer = PRDTrainer(training_pipe, [], TrainConfig(**TINY_TRAINING))
    assert isinstance(trainer.optimizer, Adan)
    groups = trainer.optimizer.param_groups
    assert [g["lr"] for g in groups] == [2e-4, 2e-4]  # the adapter and the background (lr 2e-4 each)
    assert all(g["betas"] == (0.98, 0.92, 0.99) and g["eps"] == 1e-15 and g["weight_decay"] == 0 for g in groups)
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in trainer.background.parameters()}


# ---------------------------------------------------------------------------------------------
# Schedules, --from-scratch, data parallelism, resuming
# ---------------------------------------------------------------------------------------------
class RecordingTeacher(Teacher):
    """Remembers the schedule step of every call; a loss that reaches the renders."""

    name = "recording"

    def __init__(self):
        self.steps: list[int] = []

    def loss(self, renders, prompts, step, generator=None):
        self.steps.append(step)
        return renders.rgb.mean()


FAST = dict(prompts_per_step=1, renderers=("volume",), cameras=CameraConfig(views=1), gradient_checkpointing=False,
            volume=VolumeConfig(coarse_samples=8, fine_samples=0, rays=8, global_rays=0, patch_rays=0),
            background=BackgroundConfig(levels=2, log2_table=8, hidden=8))


def test_with_accumulation_the_schedules_advance_once_per_optimiser_step(training_pipe):
    teacher = RecordingTeacher()
    trainer = PRDTrainer(training_pipe, [teacher], TrainConfig(**FAST, accumulate=3, schedule_start=10))
    before = snapshot(trainer.parameters)
    for i in range(6):
        trainer.train_step(["a chair"])
        changed = not all(torch.equal(a, b) for a, b in zip(before, trainer.parameters))
        assert changed == (i >= 2)  # the first update comes with the third iteration
    assert trainer.iteration == 6 and trainer.optimizer_steps == 2
    assert teacher.steps == [10] * 12 + [11] * 12  # 4 denoising steps per iteration, 3 iterations per update


def test_from_scratch_the_adapter_is_initialised_as_the_authors(tiny_model_dir):
    """The authors' initialisation (custom/triplaneturbo/extern/few_step_triplane_dual_sd_modules.py):
    every LoRA ``down`` ~ N(0, (1/rank)²) and ``up`` = 0 (lines 68-69; the LoCON layers lines 176-182),
    where rank is the *slot's* rank: the UNet self-attention and the VAE attention take
    ``self_lora_rank``, the cross-attention ``cross_lora_rank`` (lines 936-944), the LoCON convolutions
    ``locon_rank`` (lines 787-789, 891). Distinct ranks (2, 4, 8) tell 1/rank from any constant; the
    pipeline built on it runs, and zeroing ``down`` changes nothing (up = 0)."""
    from triplane_turbo import adapter as peta
    from triplane_turbo.hub import ResolvedWeights
    from triplane_turbo.loading import components_from_resolved
    from triplane_turbo.training.init import fresh_adapter_state_dict

    base_dir = tiny_model_dir[0]
    parts = components_from_resolved(ResolvedWeights(base_dir, base_dir, "scratch"))
    spec = peta.AdapterSpec(self_rank=2, cross_rank=4, conv_rank=8, out_channels=16, mlp_hidden=(16, 16))
    layout = peta.expected_layout(peta.adapter_slots(parts["unet"], parts["vae"]), spec)
    fresh = fresh_adapter_state_dict(parts["unet"], parts["vae"], spec, seed=0)
    rank_of = {peta.SELF_ATTN: 2, peta.VAE_ATTN: 2, peta.CROSS_ATTN: 4, peta.UNET_LOCON: 8, peta.VAE_LOCON: 8}
    downs: dict[int, list[torch.Tensor]] = {}
    for key, (shape, _, kind) in layout.items():
        if key.endswith("down.weight"):
            downs.setdefault(rank_of[kind], []).append(fresh[key].reshape(-1))
    assert sorted(downs) == [2, 4, 8]
    for rank, values in downs.items():
        values = torch.cat(values)
        assert len(values) > 2000 and abs(float(values.std()) * rank - 1) < 0.1, rank  # std 1/rank
        assert abs(float(values.mean())) < 3 / rank / len(values) ** 0.5 + 1e-3
    assert all(float(v.abs().sum()) == 0 for k, v in fresh.items() if k.endswith("up.weight"))
    assert torch.equal(fresh["geometry.bbox"], torch.tensor([[-1.0] * 3, [1.0] * 3]))
    pipe = TriplaneTurboPipeline.from_components(**parts, adapter_state_dict=fresh, fuse_lora=False,
                                                 config=GenerationConfig(latent_size=TINY_TRAINING_LATENT))
    size = TINY_TRAINING_LATENT
    x, t, context = torch.randn(6, 4, size, size), torch.tensor(999), torch.randn(6, 77, 32)
    with torch.no_grad():
        adapted = pipe.predict_noise(x, t, context)
        for name, param in pipe.unet.named_parameters():
            if name.endswith(".down") or ".lora_A." in name:
                param.zero_()
        assert torch.allclose(pipe.predict_noise(x, t, context), adapted, atol=1e-6)
    assert torch.isfinite(pipe.latents_to_triplane(x)).all()


def make_accelerated_trainer(tiny_model_dir, pipe, project: Path, **overrides):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    accelerator = Accelerator(cpu=True, project_config=ProjectConfiguration(
        project_dir=str(project), automatic_checkpoint_naming=True, total_limit=2))
    config = TrainConfig(**{**FAST, "renderers": ("mesh", "volume"), "mesh": MeshConfig(grid=16, image=16), **overrides})
    teacher = StableDiffusionTeacher(tiny_model_dir[0], config=TINY_TRAINING["guidance"])
    return PRDTrainer(pipe, [teacher], config, accelerator)


def test_resuming_restores_the_optimiser_and_the_random_states_exactly(tmp_path, tiny_model_dir, loaded_training_pipe):
    """A run saved after two iterations and resumed elsewhere takes the same third step as the
    uninterrupted run: weights, Adan's moments, the counters and the RNG states come back."""
    from triplane_turbo.training import latest_checkpoint

    first = make_accelerated_trainer(tiny_model_dir, copy.deepcopy(loaded_training_pipe), tmp_path / "a")
    for _ in range(2):
        first.train_step(["a chair"])
    folder = first.save_state()
    assert folder == latest_checkpoint(tmp_path / "a") and (folder / "adapter.pth").is_file()
    assert not (folder / "model.safetensors").exists()  # the frozen base weights are not copied
    draw_after_save = torch.rand(3)
    third = first.train_step(["a red car"])
    expected = snapshot(first.trainable_parameters)
    adan_state = first.optimizer.state_dict()["state"]

    torch.manual_seed(1234)  # another global random state, undone by the resume
    torn = tmp_path / "a" / "checkpoints" / "checkpoint_1"  # a save that a kill cut short
    torn.mkdir()
    (torn / "optimizer.bin").write_bytes(b"half")
    resumed = make_accelerated_trainer(tiny_model_dir, copy.deepcopy(loaded_training_pipe), tmp_path / "a")
    resumed.load_state(folder)
    assert torch.equal(torch.rand(3), draw_after_save)
    assert (resumed.iteration, resumed.optimizer_steps) == (2, 2)
    assert resumed.train_step(["a red car"]) == third
    assert all(torch.equal(a, b) for a, b in zip(expected, resumed.trainable_parameters))
    resumed_state = resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(adan_state[k][name], resumed_state[k][name]) for k in adan_state for name in adan_state[k])
    # later saves continue the numbering (over the torn one); the total limit keeps two
    resumed.save_state()
    resumed.save_state()
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["checkpoint_1", "checkpoint_2"]


DDP_SCRIPT = """
import sys, torch
from accelerate import Accelerator
from triplane_turbo import GenerationConfig, TriplaneTurboPipeline
from triplane_turbo.training import PRDTrainer, StableDiffusionTeacher, TrainConfig, VolumeConfig, MeshConfig
from triplane_turbo.training.config import TINY_TRAINING, TINY_TRAINING_LATENT, BackgroundConfig, CameraConfig
from triplane_turbo.training.prd import ddp_kwargs

def step_gradients(base, adapter, fake_rank, pipe=None):
    # the gradients the optimiser sees after one iteration: in a process of a DDP run (fake_rank < 0),
    # or in a single process drawing the data of rank fake_rank (pipe: the tiny model as loaded below)
    config = TrainConfig(prompts_per_step=1, renderers=("mesh", "volume"), cameras=CameraConfig(views=1),
                         volume=VolumeConfig(coarse_samples=8, fine_samples=0, rays=8, global_rays=0, patch_rays=0),
                         mesh=MeshConfig(grid=16, image=16), background=BackgroundConfig(levels=2, log2_table=8, hidden=8))
    accelerator = Accelerator(cpu=True, kwargs_handlers=[ddp_kwargs(config)])
    if pipe is None:
        pipe = TriplaneTurboPipeline.from_pretrained(base, adapter, fuse_lora=False,
                                                     config=GenerationConfig(latent_size=TINY_TRAINING_LATENT))
    teacher = StableDiffusionTeacher(base, config=TINY_TRAINING["guidance"], text_encoder=pipe.text_encoder,
                                     tokenizer=pipe.tokenizer)
    trainer = PRDTrainer(pipe, [teacher], config, accelerator)
    trainer.rank = accelerator.process_index if fake_rank < 0 else fake_rank
    grads = {}
    step = trainer.optimizer.step
    def capture():
        grads.update({i: p.grad.clone() for i, p in enumerate(trainer.trainable_parameters)})
        step()
    trainer.optimizer.step = capture
    trainer.train_step(["a chair" if trainer.rank == 0 else "a red car"])
    return grads, accelerator.is_main_process


if __name__ == "__main__":
    base, adapter, gradients_file, *train_argv = sys.argv[1:]
    grads, main = step_gradients(base, adapter, -1)
    if main:
        torch.save(grads, gradients_file)
    # Then, in the same two processes, the command line's run: as when launched on its own, it writes
    # its tiny model before it starts a process group. Its group meets at a store of its own, served
    # by rank 0 on a port it has just found free, not at the launcher's, which holds the first
    # group's keys.
    import os, socket
    from accelerate.state import AcceleratorState, GradientState
    from triplane_turbo import train

    port = [None]
    if torch.distributed.get_rank() == 0:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port[0] = probe.getsockname()[1]
    torch.distributed.broadcast_object_list(port, src=0)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    os.environ.update(MASTER_PORT=str(port[0]), TORCHELASTIC_USE_AGENT_STORE="False")
    sys.exit(train.main(train_argv))
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_processes_average_the_gradients_of_all_four_passes_and_train_one_adapter(tmp_path, tiny_model_dir,
                                                                                      loaded_training_pipe):
    """Data parallel through accelerate, in one launch of two processes.

    First one iteration through ``accelerate.prepare``, the first three backward passes under
    no_sync: the gradient the optimiser sees in the two processes is the mean of what one process
    computes on each one's data (so the deferred passes are reduced too). Then the command line's run
    (``train.main``) in the same processes: different prompts and cameras per process, gradients
    averaged, so both end with the same adapter."""
    script = tmp_path / "ddp_step.py"
    script.write_text(DDP_SCRIPT)
    (tmp_path / "prompts.txt").write_text("a wooden chair\na red car\na teapot\na lamp\n")
    base, adapter = map(str, tiny_model_dir)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port())]
    train_argv = ["--tiny", "--recipe", "sd", "--prompts", "prompts.txt", "--output", "run", "--steps", "1",
                  "--renderers", "volume", "--prompts-per-step", "1", "--views", "1", "--preview-every", "0", "-q"]
    ddp = subprocess.Popen([*launcher, str(script), base, adapter, str(tmp_path / "both.pt"), *train_argv],
                           cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        namespace: dict = {"__name__": "ddp_step"}
        exec(compile(DDP_SCRIPT, str(script), "exec"), namespace)  # meanwhile, each rank's data in this process alone
        # (on copies of the module's loaded pipeline: what the script loads, bit for bit)
        one, other = (namespace["step_gradients"](base, adapter, rank, copy.deepcopy(loaded_training_pipe))[0]
                      for rank in (0, 1))
        output, _ = ddp.communicate(timeout=400)
    finally:  # a failure here or a hang: no launcher or rank outlives the test
        if ddp.poll() is None:
            for process in [*psutil.Process(ddp.pid).children(recursive=True), psutil.Process(ddp.pid)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
            print(ddp.communicate()[0][-3000:])  # what the processes said, in the test's report
    assert ddp.returncode == 0, output[-3000:]
    both = torch.load(tmp_path / "both.pt", weights_only=True)
    assert len(both) == len(one) > 0
    assert not all(torch.allclose(one[i], other[i]) for i in one)  # the two processes had different data
    # equal up to float32 rounding at the scale of each tensor's two gradients (the runs sum in
    # different orders: up to 2e-4 of it seen, in a small bias where the two nearly cancel; a tensor
    # left out of the reduction would be off by a good part of it)
    def off(i):
        scale = torch.maximum(one[i].abs().max(), other[i].abs().max())
        return float((both[i] - (one[i] + other[i]) / 2).abs().max() / scale) if scale > 0 else 0.0
    assert max(map(off, both)) < 1e-3, sorted(both, key=off)[-3:]

    records = log_records(tmp_path / "run")
    assert records[-1] == {"step": 1, "finished": True, "processes": 2, "in_sync": True}
    prompts = [r["prompts"] for r in records if "seconds" in r]  # [step][process] -> that process's prompts
    assert all(len(step) == 2 for step in prompts) and any(a != b for a, b in prompts)  # different data per process


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------
def log_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def run_train(argv, cwd, monkeypatch, capsys) -> tuple[int, str]:
    """``python -m triplane_turbo.train ARGV`` in ``cwd``, in this process: (exit code, stderr)."""
    from triplane_turbo import train as train_cli

    monkeypatch.chdir(cwd)
    try:
        code = train_cli.main(argv)
    except SystemExit as exit_:  # argparse's errors
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.mark.timeout(600)
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_a_run_exports_an_adapter_that_loads_and_resuming_continues(recipe, tmp_path, tiny_model_dir, monkeypatch,
                                                                      capsys):
    """Every recipe trains and exports an adapter that loads; with ``sd``, three steps check the
    schedule of saves, previews and the resume (the same code for every recipe)."""
    (tmp_path / "prompts.txt").write_text("a wooden chair\n\na red car\na teapot\n")
    command = ["--tiny", "--recipe", recipe, "--prompts", "prompts.txt", "--output", "run", "--save-every", "2",
               "--preview-every", "3", "--prompts-per-step", "1", "-q"]
    steps = 3 if recipe == "sd" else 1  # the schedule of saves and previews is the same for every recipe
    code, err = run_train([*command, "--steps", str(steps)], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    run = tmp_path / "run"
    assert {"adapter.pth", "log.jsonl", "checkpoints"} <= {p.name for p in run.iterdir()}
    saved = {3: ["checkpoint_0", "checkpoint_1"], 1: ["checkpoint_0"]}[steps]  # every 2nd step, and the last
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == saved
    assert [(r["iteration"], r["step"], r["schedule_step"]) for r in log_records(run) if "seconds" in r] == \
        [(1, 1, 15000), (2, 2, 15001), (3, 3, 15002)][:steps]  # fine-tuning: the schedules start where the authors' run ended
    assert (run / "previews" / "step-0000003.png").is_file() == (steps == 3)
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "logs").rglob("*")) == TENSORBOARD

    start = read_checkpoint(tiny_model_dir[1])  # the tiny adapter the run started from (same seed)
    trained = read_checkpoint(run / "adapter.pth")
    assert list(trained) == list(start) and all(trained[k].shape == start[k].shape for k in start)
    changed = [k for k in start if not torch.equal(trained[k], start[k])]
    assert len(changed) > 0.5 * len(start) and "geometry.bbox" not in changed
    assert not any(k.startswith("background") for k in trained)  # the background stays with the run
    assert any(k.startswith("background.") for k in torch.load(run / "checkpoints" / saved[-1]
                                                                / "trainable.pt", weights_only=True))
    pipe = TriplaneTurboPipeline.from_pretrained(str(tiny_model_dir[0]), str(run / "adapter.pth"),
                                                 config=GenerationConfig(latent_size=TINY_TRAINING_LATENT))
    pipe.set_progress_bar_config(disable=True)
    assert len(pipe("a wooden chair", seed=1, mesh_resolution=48, texture="vertex").meshes[0].faces) > 100
    if recipe != "sd":
        return  # resuming is the same for every recipe

    code, err = run_train([*command, "--steps", "4"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert "resuming from run/checkpoints/checkpoint_1 (step 3)" in err
    assert [r["step"] for r in log_records(run) if "seconds" in r] == [1, 2, 3, 4]
    assert torch.load(run / "adapter.pth", weights_only=True)["global_step"] == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint_1", "checkpoint_2"]  # --keep 2


TENSORBOARD = __import__("importlib").util.find_spec("tensorboard") is not None


def test_the_default_recipe_names_what_is_missing(tmp_path, monkeypatch, capsys):
    """authors-v1 needs RichDreamer's weights, which are not on the Hub: said before anything loads."""
    (tmp_path / "prompts.txt").write_text("a chair\n")
    code, err = run_train(["--prompts", "prompts.txt", "--output", "run", "--steps", "1"], tmp_path, monkeypatch, capsys)
    assert code == 1 and "richdreamer teacher's weights are not published on the Hub" in err
    assert "--richdreamer-weights" in err and not (tmp_path / "run").exists()


def test_prompts_from_text_files_json_libraries_and_hub_datasets(tmp_path):
    from triplane_turbo.training.prompts import read_prompts

    (tmp_path / "p.txt").write_text("a chair\n\n  a red   car \n")
    assert read_prompts(tmp_path / "p.txt") == ["a chair", "a red car"]
    library = {"train": ["a 20-sided die made out of glass", "a bald eagle"], "val": ["x"], "test": ["y"]}
    (tmp_path / "lib.json").write_text(json.dumps(library))
    assert read_prompts(tmp_path / "lib.json") == library["train"]
    asked = []

    def download(repo_id, filename, repo_type):
        asked.append((repo_id, filename, repo_type))
        return str(tmp_path / "lib.json")

    assert read_prompts("ZhiyuanthePony/TriplaneTrubo", download=download) == library["train"]
    assert read_prompts("someone/captions:p.json", download=download) == library["train"]
    assert asked == [("ZhiyuanthePony/TriplaneTrubo", "3DTopia_prompt_library.json", "dataset"),
                     ("someone/captions", "p.json", "dataset")]
    with pytest.raises(ValueError, match="name the file"):
        read_prompts("someone/captions", download=download)
    (tmp_path / "bad.json").write_text('{"val": []}')
    with pytest.raises(ValueError, match="'train' list"):
        read_prompts(tmp_path / "bad.json")


def test_a_log_line_cut_short_by_a_kill_does_not_stop_the_resume(tmp_path):
    from triplane_turbo.training.monitor import truncate_log

    log = tmp_path / "log.jsonl"
    log.write_text('{"iteration": 1, "loss": 1}\n{"iteration": 2, "loss": 2}\n{"iteration": 3, "lo')
    truncate_log(log, 1)  # resumed from the checkpoint after iteration 1
    assert log.read_text() == '{"iteration": 1, "loss": 1}\n'


def test_bad_arguments_are_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n")
    code, err = run_train(["--tiny", "--recipe", "sd", "--prompts", "empty.txt", "--output", "run", "--steps", "1"],
                          tmp_path, monkeypatch, capsys)
    assert code == 2 and "holds no prompts" in err and not (tmp_path / "run").exists()
    code, err = run_train(["--tiny", "--prompts", "empty.txt", "--output", "run", "--steps", "0"], tmp_path, monkeypatch,
                          capsys)
    assert code == 2 and "--steps must be at least 1" in err
    code, err = run_train(["--tiny", "--teachers", "sd,clip", "--prompts", "empty.txt", "--output", "run", "--steps",
                           "1"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "unknown teacher 'clip'" in err


def test_the_trainer_evaluates_every_n_steps_with_the_evaluation_command_s_code(tmp_path, monkeypatch, capsys):
    """--eval-every: the paper's CLIP score and R@1 (tiny CLIP here) logged and kept per step."""
    (tmp_path / "prompts.txt").write_text("a wooden chair\na red car\n")
    (tmp_path / "eval.txt").write_text("a teapot\na lamp, with a shade\n")
    code, err = run_train(["--tiny", "--recipe", "sd", "--prompts", "prompts.txt", "--output", "run", "--steps", "2",
                           "--prompts-per-step", "1", "--views", "1", "--renderers", "mesh", "--preview-every", "0",
                           "--eval-every", "1", "--eval-prompts", "eval.txt", "-q"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    scores = [r for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines()) if "clip_score" in r]
    assert [r["step"] for r in scores] == [1, 2] and all(0 <= r["r_at_1"] <= 100 for r in scores)
    for step in (1, 2):
        metrics = json.loads((tmp_path / "run" / "eval" / f"step-{step:07d}" / "metrics.json").read_text())
        assert metrics["info"]["step"] == step and metrics["prompts_evaluated"] == len(metrics["prompts"]) == 2
        assert metrics["clip_score"] == pytest.approx(scores[step - 1]["clip_score"], abs=1e-3)


# ---------------------------------------------------------------------------------------------
# As the authors ran it (issue 31): clip-space mesh depth, the empty-view rule, the proposal step,
# the presets, parallel guidance, prompt slicing
# ---------------------------------------------------------------------------------------------
def test_richdreamer_sees_the_authors_clip_space_mesh_depth_on_a_sphere():
    """The authors' mesh path gives RichDreamer the clip-space z of the surface (interpolated
    ``v_pos_clip[..., 2]``, generative_space_mesh_rasterize_renderer.py:153-154, near 0.1 / far 1000 from
    multiview_multiprompt_dualrender_multistep_v2.py:339-341) in disparity = clamp((far − z)/(far − near),
    0, 1), far/near = distance ± √3 (lines 176-189). On the sphere |p| = 0.5 that is computed here from
    the analytic hit point: about 0.2/(2√3) ≈ 0.058 above the disparity of the ray distance."""
    from triplane_turbo.training.richdreamer import normal_depth_images

    fields, triplane = sphere_fields(), torch.randn(1, 6, 4, 8, 8)
    cameras = sample_cameras(1, CameraConfig(views=2), torch.Generator().manual_seed(0))
    size = 40
    out = MeshRenderer(MeshConfig(grid=64, image=size)).render(fields, triplane, cameras)
    hit, distance, _ = analytic_sphere(cameras, size)
    origins, directions = cameras.rays(size)
    points = origins + distance[..., None] * directions
    z_eye = torch.einsum("nij,nhwj->nhwi", torch.linalg.inv(cameras.c2w)[:, :3, :3], points) + \
        torch.linalg.inv(cameras.c2w)[:, None, None, :3, 3]
    near, far = 0.1, 1000.0
    z_clip = -(far + near) / (far - near) * z_eye[..., 2] - 2 * far * near / (far - near)
    box_far = (cameras.distance + math.sqrt(3)).view(-1, 1, 1)
    theirs = ((box_far - z_clip.clamp(max=box_far)) / (2 * math.sqrt(3))).clamp(0, 1)
    by_distance = ((box_far - distance) / (2 * math.sqrt(3))).clamp(0, 1)
    renders = Renders(out.rgb, out.opacity, cameras, "mesh", out.normal, out.depth, out.clip_depth)
    ours = normal_depth_images(renders)[:, 3].detach()
    inside = hit & (out.opacity[:, 0].detach() > 0.999)
    assert inside.sum() > 100
    assert float((ours[inside] - theirs[inside]).abs().max()) < 0.01  # the mesh is a polyhedron (cells 0.03)
    offset = (theirs - by_distance)[inside]
    # ≈ 0.2/(2√3) = 0.058 where the ray is the optical axis (the figure), more off-axis (the ray
    # distance exceeds the axial depth there)
    assert float(offset.min()) == pytest.approx(0.2 / (2 * math.sqrt(3)), abs=2e-3) and float(offset.max()) < 0.09
    ray = normal_depth_images(renders, mesh_depth="distance")[:, 3].detach()
    assert float((ray[inside] - by_distance[inside]).abs().max()) < 0.01


def test_with_no_surface_in_view_the_first_view_counts_as_covered_as_the_authors():
    """generative_space_mesh_rasterize_renderer.py:169-172: ``if mask.sum() == 0: mask[:1] = True``: the
    first view is covered everywhere, coloured by the field at the (zero) interpolated position, so
    the colour field keeps a gradient; the other views stay empty."""
    fields, triplane = sphere_fields(), torch.randn(1, 6, 4, 8, 8, requires_grad=True)
    cameras = sample_cameras(1, CameraConfig(views=2), torch.Generator().manual_seed(0))
    cameras.c2w[:, :3, 0] *= -1  # turned around (right and back negated): looking away from the sphere
    cameras.c2w[:, :3, 2] *= -1
    out = MeshRenderer(MeshConfig(grid=16, image=12)).render(fields, triplane, cameras)
    assert torch.equal(out.opacity[0], torch.ones(1, 12, 12)) and float(out.opacity[1].abs().max()) == 0
    origin_colour = fields.color(triplane, torch.zeros(1, 1, 3))[0, 0]
    assert torch.allclose(out.rgb[0], origin_colour.view(3, 1, 1).expand(3, 12, 12), atol=1e-6)
    assert float(out.clip_depth.abs().max()) == 0  # no triangle: the authors' interpolated z is 0 there
    out.rgb.sum().backward()
    assert float(triplane.grad.abs().sum()) > 0
    plain = MeshRenderer(MeshConfig(grid=16, image=12, empty_view_fallback=False)).render(fields, triplane, cameras)
    assert float(plain.opacity.abs().max()) == 0


def test_the_proposal_pass_uses_the_authors_step_on_a_sphere():
    """threestudio's NeuS renderer steps ``1.732 * 2 * radius / num_samples_per_ray`` (radius 1, 64
    samples: neus_volume_renderer.py:84-86); the proposal's α uses ``sdf ± step/2``, becomes a density
    α/step (generative_space_sdf_volume_renderer.py:289-297) that nerfacc integrates over each
    interval's length (estimators.py:84-88). Checked along a ray through the sphere |p| = 0.5."""
    from triplane_turbo.training.volume import proposal_opacity

    config = VolumeConfig()
    assert config.proposal_step_size == pytest.approx(1.732 * 2 / 64) == pytest.approx(0.054125)
    width = (config.far - config.near) / config.coarse_samples
    mids = config.near + width * (torch.arange(config.coarse_samples, dtype=torch.float64) + 0.5)
    sdf = (1.5 - mids).abs() - 0.5  # camera at 1.5 looking through the centre
    step, s = 1.732 * 2 / 64, 100.0
    prev, nxt = torch.sigmoid((sdf + step / 2) * s), torch.sigmoid((sdf - step / 2) * s)
    alpha = ((prev - nxt + 1e-5) / (prev + 1e-5)).clip(0, 1)
    theirs = 1 - torch.exp(-(alpha / step) * width)
    ours = proposal_opacity(sdf, width, config.proposal_step_size, config.inv_s)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-12)
    assert float(ours.max()) > 0.4  # the surface stands out (at the old step 3.9/128 it would read differently)
    assert not torch.allclose(proposal_opacity(sdf, width, width, s), theirs, atol=1e-3)


def test_the_presets_set_the_authors_config_values(tmp_path):
    """``--preset authors-48gb`` is configs/TriplaneTurbo_v1_acc-2.yaml (batch_size 4: one prompt × 4
    views, line 8; gradient_accumulation_steps 2, line 60; max_steps 30000, line 248; every min-step,
    regulariser and colour-gradient schedule to 40000, lines 139/156/165/177/226/229; rd_plus_ratio 0,
    line 192; mv_guidance_scale still over 20000, line 161); ``authors-98gb`` adds parallel_guidance
    (TriplaneTurbo_v1_Objaverse.sh:6); explicit options win."""
    from triplane_turbo.train import parse_args, teacher_settings, train_config

    def config(*extra):
        args = parse_args(["--prompts", "p.txt", "--output", str(tmp_path), *extra])
        return args, train_config(args)

    args, c = config("--preset", "authors-48gb")
    assert (c.steps, c.prompts_per_step, c.cameras.views, c.accumulate) == (30_000, 1, 4, 2)
    assert (c.regularisers_until, c.volume.color_grad_until, c.guidance.min_step_until) == (40_000,) * 3
    assert not c.parallel_guidance
    settings = teacher_settings(args)
    assert settings == {"mvdream": {"min_step_until": 40_000},
                        "richdreamer": {"min_step_until": 40_000, "plus_ratio": 0.0}}
    _, v1 = config("--steps", "15000")
    assert (v1.steps, v1.prompts_per_step, v1.accumulate, v1.regularisers_until, v1.volume.color_grad_until,
            v1.guidance.min_step_until, v1.parallel_guidance) == (15_000, 2, 1, 20_000, 20_000, 20_000, False)
    assert config("--preset", "authors-80gb")[1] == v1
    _, c98 = config("--preset", "authors-98gb")
    assert c98.parallel_guidance and c98.steps == 15_000
    assert config("--steps", "9", "--parallel-guidance")[1].parallel_guidance
    _, mine = config("--preset", "authors-48gb", "--steps", "7", "--accumulate", "3")
    assert (mine.steps, mine.accumulate, mine.prompts_per_step) == (7, 3, 1)
    with pytest.raises(SystemExit):
        parse_args(["--prompts", "p.txt", "--output", str(tmp_path)])  # no --steps and no preset


class ViewRecorder(Teacher):
    """Records the SD view choice each render carries."""

    name = "views"

    def __init__(self):
        self.seen: list[tuple[str, list[int] | None]] = []

    def loss(self, renders, prompts, step, generator=None):
        chosen = None if renders.sd_views is None else renders.sd_views.tolist()
        self.seen.append((renders.renderer, chosen))
        return renders.rgb.mean()


class StubRenderer:
    """Grey pictures of every view (the test is about which views the teachers read, not pixels)."""

    def render(self, fields, triplane, cameras, *args):
        from types import SimpleNamespace

        n = len(cameras)
        return SimpleNamespace(rgb=torch.full((n, 3, 4, 4), 0.5), opacity=torch.ones(n, 1, 4, 4),
                               normal=torch.zeros(n, 3, 4, 4), depth=torch.ones(n, 1, 4, 4))


def test_parallel_guidance_gives_the_sd_teacher_opposite_views(training_pipe):
    """The authors' parallel guidance with ``sd_oppo_side`` (richdreamer_mvdream_stablediffusion_asd_
    guidance.py:1677-1684): one random view of the mesh render, the opposite one ((v + 2) mod 4) of the
    volume render, drawn afresh each denoising step; without it the SD teacher draws its own view per render."""
    pipe = training_pipe
    cameras = sample_cameras(2, CameraConfig(views=4), torch.Generator().manual_seed(0))
    for parallel in (True, False):
        teacher = ViewRecorder()
        trainer = PRDTrainer(pipe, [teacher], TrainConfig(**dict(FAST, renderers=("mesh", "volume")),
                                                          parallel_guidance=parallel))
        trainer.mesh = trainer.volume = StubRenderer()
        trainer._inputs = dict(prompts=["a chair", "a car"], schedule_step=0, background=None, weights=(0.0, 0.0))
        for _ in range(6):  # six denoising steps' renders
            trainer._losses(None, cameras)
        assert [r for r, _ in teacher.seen] == ["mesh", "volume"] * 6
        if not parallel:
            assert all(views is None for _, views in teacher.seen)
            continue
        pairs = list(zip(teacher.seen[::2], teacher.seen[1::2]))
        assert all(v == [(m + 2) % 4 for m in mesh] for (_, mesh), (_, v) in pairs)
        assert len({tuple(mesh) for (_, mesh), _ in pairs}) > 1  # drawn afresh every denoising step
    renders = Renders(torch.rand(8, 3, 4, 4), torch.ones(8, 1, 4, 4), cameras, "volume", sd_views=torch.tensor([3, 1]))
    chosen = []
    teacher = StableDiffusionTeacher.__new__(StableDiffusionTeacher)  # only its view choice is exercised here
    teacher.config = TrainConfig().guidance

    class Stop(Exception):
        pass

    def encode(images):
        chosen.append(images)
        raise Stop

    teacher.vae, teacher.dtype = SimpleNamespace(encode=encode), torch.float32
    with pytest.raises(Stop):
        teacher.loss(renders, ["a chair", "a car"], 0)
    picked = torch.nn.functional.interpolate(renders.rgb[[3, 5]], (512, 512), mode="bilinear", align_corners=False)
    assert torch.allclose(chosen[0], picked * 2 - 1)  # prompt 0's view 3, prompt 1's view 1


def test_long_prompts_are_sliced_as_the_authors_and_truncated_for_sd(training_pipe):
    """The authors' prompt processors pad to 77 and keep the first 77 ids
    (stable_diffusion_multi_prompt_processor_callable.py:75-82): a long prompt loses its end token, so
    its pooled embedding (the background's condition) differs from truncation's, which keeps it."""
    from triplane_turbo.training.prompts import token_ids

    pipe = training_pipe
    tokenizer = pipe.tokenizer
    long = " ".join(["chair"] * 100)
    sliced, truncated = token_ids(tokenizer, [long, "a car"], "slice"), token_ids(tokenizer, [long, "a car"], "truncate")
    full = tokenizer(long).input_ids
    assert sliced[0].tolist() == full[:77] and truncated[0, -1] == tokenizer.eos_token_id != sliced[0, -1]
    assert torch.equal(sliced[1], truncated[1])  # short prompts: the same ids
    authors = PRDTrainer(pipe, [], TrainConfig(**FAST))
    hidden, pooled = authors.encode_prompts([long])
    expected = pipe.text_encoder(sliced[:1])
    assert torch.allclose(hidden, expected.last_hidden_state) and torch.allclose(pooled, expected.pooler_output)
    authors.config = TrainConfig(**FAST, prompt_tokens="truncate")
    assert not torch.allclose(authors.encode_prompts([long])[1], pooled)
    assert RECIPES["sd"].prompt_tokens == "truncate" and RECIPES["authors-v1"].prompt_tokens == "slice"
