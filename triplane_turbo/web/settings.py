"""What the app offers and how a request becomes ``Settings``: one strict parser per input, links.

No Gradio here: every bad value becomes an ``InputError`` naming the input and what is accepted;
the handlers turn those into Gradio's validation messages and errors.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass
from urllib.parse import urlencode

from ..config import MAX_SEED
from ..inputs import MAX_PROMPT_CHARS, clean_text, parse_seed

RESOLUTIONS = (128, 160, 256, 384)
DEFAULT_RESOLUTION = 160
#: The colour options as the page labels them, and the library's names for them.
TEXTURES = {"UV texture (baked)": "uv", "Vertex colours": "vertex"}
#: Side of the baked textures by default (``app.py --texture-size``).
DEFAULT_TEXTURE_SIZE = 1024
#: Seeds the app draws stay exact in the browser's float64 numbers.
RANDOM_SEED_LIMIT = 2**32
EXAMPLE_SEED = 0
FACES_RANGE = (1_000, 1_000_000)
DEFAULT_FACES = 20_000
MAX_VARIANTS = 8
HISTORY_SIZE = 24
#: Parts smaller than 5% of the largest one are "floaters".
FLOATER_FRACTION = 0.05


class InputError(ValueError):
    """A value a visitor (or an API caller, or a link) sent that the app cannot use.

    Attributes:
        field: the input's name (as the API names its parameters), for the message's placement.
    """

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Settings:
    """Everything that decides a result (with the weights, device and dtype: ``GenerationService.key``)."""

    prompt: str
    seed: int
    mesh_resolution: int = DEFAULT_RESOLUTION
    remove_floaters: bool = False
    target_faces: int | None = None
    texture: str = "uv"

    def link_query(self) -> dict:
        """The URL parameters of a link that reproduces this result (defaults left out)."""
        query = {"prompt": self.prompt, "seed": self.seed, "resolution": self.mesh_resolution}
        if self.remove_floaters:
            query["floaters"] = 1
        if self.target_faces:
            query["faces"] = self.target_faces
        if self.texture != "uv":
            query["texture"] = self.texture
        return query

    def share_link(self, page: str) -> str:
        return f"{page}?{urlencode(self.link_query())}"

    def as_record(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# One parser per input
# ---------------------------------------------------------------------------------------------
def parse_prompt(prompt) -> tuple[str, list[str]]:
    """The prompt with control characters removed and whitespace collapsed, plus notes for the visitor."""
    if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
        raise InputError("prompt", "The prompt is empty: describe an object, e.g. 'a frog wearing a sweater'.")
    if not isinstance(prompt, str):
        raise InputError("prompt", f"The prompt must be text, got {type(prompt).__name__}.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError("prompt", f"The prompt is {len(prompt)} characters long; the limit is {MAX_PROMPT_CHARS}. "
                                   "Only the first ~75 words reach the model anyway.")
    text, removed = clean_text(prompt)
    if not text:
        raise InputError("prompt", "The prompt is empty once control characters are removed: describe an object.")
    notes = [f"Removed {removed} control character{'s' * (removed > 1)} from the prompt."] if removed else []
    return text, notes


def parse_flag(value, field: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InputError(field, f"{field} must be true or false, got {value!r:.40}.")
    return value


def parse_seed_input(seed, randomize=False, field: str = "seed") -> int:
    """The seed to use: a fresh random one when ``randomize``, else ``seed`` parsed strictly
    (``inputs.parse_seed``: an integer, or text ``[+-]digits``, within [0, MAX_SEED])."""
    if parse_flag(randomize, "randomize_seed"):
        return secrets.randbelow(RANDOM_SEED_LIMIT)
    if seed is None or seed == "":
        raise InputError(field, "Enter a seed, or tick 'Randomize seed'.")
    try:
        return parse_seed(seed)
    except ValueError:
        if isinstance(seed, (int, float)) and not isinstance(seed, bool) and float(seed).is_integer():
            raise InputError(field, f"The seed must be between 0 and {MAX_SEED}, got {int(seed)}.") from None
        raise InputError(field, f"The seed must be a whole number between 0 and {MAX_SEED}, got {seed!r:.40}.") from None


def _whole(value, field: str) -> int:
    """An integer from an int, an integral float, or ASCII digit text; else an InputError."""
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(field, f"{field} must be a whole number, got {value!r:.40}.")
    return value


def parse_resolution(value, field: str = "mesh_resolution") -> int:
    try:
        value = _whole(value, field)
    except InputError:
        value = None
    if value not in RESOLUTIONS:
        raise InputError(field, f"{field} must be one of {', '.join(map(str, RESOLUTIONS))}.")
    return value


def parse_faces(value, field: str = "target_faces") -> int:
    value = _whole(value, field)
    if not FACES_RANGE[0] <= value <= FACES_RANGE[1]:
        raise InputError(field, f"{field} must be between {FACES_RANGE[0]} and {FACES_RANGE[1]}, got {value}.")
    return value


def parse_texture(value, field: str = "texture") -> str:
    value = TEXTURES.get(value, value) if isinstance(value, str) else value
    if value not in TEXTURES.values():
        raise InputError(field, f"texture must be one of {', '.join(repr(v) for v in TEXTURES.values())}, "
                                f"got {value!r:.40}.")
    return value


def parse_count(value, field: str = "count") -> int:
    count = _whole(value, field)
    if not 1 <= count <= MAX_VARIANTS:
        raise InputError(field, f"count must be between 1 and {MAX_VARIANTS}, got {count}.")
    return count


def texture_label(value: str) -> str:
    return next(label for label, v in TEXTURES.items() if v == value)


# ---------------------------------------------------------------------------------------------
# Whole requests
# ---------------------------------------------------------------------------------------------
def settings_from_inputs(prompt, seed, randomize_seed, mesh_resolution, remove_floaters=False, simplify=False,
                         target_faces=DEFAULT_FACES, texture="uv") -> tuple[Settings, list[str]]:
    """The generate request's inputs -> its ``Settings`` and notes for the visitor (InputError if any is bad)."""
    text, notes = parse_prompt(prompt)
    return Settings(text, parse_seed_input(seed, randomize_seed), parse_resolution(mesh_resolution),
                    parse_flag(remove_floaters, "remove_floaters"),
                    parse_faces(target_faces) if parse_flag(simplify, "simplify") else None,
                    parse_texture(texture)), notes


