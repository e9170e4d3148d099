"""The CUDA path: fixture A on the GPU, float16 error, marching cubes on the GPU, the tiny model end to end.

Skipped on machines without a CUDA device (all CI machines); a session with a GPU runs
``HF_HUB_OFFLINE=1 python -m pytest tests/test_cuda.py``.
"""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from triplane_turbo import GenerationConfig, TriplaneTurboPipeline, default_dtype
from triplane_turbo.isosurface import extract_surface, marching_cubes

from .conftest import FIXTURE_A

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def golden():
    with safe_open(FIXTURE_A / "golden.safetensors", "pt") as f:
        prompts = json.loads(f.metadata()["prompts"])
    return prompts, load_file(FIXTURE_A / "golden.safetensors")


@pytest.fixture
def exact_float32():
    """TF32 off: float32 on the GPU then differs from the CPU only by summation order."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def relative_error(actual: torch.Tensor, golden: torch.Tensor) -> float:
    return float((actual.detach().float().cpu() - golden.float()).abs().max() / golden.abs().max())


def fixture_pipe(dtype):
    pipe = TriplaneTurboPipeline.from_pretrained(str(FIXTURE_A / "base"), str(FIXTURE_A / "adapter.pth"),
                                                 device="cuda", dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_fixture_a_float32_on_cuda_matches_the_golden_numbers(golden, exact_float32):
    prompts, tensors = golden
    pipe = fixture_pipe(torch.float32)
    resolution = tensors["grid_axis"].shape[0]
    out = pipe(prompts[0], seed=42, mesh_resolution=resolution)
    assert out.triplane.is_cuda
    for name, actual in (("final_latents", out.latents), ("triplane", out.triplane),
                         ("grid_sdf", pipe.fields.grid_sdf(out.triplane, resolution))):
        assert relative_error(actual, tensors[name]) <= 1e-4, name
    assert len(out.meshes[0].faces) > 0


def test_fixture_a_float16_on_cuda_stays_close(golden):
    """The CUDA default: the same bound as the CPU float16 test (measured there: 1.2e-3)."""
    prompts, tensors = golden
    pipe = fixture_pipe(default_dtype("cuda"))
    assert pipe.dtype == torch.float16
    resolution = tensors["grid_axis"].shape[0]
    out = pipe(prompts[0], seed=42, mesh_resolution=resolution)
    assert relative_error(out.triplane, tensors["triplane"]) < 5e-3
    sdf = pipe.fields.grid_sdf(out.triplane, resolution)
    assert relative_error(sdf, tensors["grid_sdf"]) < 5e-3
    flips = ((sdf.cpu() < 0) != (tensors["grid_sdf"] < 0)).float().mean()
    assert flips < 5e-3


def test_marching_cubes_on_cuda_equals_the_cpu():
    rng = np.random.default_rng(3)
    r = 64
    axis = np.linspace(-1, 1, r)
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    sdf = (np.sqrt(x**2 + y**2 + z**2) - 0.6 + 0.05 * rng.normal(size=x.shape)).astype(np.float32)
    deformation = rng.uniform(-0.4, 0.4, (r, r, r, 3)).astype(np.float32)
    cpu_v, cpu_f = marching_cubes(sdf, deformation)
    gpu_v, gpu_f = marching_cubes(torch.from_numpy(sdf).cuda(), torch.from_numpy(deformation).cuda())
    assert len(cpu_f) > 1000
    np.testing.assert_array_equal(gpu_f, cpu_f)
    np.testing.assert_allclose(gpu_v, cpu_v, atol=1e-6)
    surface = extract_surface(torch.from_numpy(sdf).cuda())
    assert surface.faces.is_cuda and surface.t.is_cuda


def test_tiny_model_on_cuda_gives_a_reproducible_coloured_mesh(tiny_model_dir):
    base_dir, adapter_file = tiny_model_dir
    pipe = TriplaneTurboPipeline.from_pretrained(str(base_dir), str(adapter_file), device="cuda",
                                                 dtype=default_dtype("cuda"), config=GenerationConfig(latent_size=16))
    pipe.set_progress_bar_config(disable=True)
    first = pipe("a wooden chair", seed=5, mesh_resolution=96)
    again = pipe("a wooden chair", seed=5, mesh_resolution=96)
    mesh = first.meshes[0]
    assert len(mesh.faces) > 100
    assert np.abs(mesh.vertices).max() < 1.0 + 2 / 95  # inside the box, plus the padding cell
    assert mesh.visual.vertex_colors.shape == (len(mesh.vertices), 4)
    np.testing.assert_array_equal(again.meshes[0].faces, mesh.faces)
    np.testing.assert_allclose(again.meshes[0].vertices, mesh.vertices, atol=1e-5)
    assert set(first.timings) >= {"text", "denoise", "decode", "fields", "isosurface", "color"}


def test_the_torch_rasteriser_on_cuda_equals_the_cpu():
    import trimesh

    from triplane_turbo.texturing.raster import rasterize

    sphere = trimesh.creation.icosphere(subdivisions=4)
    vertices = torch.tensor(sphere.vertices, dtype=torch.float32) * 0.9
    clip = torch.cat([vertices[:, :2], vertices[:, 2:] * 0.5, torch.ones(len(vertices), 1)], 1)
    faces = torch.tensor(sphere.faces)
    cpu = rasterize(clip, faces, (256, 256), backend="torch")
    gpu = rasterize(clip.cuda(), faces.cuda(), (256, 256), backend="torch").cpu()
    assert torch.equal(gpu[..., 3], cpu[..., 3])
    assert torch.allclose(gpu[..., :3], cpu[..., :3], atol=1e-5)


def test_nvdiffrast_agrees_with_the_torch_rasteriser():
    """Same coverage except where a pixel centre lies on an edge (tie rules may differ), same
    barycentrics and depth where the same triangle is drawn, and the same interpolated positions."""
    import trimesh

    from triplane_turbo.texturing.raster import interpolate, nvdiffrast_available, rasterize

    if not nvdiffrast_available():
        pytest.skip("nvdiffrast is not installed (pip install -r requirements-gpu.txt)")
    sphere = trimesh.creation.icosphere(subdivisions=4)
    vertices = torch.tensor(sphere.vertices, dtype=torch.float32).cuda() * 0.9
    # a perspective camera at z = 3 looking down -z
    w = 3 - vertices[:, 2]
    clip = torch.stack([vertices[:, 0] * 2, vertices[:, 1] * 2, (w - 3) * w, w], 1).contiguous()  # z/w = w - 3
    faces = torch.tensor(sphere.faces).cuda()
    ours = rasterize(clip, faces, (512, 384), backend="torch")
    theirs = rasterize(clip, faces, (512, 384), backend="nvdiffrast")
    same = ours[..., 3] == theirs[..., 3]
    assert same.float().mean() > 0.995
    drawn = same & (ours[..., 3] > 0)
    assert torch.allclose(ours[drawn][:, :3], theirs[drawn][:, :3], atol=1e-4)
    assert torch.allclose(interpolate(vertices, ours, faces)[drawn], interpolate(vertices, theirs, faces)[drawn],
                          atol=1e-4)
