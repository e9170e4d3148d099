"""The web app's parts, one job per module; ``app.py`` lays out the page and wires them.

* ``settings`` — what the app offers, one strict parser per input, generation links (no Gradio);
* ``store`` — the results on disk, bounded, in a folder of the app's own;
* ``models`` — loading the model once, the device and dtype, ZeroGPU's rules;
* ``service`` — lookup, make, bake, preview, store (no Gradio; a plain progress callable);
* ``admission`` — who may wait for the GPU: the queue's bound and each visitor's share;
* ``requestlog`` — one log line per request, for the operator;
* ``handlers`` — Gradio's side: validators, handlers, queue behaviour, errors as messages;
* ``tools`` — the MCP tools (``generate``, ``variants``): the same admission and service, JSON answers.
"""

from .handlers import GPU_GROUP, Handlers
from .models import ModelLoader, ModelNotReadyError, gpu_seconds, make_loader, pick_device, speed_note
from .service import GenerationError, GenerationService
from .store import OutputFolderError, ResultStore

__all__ = ["GPU_GROUP", "GenerationError", "GenerationService", "Handlers", "ModelLoader", "ModelNotReadyError",
           "OutputFolderError", "ResultStore", "gpu_seconds", "make_loader", "pick_device", "speed_note"]