def variant_settings(prompt, seed, count, mesh_resolution) -> tuple[list[Settings], list[str]]:
    """The variants request: settings for seeds seed, seed+1, …, seed+count−1."""
    text, notes = parse_prompt(prompt)
    first = parse_seed_input(seed)
    count = parse_count(count)
    resolution = parse_resolution(mesh_resolution)
    if first + count - 1 > MAX_SEED:
        raise InputError("seed", f"The seeds {first}…{first + count - 1} go past {MAX_SEED}.")
    return [Settings(text, first + i, resolution) for i in range(count)], notes


def settings_from_entry(kept) -> Settings:
    """Settings from a history or variant entry, which the browser holds (and could have changed):
    checked as strictly as the inputs of a request."""
    try:
        prompt, _ = parse_prompt(kept["prompt"])
        faces = kept.get("target_faces")
        return Settings(prompt, parse_seed_input(kept["seed"]), parse_resolution(kept["mesh_resolution"]),
                        parse_flag(kept.get("remove_floaters"), "remove_floaters"),
                        None if faces is None else parse_faces(faces), parse_texture(kept.get("texture", "uv")))
    except (KeyError, TypeError, AttributeError):
        raise InputError("entry", "That entry is damaged; generate it again.") from None


@dataclass(frozen=True)
class LinkInputs:
    """The page's inputs as a generation link sets them (None: leave the input as it is)."""

    prompt: str
    seed: int | None
    randomize: bool
    resolution: int
    remove_floaters: bool
    simplify: bool
    faces: int | None
    texture: str


def inputs_from_link(query: dict) -> tuple[LinkInputs | None, list[str]]:
    """``?prompt=…&seed=…&resolution=…[&floaters=1][&faces=N][&texture=vertex]`` -> the inputs to
    fill and warnings for what was unusable (a bad value falls back to the default, never breaks
    the page). None without a prompt."""
    prompt = query.get("prompt", "")
    if not isinstance(prompt, str) or not prompt.strip():
        return None, []
    warnings: list[str] = []
    seed, randomize = None, True
    if "seed" in query:
        try:
            seed, randomize = parse_seed_input(query["seed"]), False
        except InputError:
            warnings.append(f"The link's seed {query['seed']!r:.30} is not a whole number between 0 and {MAX_SEED}; "
                            "using a random seed.")
    try:
        resolution = parse_resolution(query.get("resolution", DEFAULT_RESOLUTION))
    except InputError:
        warnings.append(f"The link's resolution is not one of {RESOLUTIONS}; using {DEFAULT_RESOLUTION}.")
        resolution = DEFAULT_RESOLUTION
    faces = None
    if "faces" in query:
        try:
            faces = parse_faces(query["faces"])
        except InputError:
            warnings.append(f"The link's face count must be between {FACES_RANGE[0]} and {FACES_RANGE[1]}; "
                            "not simplifying.")
    texture = query.get("texture", "uv")
    if texture not in TEXTURES.values():
        warnings.append("The link's texture is not 'uv' or 'vertex'; using 'uv'.")
        texture = "uv"
    return LinkInputs(prompt, seed, randomize, resolution, query.get("floaters", "") in ("1", "true"),
                      faces is not None, faces, texture), warnings


__all__ = ["DEFAULT_FACES", "DEFAULT_RESOLUTION", "EXAMPLE_SEED", "FACES_RANGE", "FLOATER_FRACTION", "HISTORY_SIZE",
           "InputError", "LinkInputs", "MAX_VARIANTS", "RESOLUTIONS", "Settings", "TEXTURES", "DEFAULT_TEXTURE_SIZE",
           "inputs_from_link", "parse_count", "parse_faces", "parse_flag", "parse_prompt", "parse_resolution",
           "parse_seed_input", "parse_texture", "settings_from_entry", "settings_from_inputs", "texture_label",
           "variant_settings"]
