"""The multi-view teachers (MVDream, RichDreamer's normal-depth model): checkpoint layouts, cameras,
the multi-view UNet's behaviour and the distillation losses. Tiny random models, float32, CPU, offline.
"""

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from triplane_turbo.training.cameras import Cameras, look_at_origin, sample_cameras
from triplane_turbo.training.ldm_checkpoint import (SCHEDULE_BUFFERS, SD21_AUTOENCODER, LdmAutoencoderConfig,
                                                    autoencoder_layout, ldm_alphas_cumprod, load_autoencoder,
                                                    load_strict, read_checkpoint, unet_layout)
from triplane_turbo.training.multiview_unet import MVDREAM_SD21, RICHDREAMER_ND, MultiViewUNet, normalize_camera
from triplane_turbo.training.mvdream import (NEGATIVE_PROMPT, TINY_AUTOENCODER, TINY_MVDREAM, TINY_MVDREAM_UNET,
                                             MVDreamConfig, MVDreamTeacher, PromptEncoder)
from triplane_turbo.training.richdreamer import (TINY_ND_UNET, TINY_RICHDREAMER, RichDreamerConfig, RichDreamerTeacher,
                                                 normal_depth_images, richdreamer_camera, t_plus)
from triplane_turbo.training.teachers import Renders

PROMPTS = ["a wooden chair", "a red teapot"]
SQRT3 = math.sqrt(3)


@pytest.fixture(scope="module")
def text():
    return PromptEncoder.tiny()


@pytest.fixture(scope="module")
def mvdream(text):
    return MVDreamTeacher.tiny(text)


@pytest.fixture(scope="module")
def richdreamer(text):
    return RichDreamerTeacher.tiny(text)


def make_renders(num_prompts=2, size=16, seed=0, requires_grad=True) -> Renders:
    """Random renders of ``num_prompts`` × 4 views from the training camera sampler."""
    g = torch.Generator().manual_seed(seed)
    cameras = sample_cameras(num_prompts, generator=g)
    n = len(cameras)
    rgb = torch.rand(n, 3, size, size, generator=g)
    normal = F.normalize(torch.randn(n, 3, size, size, generator=g), dim=1)
    depth = cameras.distance.view(-1, 1, 1, 1) + torch.rand(n, 1, size, size, generator=g) - 0.5
    opacity = torch.rand(n, 1, size, size, generator=g)
    tensors = [t.requires_grad_(requires_grad) for t in (rgb, normal, depth)]
    return Renders(tensors[0], opacity, cameras, "volume", tensors[1], tensors[2])


# ---------------------------------------------------------------------------------------------
# Key layouts of the published checkpoints
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config, total", [(MVDREAM_SD21, 867_572_164), (RICHDREAMER_ND, 861_182_404)],
                         ids=["mvdream-sd21-4view", "richdreamer-nd-mv"])
