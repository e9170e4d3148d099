"""TriplaneTurbo: instant text-to-mesh with Stable Diffusion 2.1 and the PETA triplane adapter.

>>> from triplane_turbo import TriplaneTurboPipeline
>>> from triplane_turbo.export import export_mesh
>>> pipe = TriplaneTurboPipeline.from_pretrained(device="cuda")
>>> out = pipe("a wooden chair", seed=42)
>>> export_mesh(out.meshes[0], "chair.glb")  # +Y up, colours that render

Heavy dependencies (diffusers, transformers, peft) are imported when a pipeline is built, and
nothing GPU-specific is imported at module import time.
"""

from .adapter import AdapterSpec, CheckpointMismatchError
from .config import GenerationConfig, WeightSources
from .hub import WeightsNotAvailableError
from .devices import default_dtype
from .pipeline import PromptTruncatedWarning, TriplaneTurboOutput, TriplaneTurboPipeline
from .triplane import Fields, TriplaneFields

__all__ = [
    "AdapterSpec",
    "CheckpointMismatchError",
    "Fields",
    "GenerationConfig",
    "PromptTruncatedWarning",
    "TriplaneFields",
    "TriplaneTurboOutput",
    "TriplaneTurboPipeline",
    "WeightSources",
    "WeightsNotAvailableError",
    "default_dtype",
]

__version__ = "0.1.0"
