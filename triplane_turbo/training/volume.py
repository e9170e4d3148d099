"""The NeuS volume renderer of PRD training: the triplane's SDF turned into opacity along camera rays.

Per ray (the authors' settings, ``VolumeConfig``): ``coarse_samples`` stratified samples in
[near, far] and ``fine_samples`` more drawn by importance from the coarse weights (both without
gradients; the coarse pass's opacity is the authors' ``proposal_opacity``, with their fixed step
1.732·2/64 ≈ 0.054); both sets are rendered, sorted together, as threestudio's estimator returns
them (estimators.py:95-96); then, on every interval between consecutive samples, NeuS's opacity with
a fixed sharpness s (inv_s = 100)::

    c = -relu(-d·n),  f± = f ± c·Δ/2,  α = clip((Φ(s f₋) − Φ(s f₊) + 1e-5) / (Φ(s f₋) + 1e-5), 0, 1)

with f the SDF at the interval's middle, n its unit gradient, d the ray direction and Φ the sigmoid.
Weights wᵢ = αᵢ Πⱼ<ᵢ (1 − αⱼ) composite the colour field, the depth and the normals; the background
fills 1 − Σw (the learned background during training, evaluated at each ray's direction). The
loss sees a ``rays``² image assembled as the authors do: the whole view rendered
at ``global_rays``² and upsampled, plus one ``patch_rays``² patch at full resolution pasted in.
Torch only: runs on the CPU and the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..triplane import TriplaneFields
from .cameras import Cameras
from .config import VolumeConfig, ramp


@dataclass
class VolumeRender:
    """Images [N, C, S, S] (row 0 at the top) and what the regularisers need.

    Attributes:
        rgb: [N, 3, S, S] composited over the background.
        opacity: [N, 1, S, S] Σw.
        depth: [N, 1, S, S] Σw·t: the distance along the ray, times the opacity.
        normal: [N, 3, S, S] world-space unit normal normalize(Σw·n), times the opacity.
        sdf_gradients: [M, 3] the SDF's gradient at every sample of the global pass (eikonal term).
    """

    rgb: torch.Tensor
    opacity: torch.Tensor
    depth: torch.Tensor
    normal: torch.Tensor
    sdf_gradients: torch.Tensor


def neus_alpha(sdf: torch.Tensor, cos: torch.Tensor, delta: torch.Tensor, inv_s: float) -> torch.Tensor:
    """NeuS opacity of intervals, all [..., K]: the SDF at their middle, d·n there, their lengths."""
    c = -F.relu(-cos)
    prev, nxt = torch.sigmoid((sdf - c * delta / 2) * inv_s), torch.sigmoid((sdf + c * delta / 2) * inv_s)
    return ((prev - nxt + 1e-5) / (prev + 1e-5)).clamp(0.0, 1.0)


def proposal_opacity(sdf: torch.Tensor, width: float | torch.Tensor, step: float, inv_s: float) -> torch.Tensor:
    """Opacities [..., K] of the proposal pass's intervals, as the authors' importance estimator:
    NeuS' α of the SDF at the interval's middle with a fixed step and no normal
    (generative_space_sdf_volume_renderer.py:289-297: ``sdf ± render_step_size / 2``), made a density
    α / step, which nerfacc integrates over the interval's own length ``width``
    (threestudio/models/estimators.py:84-88): 1 − exp(−α · width / step)."""
    prev, nxt = torch.sigmoid((sdf + step / 2) * inv_s), torch.sigmoid((sdf - step / 2) * inv_s)
    alpha = ((prev - nxt + 1e-5) / (prev + 1e-5)).clamp(0, 1)
    return 1 - torch.exp(-alpha / step * width)


def composite(alpha: torch.Tensor) -> torch.Tensor:
    """Weights wᵢ = αᵢ Πⱼ<ᵢ (1 − αⱼ) along the last axis."""
    transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[..., :1]), 1 - alpha[..., :-1] + 1e-10], -1), -1)
    return alpha * transmittance


class NeuSRenderer:
    """Renders a batch of triplanes from cameras; see the module docstring."""

    def __init__(self, config: VolumeConfig = VolumeConfig()):
        self.config = config

    # -- rays ----------------------------------------------------------------------------------------
    def sample_depths(self, fields: TriplaneFields, triplane: torch.Tensor, origins: torch.Tensor,
                      directions: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sorted sample depths [B, R, K + 1] along rays [B, R, 3] (no gradient): stratified coarse
        samples, then importance samples where the coarse pass found the surface."""
        cfg = self.config
        b, r, _ = origins.shape
        device = origins.device
        edges = torch.linspace(cfg.near, cfg.far, cfg.coarse_samples + 1, device=device)
        jitter = torch.rand((b, r, cfg.coarse_samples), generator=generator).to(device)
        width = (cfg.far - cfg.near) / cfg.coarse_samples
        coarse = edges[:-1] + jitter * width  # [B, R, Kc]
        if cfg.fine_samples:
            with torch.no_grad():
                points = origins[:, :, None] + directions[:, :, None] * coarse[..., None]
                sdf = fields.sdf(triplane, points.reshape(b, -1, 3)).reshape(b, r, -1)
                # the proposal's opacity uses the authors' fixed step and no normal
                weights = composite(proposal_opacity(sdf, width, cfg.proposal_step_size, cfg.inv_s)) + 1e-5
                cdf = torch.cumsum(weights / weights.sum(-1, keepdim=True), -1)
                u = (torch.arange(cfg.fine_samples, device=device) + torch.rand(
                    (b, r, cfg.fine_samples), generator=generator).to(device)) / cfg.fine_samples
                index = torch.searchsorted(cdf.contiguous(), u.contiguous()).clamp(max=cfg.coarse_samples - 1)
                fine = torch.gather(coarse, -1, index) + (torch.rand(index.shape, generator=generator).to(device) - 0.5) * width
            coarse = torch.cat([coarse, fine.clamp(cfg.near, cfg.far)], -1)
        depths, _ = torch.sort(torch.cat([coarse, coarse.new_full((b, r, 1), cfg.far)], -1), -1)
        return depths

    def render_rays(self, fields: TriplaneFields, triplane: torch.Tensor, origins: torch.Tensor,
                    directions: torch.Tensor, depths: torch.Tensor, background: torch.Tensor,
                    color_grad_scale: float = 1.0) -> dict[str, torch.Tensor]:
        """Per-ray outputs for rays [B, R, 3] of B objects with sample depths [B, R, K + 1] over
        ``background`` colours [3] or [B, R, 3]."""
        b, r, _ = origins.shape
        mids = (depths[..., 1:] + depths[..., :-1]) / 2  # [B, R, K]
        delta = depths[..., 1:] - depths[..., :-1]
        points = (origins[:, :, None] + directions[:, :, None] * mids[..., None]).reshape(b, -1, 3)
        training = torch.is_grad_enabled()  # the caller's mode: normals are needed either way
        if not points.requires_grad:
            points.requires_grad_(True)
        with torch.enable_grad():
            sdf = fields.sdf(triplane, points)  # [B, P, 1]
            gradient = torch.autograd.grad(sdf.sum(), points, create_graph=training, retain_graph=training)[0]
        if not training:
            sdf, gradient = sdf.detach(), gradient.detach()
        normal = F.normalize(gradient, dim=-1).reshape(b, r, -1, 3)
        sdf = sdf.reshape(b, r, -1)
        cos = (directions[:, :, None] * normal).sum(-1)
        weights = composite(neus_alpha(sdf, cos, delta, self.config.inv_s))  # [B, R, K]
        color = fields.color(triplane, points).reshape(b, r, -1, 3)
        if color_grad_scale != 1.0:
            color = color * color_grad_scale + color.detach() * (1 - color_grad_scale)
        opacity = weights.sum(-1, keepdim=True)
        return {"rgb": (weights[..., None] * color).sum(-2) + background * (1 - opacity),
                "opacity": opacity,
                "depth": (weights * mids).sum(-1, keepdim=True),
                "normal": F.normalize((weights[..., None] * normal).sum(-2), dim=-1) * opacity,
                "sdf_gradients": gradient.reshape(-1, 3)}

    # -- images --------------------------------------------------------------------------------------
    def render(self, fields: TriplaneFields, triplane: torch.Tensor, cameras: Cameras,
               generator: torch.Generator | None = None, step: int = 0,
               background: Callable[[torch.Tensor], torch.Tensor] | None = None) -> VolumeRender:
        """The N = B·V camera views of B objects (triplane [B, 6, C, H, W]) as ``rays``² images.

        ``step``: the schedule step, for the colour gradient's schedule. ``background``: colours
        [B, R, 3] of ray directions [B, R, 3] (object b's rays), e.g. ``LearnedBackground.bind(text)``;
        None: the config's plain colour.
        """
        cfg = self.config
        color_scale = ramp(step, *cfg.color_grad_scale, cfg.color_grad_until)
        origins, directions = cameras.rays(cfg.rays)  # [N, S, S, 3]
        n, size = origins.shape[0], cfg.rays
        views = cameras.views_per_prompt
        plain = torch.tensor(cfg.background, device=origins.device)

        def run(o: torch.Tensor, d: torch.Tensor) -> dict[str, torch.Tensor]:
            side = o.shape[1]
            o, d = o.reshape(n // views, views * side * side, 3), d.reshape(n // views, views * side * side, 3)
            depths = self.sample_depths(fields, triplane, o, d, generator)
            colors = plain if background is None else background(d)
            out = self.render_rays(fields, triplane, o, d, depths, colors, color_scale)
            return {k: (v if k == "sdf_gradients" else v.reshape(n, side, side, -1).permute(0, 3, 1, 2))
                    for k, v in out.items()}

        small = cfg.global_rays if cfg.global_rays and cfg.global_rays < size else size
        images = run(*cameras.rays(small)) if small < size else run(origins, directions)
        gradients = images.pop("sdf_gradients")
        if small < size:
            images = {k: F.interpolate(v, (size, size), mode="bilinear", align_corners=False) for k, v in images.items()}
            p = min(cfg.patch_rays, size)
            if p:
                y, x = (int(v) for v in torch.randint(0, size - p + 1, (2,), generator=generator))
                patch = run(origins[:, y:y + p, x:x + p].contiguous(), directions[:, y:y + p, x:x + p].contiguous())
                patch.pop("sdf_gradients")  # the eikonal term reads the global pass, as the authors'
                for k, v in patch.items():
                    images[k] = images[k].clone()
                    images[k][:, :, y:y + p, x:x + p] = v
        return VolumeRender(images["rgb"], images["opacity"], images["depth"], images["normal"], gradients)