def test_full_size_unet_has_the_published_key_layout(config, total):
    """Built on the meta device at full size: exactly the keys and shapes derived from the config —
    SD's 686 UNet tensors plus the camera MLP's 4 — and SD 2.1's (SD 1.5's) parameter count + 1.66M."""
    with torch.device("meta"):
        unet = MultiViewUNet(config)
    built = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    derived = unet_layout(config)
    assert built == derived
    assert len(derived) == 690
    assert sum(math.prod(s) for s in derived.values()) == total
    width = config.context_dim
    assert derived["camera_embed.0.weight"] == (1280, 16) and derived["camera_embed.2.weight"] == (1280, 1280)
    assert derived["input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"] == (320, 320)
    assert derived["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, width)
    assert derived["output_blocks.11.1.proj_out.weight"] == ((320, 320) if config.use_linear_in_transformer
                                                             else (320, 320, 1, 1))
    assert derived["middle_block.1.transformer_blocks.0.ff.net.0.proj.weight"] == (10240, 1280)


@pytest.mark.parametrize("config, heads", [(MVDREAM_SD21, [5, 10, 20, 20]), (RICHDREAMER_ND, 8)],
                         ids=["mvdream-sd21-4view", "richdreamer-nd-mv"])
def test_unet_layout_is_stable_diffusions_plus_the_camera_mlp(config, heads):
    """A third-party check of the derived layout: without camera_embed, diffusers' own ldm-to-diffusers
    converter maps it onto exactly the diffusers UNet of SD 2.1-base (SD 1.5 widths for the ND model)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ldm = {f"model.diffusion_model.{k}": torch.empty(s, device="meta") for k, s in unet_layout(config).items()
           if not k.startswith("camera_embed.")}
    diffusers_config = dict(
        sample_size=32, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, attention_head_dim=heads,
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], cross_attention_dim=config.context_dim,
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        use_linear_projection=config.use_linear_in_transformer)
    converted = convert_ldm_unet_checkpoint(ldm, diffusers_config)
    with torch.device("meta"):
        reference = UNet2DConditionModel(**diffusers_config).state_dict()
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in reference.items()}


def test_full_size_first_stage_layout_is_sd21s_vae():
    """MVDream's first_stage_model.* (derived from sd-v2-base.yaml's ddconfig) converts into SD 2.1's
    diffusers AutoencoderKL strictly: 248 tensors, 83,653,863 numbers."""
    layout = autoencoder_layout(SD21_AUTOENCODER)
    assert len(layout) == 248 and sum(math.prod(s) for s in layout.values()) == 83_653_863
    vae = load_autoencoder({k: torch.empty(s, device="meta") for k, s in layout.items()})
    assert list(vae.config.block_out_channels) == [128, 256, 512, 512]
    assert vae.config.scaling_factor == 0.18215


# ---------------------------------------------------------------------------------------------
# Loading tiny checkpoints in the published containers
# ---------------------------------------------------------------------------------------------
def schedule_buffers() -> dict[str, torch.Tensor]:
    """ldm's registered schedule buffers, as a LatentDiffusion state dict holds them."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ab = torch.cumprod(1 - betas, 0)
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
    posterior = betas * (1 - ab_prev) / (1 - ab)
    values = [betas, ab, ab_prev, ab.sqrt(), (1 - ab).sqrt(), (1 - ab).log(), (1 / ab).sqrt(), (1 / ab - 1).sqrt(),
              posterior, posterior.clamp(min=1e-20).log(), betas * ab_prev.sqrt() / (1 - ab),
              (1 - ab_prev) * (1 - betas).sqrt() / (1 - ab)]
    return {name: v.float() for name, v in zip(SCHEDULE_BUFFERS, values)}


def random_state(layout, prefix, generator):
    return {prefix + k: torch.randn(s, generator=generator) * 0.1 for k, s in layout.items()}


