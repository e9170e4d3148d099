"""RichDreamer's multi-view normal-depth model as a PRD teacher: geometry learned from normals and depth.

Follows the authors' guidance (theEricMa/TriplaneTurbo @bc047f3, ``custom/triplaneturbo/models/
guidance/richdreamer_mvdream_stablediffusion_asd_guidance.py``, ``_rd_grad_asd`` and the renderers'
RichDreamer outputs, with ``configs/TriplaneTurbo_v1.yaml``). The model is MVDream's multi-view UNet in
pixel space (no VAE): each view becomes a 4-channel image

    normal:    n_c = flip_x(R_w2c n) (camera space, x negated), shown as (n_c + 1)/2 · opacity
               + (1 − opacity) · (0.5, 0.5, 1)
    disparity: (far − (depth · opacity + (1 − opacity) · far)) / (far − near), clamped to [0, 1],
               far/near = camera distance ± √3 (the bounding sphere of the [−1, 1]³ box)

average-pooled to 32²: x [N, 4, 32, 32]. Then, with one t per prompt shared by its 4 views:

    t  ~ U[min_step, 980),  t⁺ = t + ⌊U · clamp(0.1 (t − min_step), 0, 999 − t)⌋  clamped to [1, 999]
    ε_c, ε_u at (x_t, t), ε⁺ = ε_c at (x_{t⁺}, t⁺) (same noise); ε̂ = ε_u + 20 (ε_c − ε_u)
    x̂₁ = (x − σ_t ε̂)/α_t,  x̂₂ = (x − σ_t ε⁺)/α_t,  g = (x̂₂ − x̂₁)/(mean|x − x̂₁| + 0.1)  per view,
    loss = ½ Σ (x − sg(x − g))² / 4

Text: SD 1.5's CLIP-L (the authors' first prompt processor), the prompt and the negative prompt.
Camera: MVDream's normalised camera, rotated −90° about z, its position scaled by 2 × the relative
distance (distance · tan(fovy/2), in [0.8, 1]): the authors' ``cam_method: rel_x2``.

Weights: ``nd_mv_ema.ckpt`` (ModelScope ``Damo_XR_Lab/Normal-Depth-Diffusion-Model``; ldm layout under
``"state_dict"``), from a local path or a Hub id where someone mirrors it. Only its UNet is read; the
file's 4-channel VAE (unused by the pixel-space model) and CLIP-L copy are skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .cameras import Cameras
from .ldm_checkpoint import ldm_alphas_cumprod, read_multiview_unet
from .multiview_unet import RICHDREAMER_ND, MultiViewUNet, MultiViewUNetConfig, normalize_camera
from .mvdream import NEGATIVE_PROMPT, MultiViewTeacher, PromptEncoder
from .teachers import Renders

ND_FILE = "nd_mv_ema.ckpt"
SQRT3 = math.sqrt(3.0)


@dataclass(frozen=True)
class RichDreamerConfig:
    """The RichDreamer teacher, with the authors' values (``TriplaneTurbo_v1.yaml``, ``guidance.rd_*``)."""

    views: int = 4
    image_size: int = 32  # normal-depth images are average-pooled to this (rd_image_size)
    guidance_scale: float = 20.0
    min_step: tuple[float, float] = (0.50, 0.02)  # fraction of T, linearly from, to ...
    min_step_until: int = 20_000  # ... over this many steps
    max_step: float = 0.98
    plus_ratio: float = 0.1  # ASD's t⁺ = t + ⌊U · plus_ratio · (t − min_step)⌋ (rd_plus_ratio, plus_random)
    eps: float = 0.1
    negative_prompt: str = NEGATIVE_PROMPT
    camera_z_rotation_degrees: float = -90.0
    distance_scale: float = 2.0  # the camera position × distance_scale × relative distance ("rel_x2")
    normal_background: tuple[float, float, float] = (0.5, 0.5, 1.0)
    #: the mesh render's depth: "clip" (the authors': clip-space z) or "distance" (along the ray)
    mesh_depth: str = "clip"
    weight: float = 1.0


