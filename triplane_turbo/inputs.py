"""What users pass in, checked once: prompts, seeds and the generation options.

Every check raises ``TypeError`` or ``ValueError`` with a message that names the value and the
accepted range, before any network runs. The library, the command lines and the app share them, so
a bound is stated in one place.
"""

from __future__ import annotations

import re
import secrets
import unicodedata
from typing import Sequence

import numpy as np

from .config import MAX_RESOLUTION, MAX_SEED, MAX_STEPS, MIN_RESOLUTION, TEXTURE_MODES, UNWRAP_METHODS

#: Longest prompt accepted (characters); the text encoder reads about 75 words of it anyway.
MAX_PROMPT_CHARS = 1000
#: Fewest faces a simplified mesh may ask for (quadric decimation needs a few to work with).
MIN_TARGET_FACES = 100
#: Most faces a simplified mesh may ask for.
MAX_TARGET_FACES = 10_000_000
_SEED_TEXT = re.compile(r"[+-]?[0-9]+")


def clean_text(text: str) -> tuple[str, int]:
    """A prompt with control characters removed (tabs and newlines become spaces) and whitespace
    collapsed, and the number of characters removed."""
    kept = [" " if c.isspace() else c for c in text
            if c.isspace() or unicodedata.category(c) not in ("Cc", "Cs")]  # controls, lone surrogates
    return " ".join("".join(kept).split()), len(text) - len(kept)


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


def _integer(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    return int(value)


def _in_range(value, name: str, low: int, high: int) -> int:
    value = _integer(value, name)
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")
    return value


def parse_seed(value) -> int:
    """A seed from an integer, an integral float or text of the form ``[+-]digits`` (ASCII digits
    only), within [0, MAX_SEED]. Anything else ("--5", "²", "1e3", 1.5) is a ValueError."""
    if isinstance(value, str):
        text = value.strip()
        if not _SEED_TEXT.fullmatch(text):
            raise ValueError(f"the seed must be a whole number, got {value!r:.40}")
        value = int(text)
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"the seed must be a whole number, got {value!r:.40}")
    return validate_seed(value)


def validate_seed(seed) -> int:
    return _in_range(seed, "seed", 0, MAX_SEED)


def validate_resolution(resolution) -> int:
    return _in_range(resolution, "mesh resolution", MIN_RESOLUTION, MAX_RESOLUTION)


def validate_num_steps(num_steps) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= MAX_STEPS:
        raise ValueError(f"num_steps must be an integer between 1 and {MAX_STEPS}, got {num_steps!r}")
    return int(num_steps)


def validate_target_faces(target_faces) -> int | None:
    """None (no simplification) or a face count in [MIN_TARGET_FACES, MAX_TARGET_FACES]."""
    if target_faces is None:
        return None
    return _in_range(target_faces, "target_faces", MIN_TARGET_FACES, MAX_TARGET_FACES)


def validate_floater_fraction(fraction) -> float | None:
    """None (keep every part) or a fraction in (0, 1): parts smaller than it (of the largest) go."""
    if fraction is None:
        return None
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating)) or not 0 < fraction < 1:
        raise ValueError(f"remove_floaters_below must be a fraction between 0 and 1, got {fraction!r}")
    return float(fraction)


def validate_texture_mode(texture) -> str:
    if texture not in TEXTURE_MODES:
        raise ValueError(f"texture must be one of {TEXTURE_MODES}, got {texture!r}")
    return texture


def validate_unwrap(unwrap) -> str:
    if unwrap not in UNWRAP_METHODS:
        raise ValueError(f"unwrap must be one of {UNWRAP_METHODS}, got {unwrap!r}")
    return unwrap


def random_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)


__all__ = ["MAX_PROMPT_CHARS", "MAX_TARGET_FACES", "MIN_TARGET_FACES", "clean_text", "parse_seed", "random_seed",
           "validate_floater_fraction", "validate_num_steps", "validate_prompts", "validate_resolution",
           "validate_seed", "validate_target_faces", "validate_texture_mode", "validate_unwrap"]