def write_ldm_checkpoint(path, unet_config, vae_config: LdmAutoencoderConfig, wrap: bool, ema: bool = False, seed=0):
    """A LatentDiffusion state dict of random tensors in the published layout; returns it."""
    g = torch.Generator().manual_seed(seed)
    state = {**schedule_buffers(), **random_state(unet_layout(unet_config), "model.diffusion_model.", g),
             **random_state(autoencoder_layout(vae_config), "first_stage_model.", g),
             # the text encoder (skipped by the loader): two stand-in tensors under its prefix
             "cond_stage_model.model.ln_final.weight": torch.ones(32),
             "cond_stage_model.model.token_embedding.weight": torch.zeros(10, 32)}
    if ema:  # a training checkpoint: LitEma shadows, named without dots
        for key in [k for k in state if k.startswith("model.diffusion_model.")]:
            state["model_ema." + key[len("model."):].replace(".", "")] = state[key] + 1
        state["model_ema.decay"], state["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(7)
    torch.save({"state_dict": state} if wrap else state, path)
    return state


TINY_MV = replace(TINY_MVDREAM_UNET, context_dim=32)
TINY_ND = replace(TINY_ND_UNET, context_dim=32)
TINY_ND_VAE = replace(TINY_AUTOENCODER, in_channels=4, out_ch=4)


def test_tiny_mvdream_file_loads_strictly(tmp_path, text):
    """sd-v2.1-base-4view.pt's container (a bare state dict): UNet and VAE loaded, every tensor equal."""
    path = tmp_path / "sd-v2.1-base-4view.pt"
    state = write_ldm_checkpoint(path, TINY_MV, TINY_AUTOENCODER, wrap=False)
    teacher = MVDreamTeacher.from_pretrained(text, tmp_path, unet_config=TINY_MV, vae_config=TINY_AUTOENCODER,
                                             config=TINY_MVDREAM)
    for key, value in teacher.unet.state_dict().items():
        assert torch.equal(value, state["model.diffusion_model." + key]), key
    vae = teacher.vae
    assert torch.equal(vae.encoder.conv_in.weight, state["first_stage_model.encoder.conv_in.weight"])
    assert torch.equal(vae.quant_conv.weight, state["first_stage_model.quant_conv.weight"])
    # ldm's 1×1-conv attention becomes diffusers' linear layers
    q = state["first_stage_model.encoder.mid.attn_1.q.weight"]
    assert torch.equal(vae.encoder.mid_block.attentions[0].to_q.weight, q[:, :, 0, 0])
    # diffusers numbers the decoder's levels from the bottom: up_blocks[0] is ldm's up.1 (of 2)
    assert torch.equal(vae.decoder.up_blocks[0].resnets[0].conv1.weight,
                       state["first_stage_model.decoder.up.1.block.0.conv1.weight"])
    assert not any(p.is_meta for p in teacher.frozen_parameters())
    assert torch.isfinite(teacher.loss(make_renders(1), PROMPTS[:1], 0, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("ema", [False, True], ids=["ema-file", "training-file"])
def test_tiny_normal_depth_file_loads_strictly(tmp_path, text, ema):
    """nd_mv_ema.ckpt's container ({"state_dict": …}); a training checkpoint's EMA shadows replace the UNet."""
    path = tmp_path / "nd_mv_ema.ckpt"
    state = write_ldm_checkpoint(path, TINY_ND, TINY_ND_VAE, wrap=True, ema=ema)
    teacher = RichDreamerTeacher.from_pretrained(text, path, unet_config=TINY_ND, config=TINY_RICHDREAMER)
    for key, value in teacher.unet.state_dict().items():
        expected = state["model.diffusion_model." + key] + (1 if ema else 0)
        assert torch.equal(value, expected), key
    assert torch.isfinite(teacher.loss(make_renders(1), PROMPTS[:1], 0, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("model.diffusion_model.camera_embed.0.weight"), "missing key 'camera_embed.0.weight'"),
    (lambda s: s.update({"model.diffusion_model.label_emb.weight": torch.zeros(1)}),
     "unexpected key 'label_emb.weight'"),
    (lambda s: s.update({"model.diffusion_model.out.2.weight": torch.zeros(4, 32, 1, 1)}), "'out.2.weight' has shape"),
    (lambda s: s.update({"lvlb_weights": torch.zeros(1000)}), "unexpected key in"),
    (lambda s: s.pop("first_stage_model.encoder.norm_out.bias"), "missing key 'encoder.norm_out.bias'"),
    (lambda s: s.update({"alphas_cumprod": torch.linspace(1, 0, 1000)}), "not ldm's linear schedule"),
], ids=["missing", "unexpected", "shape", "unknown-group", "vae-missing", "schedule"])
def test_mismatching_checkpoints_fail_naming_the_key(tmp_path, text, edit, message):
    path = tmp_path / "bad.pt"
    state = write_ldm_checkpoint(path, TINY_MV, TINY_AUTOENCODER, wrap=False)
    edit(state)
    torch.save(state, path)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        MVDreamTeacher.from_pretrained(text, path, unet_config=TINY_MV, vae_config=TINY_AUTOENCODER,
                                       config=TINY_MVDREAM)


def test_tiny_state_dict_round_trips_strictly(tmp_path):
    """A tiny random UNet saved and read back (weights_only) into a meta-built one: same outputs."""
    torch.manual_seed(0)
    unet = MultiViewUNet(TINY_MV).eval()
    torch.save({f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}, tmp_path / "unet.pt")
    state = read_checkpoint(tmp_path / "unet.pt")
    with torch.device("meta"):
        loaded = MultiViewUNet(TINY_MV)
    load_strict(loaded, {k[len("model.diffusion_model."):]: v for k, v in state.items()}, "round trip")
    x, t = torch.randn(4, 4, 8, 8), torch.tensor([10, 10, 500, 500])
    ctx, cam = torch.randn(4, 5, 32), torch.randn(4, 16)
    with torch.no_grad():
        assert torch.equal(unet(x, t, ctx, cam, num_frames=2), loaded.eval()(x, t, ctx, cam, num_frames=2))


# ---------------------------------------------------------------------------------------------
# Cameras
# ---------------------------------------------------------------------------------------------
R3 = SQRT3 / 2


def known_cameras() -> Cameras:
    """Camera A at (2, 0, 0); camera B at elevation 30°, azimuth 90°, distance 1.5; fovy 60°."""
    positions = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.5 * R3, 0.75]])
    return Cameras(look_at_origin(positions), math.radians(60), torch.tensor([2.0, 1.5]), 2)