def normal_depth_images(renders: Renders, background: tuple[float, float, float] = (0.5, 0.5, 1.0),
                        mesh_depth: str = "clip") -> torch.Tensor:
    """[N, 4, H, W] in [0, 1]: the camera-space normal map (over ``background``) and the disparity
    RichDreamer sees.

    Needs ``renders.normal`` (world-space unit normals, zero where empty), ``renders.depth`` (along the
    ray) and ``renders.opacity``. The volume renderer's depth is Σ w·t, and the authors' formula
    multiplies it by the opacity once more (generative_space_sdf_volume_renderer.py:453-457); for the
    mesh renderer (opacity 0 or 1) the same formula is their mesh path's (zero disparity on the
    background). ``mesh_depth="clip"`` (the authors'): the mesh path's depth is its clip-space z
    (``renders.clip_depth``; z_clip ≈ 1.0002·z_axial − 0.2, so the disparity is about 0.2 / (2√3) ≈ 0.058
    higher than with the distance, generative_space_mesh_rasterize_renderer.py:153-154, 176-189);
    "distance": the distance along the ray, as the volume renderer's.
    """
    if renders.normal is None or renders.depth is None:
        raise ValueError(f"the RichDreamer teacher needs normal and depth renders; the {renders.renderer} renderer "
                         "gave none")
    opacity, cameras = renders.opacity, renders.cameras
    rotation = cameras.c2w[:, :3, :3].to(renders.normal)  # columns right, up, back
    normal = torch.einsum("nji,njhw->nihw", rotation, F.normalize(renders.normal, dim=1))  # R^T n: camera space
    # x negated: RichDreamer's normal maps have x pointing to the image's left
    normal = normal * normal.new_tensor([-1.0, 1.0, 1.0]).view(1, 3, 1, 1)
    normal = (normal + 1) / 2 * opacity + (1 - opacity) * normal.new_tensor(background).view(1, 3, 1, 1)
    far = (cameras.distance.to(opacity) + SQRT3).view(-1, 1, 1, 1)
    if mesh_depth not in ("clip", "distance"):
        raise ValueError(f"mesh_depth is 'clip' or 'distance', got {mesh_depth!r}")
    surface = renders.clip_depth if mesh_depth == "clip" and renders.clip_depth is not None else renders.depth
    depth = surface * opacity + (1 - opacity) * far
    disparity = ((far - depth) / (2 * SQRT3)).clamp(0, 1)
    return torch.cat([normal, disparity], dim=1)


def richdreamer_camera(cameras: Cameras, distance_scale: float = 2.0,
                       z_rotation_degrees: float = -90.0) -> torch.Tensor:
    """[N, 16]: MVDream's normalised camera, rotated about the world z axis (left-multiplied), its
    position scaled by ``distance_scale`` × the relative distance (distance · tan(fovy / 2))."""
    camera = normalize_camera(cameras.c2w).view(-1, 4, 4)
    angle = math.radians(z_rotation_degrees)
    rotate = torch.eye(4, dtype=camera.dtype, device=camera.device)
    rotate[:2, :2] = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    camera = rotate @ camera
    relative = cameras.distance.to(camera) * math.tan(cameras.fovy / 2)
    camera[:, :3, 3] = camera[:, :3, 3] * (distance_scale * relative)[:, None]
    return camera.reshape(-1, 16)


def t_plus(t: torch.Tensor, min_step: int, ratio: float, uniform: torch.Tensor,
           num_train_timesteps: int = 1000) -> torch.Tensor:
    """ASD's second timestep (the authors' ``get_t_plus``, linear schedule, "v1"): the offset
    ratio · (t − min_step), clamped to [0, T − 1 − t], times U[0, 1) (``uniform``, same shape),
    truncated; t⁺ = t + offset clamped to [1, T − 1]."""
    offset = (ratio * (t.float() - min_step)).clamp(min=0).minimum((num_train_timesteps - 1 - t).float())
    offset = (offset * uniform).long()  # truncation, as the authors' .to(torch.long)
    return (t + offset).clamp(1, num_train_timesteps - 1)


