"""Which teachers a run distils from: a registry keyed by name, and the authors' recipes.

Recipes (the authors' code, theEricMa/TriplaneTurbo @bc047f3):

* ``authors-v1``: ``configs/TriplaneTurbo_v1.yaml`` sums three teachers with weight 1 each —
  MVDream (``mv_weight: 1.``), RichDreamer's normal-depth model (``rd_weight: 1.``) and SD 2.1
  (``sd_weight: 1``);
* ``authors-mv``: ``scripts/train/TriplaneTurbo_v1_Objaverse.sh``'s single-GPU run sets
  ``guidance.rd_weight=0 guidance.sd_weight=0``: MVDream alone;
* ``sd``: Stable Diffusion 2.1 alone (this project's stage 1; not a recipe of the authors).

Teachers: ``sd`` is ``StableDiffusionTeacher`` (teachers.py); ``mvdream`` and ``richdreamer`` are
``MVDreamTeacher`` / ``RichDreamerTeacher`` from ``triplane_turbo.training.mvdream`` / ``.richdreamer``,
imported only when a run asks for them. MVDream shares the pipeline's SD 2.1 text encoder (the same
frozen weights); RichDreamer reads SD 1.5's CLIP-L (``sd-legacy/stable-diffusion-v1-5`` by default,
the repository the authors' ``scripts/prepare/download_full.py`` fetches).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .config import GuidanceConfig
from .teachers import StableDiffusionTeacher, Teacher


class TeacherUnavailableError(RuntimeError):
    """A teacher cannot be built here; the message names what is missing."""


@dataclass(frozen=True)
class TeacherSpec:
    """One teacher of a run and the weight of its loss."""

    name: str
    weight: float = 1.0


@dataclass(frozen=True)
class Recipe:
    name: str
    teachers: tuple[TeacherSpec, ...]
    summary: str
    #: how its prompts become tokens (``prompts.token_ids``): the authors' slicing for their recipes
    prompt_tokens: str = "slice"


RECIPES: dict[str, Recipe] = {
    "authors-v1": Recipe("authors-v1", (TeacherSpec("sd"), TeacherSpec("mvdream"), TeacherSpec("richdreamer")),
                         "the authors' full run: MVDream + RichDreamer normal-depth + SD 2.1, weight 1 each"),
    "authors-mv": Recipe("authors-mv", (TeacherSpec("mvdream"),),
                         "the authors' reduced run (rd_weight=0 sd_weight=0): MVDream alone"),
    "sd": Recipe("sd", (TeacherSpec("sd"),), "Stable Diffusion 2.1 alone", prompt_tokens="truncate"),
}
DEFAULT_RECIPE = "authors-v1"

#: name -> (module, class) of the teachers that live in modules of their own
TEACHER_MODULES: dict[str, tuple[str, str]] = {
    "mvdream": ("triplane_turbo.training.mvdream", "MVDreamTeacher"),
    "richdreamer": ("triplane_turbo.training.richdreamer", "RichDreamerTeacher"),
}
TEACHER_NAMES = ("sd", *TEACHER_MODULES)
#: RichDreamer's text encoder: SD 1.5's CLIP-L (Hub id or local diffusers folder).
SD15_TEXT = "sd-legacy/stable-diffusion-v1-5"
#: The authors' teacher precision on a GPU: Stable Diffusion in float16 (their guidance's
#: ``half_precision_weights: bool = True``, richdreamer_mvdream_stablediffusion_asd_guidance.py:93, 130-139),
#: MVDream and RichDreamer in float32 (their model zoos build them with no half cast,
#: extern/mvdream/model_zoo.py:35-57; the MVDream UNet's ``use_fp16=False`` default and the normal-depth
#: config's ``use_fp16: False``; ``trainer.precision: 32`` in configs/TriplaneTurbo_v1.yaml:254).
AUTHORS_TEACHER_DTYPES: dict[str, torch.dtype] = {"sd": torch.float16, "mvdream": torch.float32,
                                                  "richdreamer": torch.float32}


def teacher_dtypes(names, device_type: str, override: str | None = None) -> dict[str, torch.dtype]:
    """Each teacher's dtype: the authors' (``AUTHORS_TEACHER_DTYPES``) on CUDA, float32 elsewhere.

    ``override``: None or "auto" (that rule), one dtype for every teacher ("float32"), or per teacher
    "sd=float16,richdreamer=float16" (the others keep the rule). ValueError for anything else.
    """
    names = list(names)
    dtypes = {n: AUTHORS_TEACHER_DTYPES[n] if device_type == "cuda" else torch.float32 for n in names}
    if override in (None, "", "auto"):
        return dtypes
    allowed = ("float32", "float16", "bfloat16")
    if "=" not in override:
        if override not in allowed:
            raise ValueError(f"a teacher dtype is one of {', '.join(allowed)}, got {override!r}")
        return {n: getattr(torch, override) for n in names}
    for item in override.split(","):
        name, _, value = (part.strip() for part in item.partition("="))
        if name not in TEACHER_NAMES or value not in allowed:
            raise ValueError(f"--teacher-dtypes takes name=dtype pairs ({', '.join(TEACHER_NAMES)}; "
                             f"{', '.join(allowed)}), got {item!r}")
        if name in dtypes:
            dtypes[name] = getattr(torch, value)
    return dtypes


def teacher_class(name: str) -> type[Teacher]:
    """The class of the teacher called ``name`` (its module imported on first use: a run with the
    Stable Diffusion teacher alone never loads the multi-view UNet's code). ValueError for an unknown name."""
    if name == "sd":
        return StableDiffusionTeacher
    if name not in TEACHER_MODULES:
        raise ValueError(f"unknown teacher {name!r}; choose from {', '.join(TEACHER_NAMES)}")
    module_name, class_name = TEACHER_MODULES[name]
    return getattr(importlib.import_module(module_name), class_name)


def parse_teachers(names: str, weights: str | None = None) -> tuple[TeacherSpec, ...]:
    """``"sd,mvdream"`` and ``"1,0.5"`` -> teacher specs (weights default to 1)."""
    listed = [n.strip() for n in names.split(",") if n.strip()]
    if not listed or len(set(listed)) != len(listed):
        raise ValueError(f"--teachers takes distinct names from {', '.join(TEACHER_NAMES)}, got {names!r}")
    for name in listed:
        if name not in TEACHER_NAMES:
            raise ValueError(f"unknown teacher {name!r}; choose from {', '.join(TEACHER_NAMES)}")
    values = [1.0] * len(listed)
    if weights is not None:
        try:
            values = [float(w) for w in weights.split(",")]
        except ValueError:
            raise ValueError(f"--teacher-weights takes numbers, got {weights!r}") from None
        if len(values) != len(listed) or any(not (w >= 0) for w in values):
            raise ValueError(f"--teacher-weights needs {len(listed)} non-negative numbers, got {weights!r}")
    return tuple(TeacherSpec(n, w) for n, w in zip(listed, values))


class WeightedTeacher(Teacher):
    """A teacher whose loss is multiplied by ``weight`` (the recipes' per-teacher weights)."""

    def __init__(self, teacher: Teacher, weight: float):
        self.teacher, self.weight, self.name = teacher, weight, teacher.name

    def loss(self, renders, prompts, step, generator=None):
        return self.weight * self.teacher.loss(renders, prompts, step, generator)

    def frozen_parameters(self):
        return self.teacher.frozen_parameters()


def teacher_sources(specs: tuple[TeacherSpec, ...], sources: dict[str, str | None] | None = None,
                    tiny: bool = False) -> dict[str, str | None]:
    """Where each teacher's weights come from (None for ``sd``, which uses the base model, and with
    ``tiny``); checks every source before anything is loaded.

    Raises:
        TeacherUnavailableError: naming the first teacher whose weights have no source.
    """
    sources = sources or {}
    resolved: dict[str, str | None] = {}
    for spec in specs:
        teacher_class(spec.name)
        if spec.name == "sd" or tiny:
            resolved[spec.name] = None
            continue
        default = importlib.import_module(TEACHER_MODULES["mvdream"][0]).MVDREAM_REPO if spec.name == "mvdream" else None
        source = sources.get(spec.name) or default
        if source is None:
            raise TeacherUnavailableError(f"the {spec.name} teacher's weights are not published on the Hub: "
                                          f"name a local copy with --{spec.name}-weights PATH")
        resolved[spec.name] = str(source)
    return resolved


def build_teachers(specs: tuple[TeacherSpec, ...], *, base_dir: str | Path, device,
                   dtype: torch.dtype | dict[str, torch.dtype], guidance: GuidanceConfig = GuidanceConfig(),
                   text_encoder=None, tokenizer=None, sources: dict[str, str | None] | None = None,
                   tiny: bool = False, settings: dict[str, dict] | None = None) -> list[Teacher]:
    """The teachers of ``specs``, each weighted.

    Args:
        base_dir: the SD 2.1 base model folder (the ``sd`` teacher's weights; with ``tiny``, the tiny one).
        dtype: one dtype for every teacher, or one per teacher name (``teacher_dtypes``: the authors').
        settings: per teacher name, fields of its config to replace (``mvdream``: ``MVDreamConfig``,
            ``richdreamer``: ``RichDreamerConfig``; ``sd`` reads ``guidance``), e.g. a preset's schedules.
        text_encoder, tokenizer: the pipeline's SD 2.1 text encoder, shared with the teachers that use it.
        sources: per teacher name, a Hub id or local path of its weights (None: the class's default).
        tiny: tiny random teachers (offline).
    Raises:
        TeacherUnavailableError: a teacher's weights have no source (the message says which).
    """
    resolved = teacher_sources(specs, sources, tiny)  # fails before anything is loaded
    teachers: list[Teacher] = []
    for spec in specs:
        cls = teacher_class(spec.name)
        kind = dtype.get(spec.name, torch.float32) if isinstance(dtype, dict) else dtype
        changes = (settings or {}).get(spec.name, {})
        if spec.name == "sd":
            teacher = StableDiffusionTeacher(base_dir, device, kind, replace(guidance, **changes),
                                             text_encoder=text_encoder, tokenizer=tokenizer)
        elif spec.name == "mvdream":
            from .mvdream import TINY_MVDREAM, MVDreamConfig, PromptEncoder

            text = PromptEncoder(tokenizer, text_encoder)  # SD 2.1's, shared
            config = replace(TINY_MVDREAM if tiny else MVDreamConfig(), **changes)
            teacher = cls.tiny(text, device, kind, config) if tiny else \
                cls.from_pretrained(text, resolved[spec.name], device=device, dtype=kind, config=config)
        else:  # richdreamer: SD 1.5's text encoder, its own
            from .mvdream import PromptEncoder
            from .richdreamer import TINY_RICHDREAMER, RichDreamerConfig

            config = replace(TINY_RICHDREAMER if tiny else RichDreamerConfig(), **changes)
            if tiny:
                teacher = cls.tiny(device=device, dtype=kind, config=config)
            else:
                text = PromptEncoder.from_pretrained((sources or {}).get("richdreamer-text") or SD15_TEXT, device, kind)
                teacher = cls.from_pretrained(text, resolved[spec.name], device=device, dtype=kind, config=config)
        teachers.append(WeightedTeacher(teacher, spec.weight))
    return teachers


__all__ = ["AUTHORS_TEACHER_DTYPES", "DEFAULT_RECIPE", "RECIPES", "Recipe", "TEACHER_MODULES", "TEACHER_NAMES",
           "TeacherSpec", "TeacherUnavailableError", "WeightedTeacher", "build_teachers", "parse_teachers",
           "teacher_class", "teacher_dtypes", "teacher_sources"]