def test_camera_matrices_are_threestudios_c2w():
    """Columns right, up, back, position (threestudio's layout, which MVDream's condition expects)."""
    expected = torch.tensor([
        [[0, 0, 1, 2], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]],
        [[-1, 0, 0, 0], [0, -0.5, R3, 1.5 * R3], [0, R3, 0.5, 0.75], [0, 0, 0, 1]]])
    assert torch.allclose(known_cameras().c2w, expected, atol=1e-6)


def test_normalize_camera_on_known_cameras():
    """MVDream's normalize_camera: each position scaled onto the unit sphere, flattened by rows."""
    cameras = known_cameras()
    c2w = cameras.c2w.clone()
    expected = torch.tensor([
        [0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1],
        [-1, 0, 0, 0, 0, -0.5, R3, R3, 0, R3, 0.5, 0.5, 0, 0, 0, 1]])
    assert torch.allclose(normalize_camera(cameras.c2w), expected, atol=1e-6)
    assert torch.equal(cameras.c2w, c2w)  # the renders' cameras are not modified


def test_richdreamer_camera_on_known_cameras():
    """Rotated −90° about z (x ← y, y ← −x), position × 2 × distance · tan 30°."""
    scale_a, scale_b = 2 * 2.0 * math.tan(math.radians(30)), 2 * 1.5 * math.tan(math.radians(30))
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, -1, -scale_a, 0, 1, 0, 0, 0, 0, 0, 1],
        [0, -0.5, R3, R3 * scale_b, 1, 0, 0, 0, 0, R3, 0.5, 0.5 * scale_b, 0, 0, 0, 1]])
    assert torch.allclose(richdreamer_camera(known_cameras()), expected, atol=1e-6)


def test_normal_depth_images_on_known_normals():
    """Camera A looks down −x: a normal facing it is (0.5, 0.5, 1) like the background, its right (+y)
    shows as (0, 0.5, 0.5) (x flipped), world up (0.5, 1, 0.5); disparity 0.5 at the centre's depth,
    1 at the near end of the bounding sphere, 0 on the background."""
    cameras = known_cameras()
    normal = torch.zeros(2, 3, 1, 4)
    normal[0, :, 0, 0] = torch.tensor([1.0, 0, 0])
    normal[0, :, 0, 1] = torch.tensor([0, 1.0, 0])
    normal[0, :, 0, 2] = torch.tensor([0, 0, 1.0])
    opacity = torch.ones(2, 1, 1, 4)
    opacity[0, :, 0, 3] = 0
    depth = torch.full((2, 1, 1, 4), 2.0)
    depth[0, 0, 0, 1] = 2 - SQRT3
    images = normal_depth_images(Renders(torch.zeros(2, 3, 1, 4), opacity, cameras, "mesh", normal, depth))[0, :, 0]
    expected = torch.tensor([[0.5, 0.5, 1, 0.5], [0, 0.5, 0.5, 1], [0.5, 1, 0.5, 0.5], [0.5, 0.5, 1, 0]]).T
    assert torch.allclose(images, expected, atol=1e-6)


def test_t_plus_matches_the_authors_formula():
    t = torch.tensor([500, 995, 20, 0, 700])
    uniform = torch.tensor([0.5, 0.99, 0.7, 0.3, 0.999])
    # offsets: ⌊0.5·48⌋ = 24; ⌊0.99·min(97.5, 4)⌋ = 3; 0; 0 then clamped to t⁺ ≥ 1; ⌊0.999·68⌋ = 67
    assert t_plus(t, 20, 0.1, uniform).tolist() == [524, 998, 20, 1, 767]


def test_schedules_follow_the_authors_config(mvdream, richdreamer):
    from triplane_turbo.training.mvdream import timestep_bounds

    assert [mvdream.guidance_scale(s) for s in (0, 10_000, 20_000, 40_000)] == [20.0, 15.0, 10.0, 10.0]
    assert timestep_bounds(0, (0.5, 0.02), 20_000, 0.98) == (500, 980)
    assert timestep_bounds(20_000, (0.5, 0.02), 20_000, 0.98) == (20, 980)
    mv, rd = MVDreamConfig(), RichDreamerConfig()
    assert (mv.image_size, mv.eps, mv.guidance_scale, mv.views) == (256, 0.1, (20.0, 10.0), 4)
    assert (rd.image_size, rd.eps, rd.guidance_scale, rd.plus_ratio, rd.distance_scale) == (32, 0.1, 20.0, 0.1, 2.0)
    assert mv.negative_prompt == rd.negative_prompt == NEGATIVE_PROMPT