#: Tiny random model of the same kind, for tests and ``--tiny`` runs (32-wide text, 16² images).
TINY_ND_UNET = MultiViewUNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                   attention_resolutions=(1, 2), num_head_channels=None, num_heads=2, context_dim=32,
                                   use_linear_in_transformer=False)
TINY_RICHDREAMER = RichDreamerConfig(image_size=16)


class RichDreamerTeacher(MultiViewTeacher):
    """RichDreamer's normal-depth model (``nd-mv``) as a teacher; see the module docstring for the loss.

    Args:
        unet: the multi-view UNet (``MultiViewUNet`` with ``RICHDREAMER_ND``), weights loaded.
        text: SD 1.5's text encoder (CLIP-L) as a ``PromptEncoder``.
        config: the authors' values by default.
        device, dtype: where the UNet runs (float16 on CUDA).
    """

    name, label = "richdreamer", "RichDreamer"

    def __init__(self, unet: MultiViewUNet, text: PromptEncoder, config: RichDreamerConfig = RichDreamerConfig(),
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        if text.width != unet.config.context_dim:
            raise ValueError(f"the text encoder is {text.width} wide, the UNet expects {unet.config.context_dim}")
        if unet.config.in_channels != 4:
            raise ValueError("the normal-depth model takes 4 channels (normal xyz, disparity)")
        self.config, self.device, self.dtype = config, torch.device(device), dtype
        self.unet, self.text = unet, text
        torch.nn.Module.to(unet, self.device, dtype)
        unet.eval().requires_grad_(False)
        self.alphas_cumprod = ldm_alphas_cumprod().to(self.device)

    @classmethod
    def from_pretrained(cls, text: PromptEncoder, checkpoint: str | Path, filename: str = ND_FILE, *,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        config: RichDreamerConfig = RichDreamerConfig(),
                        unet_config: MultiViewUNetConfig = RICHDREAMER_ND) -> "RichDreamerTeacher":
        """Read ``nd_mv_ema.ckpt`` (a local file or folder, or a Hub id mirroring it) strictly."""
        unet, groups, path = read_multiview_unet(checkpoint, filename, unet_config)
        return cls(unet, text, config, device, dtype)

    @classmethod
    def tiny(cls, text: PromptEncoder | None = None, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, config: RichDreamerConfig = TINY_RICHDREAMER,
             seed: int = 0) -> "RichDreamerTeacher":
        """A tiny random normal-depth UNet (and text encoder unless given), offline."""
        text = text or PromptEncoder.tiny(device, dtype, seed + 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = MultiViewUNet(replace(TINY_ND_UNET, context_dim=text.width))
        return cls(unet, text, config, device, dtype)

    def frozen_parameters(self):
        return [*self.unet.parameters(), *self.text.parameters()]

    def latents(self, renders: Renders, generator: torch.Generator | None = None) -> torch.Tensor:
        """x [N, 4, s, s] (float32, differentiable in the normal, depth and opacity renders)."""
        size = self.config.image_size
        images = normal_depth_images(renders, self.config.normal_background, self.config.mesh_depth)
        return F.adaptive_avg_pool2d(images, (size, size)).float().to(self.device)

    def camera(self, cameras) -> torch.Tensor:
        return richdreamer_camera(cameras, self.config.distance_scale, self.config.camera_z_rotation_degrees)

    def guidance_scale(self, step: int) -> float:
        return self.config.guidance_scale

    def second_timestep(self, t, min_step, generator):
        return t_plus(t, min_step, self.config.plus_ratio, torch.rand(len(t), generator=generator))