# ---------------------------------------------------------------------------------------------
# The multi-view UNet's behaviour
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return MultiViewUNet(TINY_MV).eval()


def unet_inputs(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randn(n, 7, 32, generator=g), torch.randn(n, 16, generator=g))


@torch.no_grad()
def test_multiview_attention_mixes_the_frames_of_a_group_only(tiny_unet):
    """Two prompts × 4 frames: changing frame 2 changes frame 1's output (3D self-attention), not the
    other prompt's frames; with one frame per group it does not change frame 1 either."""
    x, t, ctx, cam = unet_inputs()
    base = tiny_unet(x, t, ctx, cam, num_frames=4)
    changed = x.clone()
    changed[2] += torch.randn(4, 8, 8)
    out = tiny_unet(changed, t, ctx, cam, num_frames=4)
    assert (out[1] - base[1]).abs().max() > 1e-3
    assert torch.allclose(out[4:], base[4:], atol=1e-6)
    single = tiny_unet(x, t, ctx, cam, num_frames=1), tiny_unet(changed, t, ctx, cam, num_frames=1)
    assert torch.allclose(single[0][[0, 1, 3]], single[1][[0, 1, 3]], atol=1e-6)


@torch.no_grad()
def test_camera_embedding_changes_the_output(tiny_unet):
    x, t, ctx, cam = unet_inputs(4)
    base = tiny_unet(x, t, ctx, cam, num_frames=4)
    moved = cam.clone()
    moved[0] += 0.5
    out = tiny_unet(x, t, ctx, moved, num_frames=4)
    assert (out[0] - base[0]).abs().max() > 1e-3
    assert (tiny_unet(x, t, ctx, None, num_frames=4) - base).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# The losses
# ---------------------------------------------------------------------------------------------
class Recorder(torch.nn.Module):
    """Wraps a UNet and keeps its inputs and outputs."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.config, self.calls = unet, unet.config, []

    def forward(self, x, timesteps, context, camera=None, num_frames=1):
        out = self.unet(x, timesteps, context, camera=camera, num_frames=num_frames)
        self.calls.append(dict(x=x, t=timesteps, context=context, camera=camera, num_frames=num_frames, out=out))
        return out


def spy_latents(teacher, store):
    original = teacher.latents

    def latents(renders, generator=None):
        z = original(renders, generator)
        z.retain_grad()
        store["z"] = z
        return z

    return latents


def test_mvdream_gradient_is_the_dmd_asd_direction(mvdream, text):
    """∂loss/∂z = (x̂₂ − x̂₁)/(mean|z − x̂₁| + 0.1)/4 with the recorded UNet outputs, CFG at the step's
    scale, one t per prompt, the negative prompt as the unconditional branch, MVDream's cameras."""
    teacher, store, step = MVDreamTeacher(Recorder(mvdream.unet), mvdream.vae, text, TINY_MVDREAM), {}, 5_000
    teacher.latents = spy_latents(teacher, store)
    renders = make_renders()
    loss = teacher.loss(renders, PROMPTS, step, torch.Generator().manual_seed(1))
    loss.backward()
    (call,), z = teacher.unet.calls, store["z"]
    n = len(z)
    t = call["t"][:n]
    assert torch.equal(call["t"][n:], t) and torch.equal(call["x"][n:], call["x"][:n])
    assert (t.view(2, 4) == t.view(2, 4)[:, :1]).all() and t.min() >= 375 and t.max() < 980  # min_step 500 → 20
    assert torch.equal(call["context"][:n], text(PROMPTS).repeat_interleave(4, 0))
    assert torch.equal(call["context"][n:], text([NEGATIVE_PROMPT] * 8))
    assert torch.allclose(call["camera"], normalize_camera(renders.cameras.c2w).repeat(2, 1))
    assert call["num_frames"] == 4
    eps_cond, eps_uncond = call["out"].chunk(2)
    scale = 20 - 10 * step / 20_000
    guided = eps_uncond + scale * (eps_cond - eps_uncond)
    ab = ldm_alphas_cumprod()[t].view(-1, 1, 1, 1)
    x1 = (z.detach() - (1 - ab).sqrt() * guided) / ab.sqrt()
    x2 = (z.detach() - (1 - ab).sqrt() * eps_cond) / ab.sqrt()
    g = (x2 - x1) / ((z.detach() - x1).abs().mean(dim=(1, 2, 3), keepdim=True) + 0.1)
    assert torch.allclose(z.grad, g / 4, rtol=1e-4, atol=1e-6)
    assert torch.allclose(loss, 0.5 * (g ** 2).sum() / 4, rtol=1e-4)
    assert renders.rgb.grad.abs().sum() > 0  # through the VAE encoder to the renders


def test_richdreamer_gradient_is_real_asd(richdreamer, text):
    """Three branches: (x_t, t, prompt), (x_t, t, negative), (x_{t⁺}, t⁺, prompt) with the same noise;
    ∂loss/∂x = (x̂₂ − x̂₁)/(mean|x − x̂₁| + 0.1)/4 with α, σ of t for both, guidance 20."""
    teacher, store = RichDreamerTeacher(Recorder(richdreamer.unet), text, TINY_RICHDREAMER), {}
    teacher.latents = spy_latents(teacher, store)
    renders = make_renders()
    loss = teacher.loss(renders, PROMPTS, 0, torch.Generator().manual_seed(2))
    loss.backward()
    (call,), x = teacher.unet.calls, store["z"]
    n = len(x)
    t, t_second = call["t"][:n], call["t"][2 * n:]
    assert torch.equal(call["t"][n:2 * n], t) and (t_second >= t).all() and (t_second <= t + 0.1 * (t - 500) + 1).all()
    assert (t_second.view(2, 4) == t_second.view(2, 4)[:, :1]).all()
    ab, ab2 = ldm_alphas_cumprod()[t].view(-1, 1, 1, 1), ldm_alphas_cumprod()[t_second].view(-1, 1, 1, 1)
    noise = (call["x"][:n] - ab.sqrt() * x.detach()) / (1 - ab).sqrt()
    assert torch.allclose(call["x"][2 * n:], ab2.sqrt() * x.detach() + (1 - ab2).sqrt() * noise, atol=1e-4)
    assert torch.equal(call["context"][2 * n:], call["context"][:n])
    assert torch.equal(call["context"][n:2 * n], text([NEGATIVE_PROMPT] * 8))
    assert torch.allclose(call["camera"], richdreamer_camera(renders.cameras).repeat(3, 1))
    eps_cond, eps_uncond, eps_second = call["out"].chunk(3)
    guided = eps_uncond + 20 * (eps_cond - eps_uncond)
    x1 = (x.detach() - (1 - ab).sqrt() * guided) / ab.sqrt()
    x2 = (x.detach() - (1 - ab).sqrt() * eps_second) / ab.sqrt()
    g = (x2 - x1) / ((x.detach() - x1).abs().mean(dim=(1, 2, 3), keepdim=True) + 0.1)
    assert torch.allclose(x.grad, g / 4, rtol=1e-4, atol=1e-6)
    assert torch.allclose(x.detach(), F.adaptive_avg_pool2d(normal_depth_images(renders), 16))
    assert renders.normal.grad.abs().sum() > 0 and renders.depth.grad.abs().sum() > 0


class Oracle(torch.nn.Module):
    """A stand-in denoiser that knows the answer: with the prompt it denoises to ``target``; with the
    negative prompt, to the render's own latent (``reference``: "already a fine image"). Its ε is exact
    for those x̂₀, so the noise cancels and the teacher's gradient is (a positive multiple of) z − target."""

    def __init__(self, teacher, target):
        super().__init__()
        self.config, self.alphas = teacher.unet.config, teacher.alphas_cumprod
        self.target, self.reference = target, None
        self.negative = teacher.text([teacher.config.negative_prompt])[0]

    def forward(self, x, timesteps, context, camera=None, num_frames=1):
        ab = self.alphas[timesteps].view(-1, 1, 1, 1)
        uncond = (context == self.negative).flatten(1).all(1).view(-1, 1, 1, 1)
        repeats = len(x) // len(self.target)
        x0 = torch.where(uncond, self.reference.repeat(repeats, 1, 1, 1), self.target.repeat(repeats, 1, 1, 1))
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()


@pytest.mark.parametrize("kind", ["mvdream", "richdreamer"])
def test_loss_moves_renders_toward_the_teachers_target(kind, mvdream, richdreamer, text):
    """A few Adam steps on learnable renders, the teacher's denoiser replaced by the oracle: the
    renders' latents approach the target (the loss's gradient has the sign of render − denoised)."""
    g = torch.Generator().manual_seed(3)
    cameras = sample_cameras(1, generator=g)
    opacity = torch.ones(4, 1, 16, 16)
    if kind == "mvdream":
        vae = copy.deepcopy(mvdream.vae)
        with torch.no_grad():  # a trained VAE's posterior is nearly a point; the random one's is wide
            vae.quant_conv.bias[4:] -= 10
        teacher = MVDreamTeacher(mvdream.unet, vae, text, TINY_MVDREAM)
        params = [torch.randn(4, 3, 16, 16, generator=g).requires_grad_()]

        def renders():
            return Renders(torch.sigmoid(params[0]), opacity, cameras, "volume")

        def measure(r):  # the posterior mean, without the sampling noise
            with torch.no_grad():
                images = F.interpolate(r.rgb, (32, 32), mode="bilinear", align_corners=False) * 2 - 1
                return teacher.vae.encode(images).latent_dist.mean * teacher.vae.config.scaling_factor

        target_renders = Renders(torch.rand(4, 3, 16, 16, generator=g), opacity, cameras, "volume")
    else:
        teacher = RichDreamerTeacher(richdreamer.unet, text, TINY_RICHDREAMER)
        params = [torch.randn(4, 3, 16, 16, generator=g).requires_grad_(), torch.zeros(4, 1, 16, 16).requires_grad_()]

        def renders():
            depth = cameras.distance.view(-1, 1, 1, 1) + params[1]
            return Renders(torch.zeros(4, 3, 16, 16), opacity, cameras, "volume", F.normalize(params[0], dim=1), depth)

        def measure(r):
            return teacher.latents(r).detach()

        target_renders = Renders(torch.zeros(4, 3, 16, 16), opacity, cameras, "volume",
                                 F.normalize(torch.randn(4, 3, 16, 16, generator=g), dim=1),
                                 cameras.distance.view(-1, 1, 1, 1) + 0.5 * torch.rand(4, 1, 16, 16, generator=g))
    target = measure(target_renders)
    oracle = Oracle(teacher, target)
    teacher.unet = oracle
    original_latents = type(teacher).latents.__get__(teacher)

    def latents(r, generator=None):
        z = original_latents(r, generator)
        oracle.reference = z.detach()
        return z

    teacher.latents = latents
    optimiser = torch.optim.Adam(params, lr=0.05)
    start = (measure(renders()) - target).norm()
    for step in range(25):
        optimiser.zero_grad()
        teacher.loss(renders(), PROMPTS[:1], step, g).backward()
        optimiser.step()
    assert (measure(renders()) - target).norm() < 0.7 * start


# ---------------------------------------------------------------------------------------------
# Inputs and bookkeeping
# ---------------------------------------------------------------------------------------------
def test_teachers_check_their_inputs(mvdream, richdreamer):
    renders = make_renders(1)
    three = Renders(renders.rgb[:3], renders.opacity[:3], Cameras(renders.cameras.c2w[:3], renders.cameras.fovy,
                                                                  renders.cameras.distance[:3], 3), "mesh")
    with pytest.raises(ValueError, match="4 views"):
        mvdream.loss(three, PROMPTS[:1], 0)
    with pytest.raises(ValueError, match="normal and depth"):
        richdreamer.loss(Renders(renders.rgb, renders.opacity, renders.cameras, "mesh"), PROMPTS[:1], 0)


def test_teacher_weights_stay_frozen(mvdream, richdreamer):
    for teacher in (mvdream, richdreamer):
        before = [p.clone() for p in teacher.frozen_parameters()]
        teacher.loss(make_renders(1), PROMPTS[:1], 0, torch.Generator().manual_seed(4)).backward()
        assert all(not p.requires_grad and p.grad is None for p in teacher.frozen_parameters())
        assert all(torch.equal(a, b) for a, b in zip(before, teacher.frozen_parameters()))


def test_prompt_encoder_cuts_long_prompts_like_the_authors(text):
    """Padded to 77 then cut: a prompt longer than 77 tokens keeps its first 77 (no end-of-text token
    forced in, as the authors' prompt processor)."""
    long = " ".join(["cat"] * 100)
    ids = text.tokenizer(long, padding="max_length", max_length=77).input_ids[:77]
    expected = text.text_encoder(torch.tensor([ids]))[0][0]
    assert torch.allclose(text([long])[0], expected)
    assert text(["a", "b", "a"]).shape == (3, 77, 32)


def test_teachers_run_in_float16(text):
    """The dtype the teachers use on CUDA: the UNet (and VAE) in float16, the loss in float32."""
    half = PromptEncoder(text.tokenizer, copy.deepcopy(text.text_encoder).half())
    for teacher in (MVDreamTeacher.tiny(half, dtype=torch.float16), RichDreamerTeacher.tiny(half, dtype=torch.float16)):
        renders = make_renders(1)
        loss = teacher.loss(renders, PROMPTS[:1], 0, torch.Generator().manual_seed(5))
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        grads = [t.grad for t in (renders.rgb, renders.normal, renders.depth) if t.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------------------------------------
# Precision as the authors (issue 31)
# ---------------------------------------------------------------------------------------------
def test_teacher_dtypes_are_the_authors(tiny_model_dir):
    """On a GPU the authors run Stable Diffusion in float16 (``half_precision_weights: bool = True``,
    richdreamer_mvdream_stablediffusion_asd_guidance.py:93, 130-139) and MVDream and RichDreamer in
    float32 (extern/mvdream/model_zoo.py:35-57 casts nothing; the normal-depth config says
    ``use_fp16: False``; trainer precision 32); on the CPU everything is float32; overridable."""
    from triplane_turbo.train import parse_args, resolve_teacher_dtypes
    from triplane_turbo.training.recipes import RECIPES, build_teachers, teacher_dtypes

    names = [spec.name for spec in RECIPES["authors-v1"].teachers]
    half, full = torch.float16, torch.float32
    assert teacher_dtypes(names, "cuda") == {"sd": half, "mvdream": full, "richdreamer": full}
    assert teacher_dtypes(names, "cpu") == {"sd": full, "mvdream": full, "richdreamer": full}
    assert teacher_dtypes(names, "cuda", "float32") == dict.fromkeys(names, full)
    assert teacher_dtypes(names, "cuda", "richdreamer=float16") == {"sd": half, "mvdream": full, "richdreamer": half}
    with pytest.raises(ValueError, match="name=dtype"):
        teacher_dtypes(names, "cuda", "clip=float16")
    command = ["--prompts", "p.txt", "--output", "o", "--steps", "1"]
    assert resolve_teacher_dtypes(parse_args(command), "cuda") == {"sd": half, "mvdream": full, "richdreamer": full}
    assert resolve_teacher_dtypes(parse_args([*command, "--dtype", "float16"]), "cuda") == dict.fromkeys(names, half)
    assert resolve_teacher_dtypes(parse_args([*command, "--teacher-dtypes", "mvdream=bfloat16"]), "cuda")["mvdream"] \
        == torch.bfloat16
    # build_teachers gives each teacher its own dtype (tiny teachers on the CPU)
    from transformers import CLIPTextModel, CLIPTokenizer

    base = tiny_model_dir[0]
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    teachers = build_teachers(RECIPES["authors-v1"].teachers, base_dir=base, device="cpu",
                              dtype={"sd": half, "mvdream": full, "richdreamer": full}, text_encoder=encoder,
                              tokenizer=tokenizer, tiny=True)
    kinds = {t.name: {p.dtype for p in t.teacher.unet.parameters()} for t in teachers}
    assert kinds == {"stable-diffusion": {half}, "mvdream": {full}, "richdreamer": {full}}
    assert {p.dtype for p in teachers[0].teacher.vae.parameters()} == {half}
    assert {p.dtype for p in encoder.parameters()} == {full}  # the shared text encoder stays as the pipeline's


def test_a_preset_s_schedules_reach_the_multiview_teachers(tiny_model_dir):
    """``--preset authors-48gb``: MVDream's and RichDreamer's min-step schedules run over 40k steps and
    RichDreamer's t⁺ ratio is 0 (configs/TriplaneTurbo_v1_acc-2.yaml lines 156, 165, 192); MVDream's
    guidance scale keeps its 20k schedule (line 161)."""
    from triplane_turbo.training.presets import PRESETS, teacher_settings
    from triplane_turbo.training.recipes import RECIPES, build_teachers

    specs = RECIPES["authors-v1"].teachers[1:]  # the multi-view teachers
    mv, rd = build_teachers(specs, base_dir=tiny_model_dir[0], device="cpu", dtype=torch.float32, tiny=True,
                            settings=teacher_settings(PRESETS["authors-48gb"]),
                            text_encoder=PromptEncoder.tiny().text_encoder, tokenizer=PromptEncoder.tiny().tokenizer)
    assert (mv.teacher.config.min_step_until, mv.teacher.config.guidance_until) == (40_000, 20_000)
    assert (rd.teacher.config.min_step_until, rd.teacher.config.plus_ratio) == (40_000, 0.0)
    assert rd.teacher.config.image_size == TINY_RICHDREAMER.image_size  # the rest of the tiny config kept
