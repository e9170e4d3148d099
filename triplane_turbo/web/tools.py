"""The app's tools for AI agents (MCP) and programs: ``generate`` and ``variants``, answering JSON with URLs.

Gradio publishes every public endpoint of the app as an MCP tool: the tool's name is the function's
name, its description and its arguments' descriptions come from the docstring (``Args:`` with one
line per argument: ``one_line_per_argument`` joins wrapped ones), its input schema from the type
hints. The page's own public events answer with component values (a 3D view, a details panel,
download buttons) for ``gradio_client``, so they are not offered (``offer_tools``); these two answer
with one JSON document that an agent can read and act on.

Same path as the page: the validators of ``Handlers`` check the inputs and admit the request to the
GPU queue (or answer "busy") before it is queued; a stored result is answered without queueing
(``answers_from_store``); anything else is made by the same ``GenerationService`` in the same
concurrency group (``GPU_GROUP``, one at a time).
"""

from __future__ import annotations

import inspect
import json
import secrets
import time
from typing import Literal
from urllib.parse import quote

import gradio as gr
from gradio.caching import CacheMissError

from .handlers import (GENERATE_PARAMETERS, GPU_GROUP, VARIANT_PARAMETERS, Handlers, answers_from_store, page_url,
                       probing, user_errors)
from .service import Stored
from .settings import (DEFAULT_FACES, DEFAULT_RESOLUTION, RANDOM_SEED_LIMIT, InputError, Settings,
                       settings_from_inputs, variant_settings)
from .downloads import download_url
from .store import DOWNLOADS, Entry

#: The tools' parameters, in their order (each also one of the page's parameters, for the verdicts).
TOOL_GENERATE_PARAMETERS = ["prompt", "seed", "mesh_resolution", "texture", "remove_floaters", "target_faces"]
TOOL_VARIANT_PARAMETERS = VARIANT_PARAMETERS
#: The tools' endpoints as ``gradio_client`` names them (the MCP tools are named after the functions).
TOOL_API_NAMES = {"generate": "mcp_generate", "variants": "mcp_variants"}
#: The tools' names for the store's download formats where they differ (the OBJ comes zipped with its texture).
ANSWER_NAMES = {"obj": "obj_zip"}


def one_line_per_argument(fn):
    """``fn`` with each argument's (and the return value's) wrapped description joined into one line of
    its docstring: Gradio's docstring parser, which writes the MCP tools' descriptions, reads only the
    first line of each."""
    lines = inspect.cleandoc(fn.__doc__).splitlines()
    joined: list[str] = []
    for line in lines:
        if line.startswith("        ") and joined:  # a continuation, indented below its "name: …" line
            joined[-1] += " " + line.strip()
        else:
            joined.append(line)
    fn.__doc__ = "\n".join(joined)
    return fn


def file_url(page: str, path) -> str:
    """The address at which the app serves ``path`` (one of the store's served files) for a page at ``page``."""
    return f"{page}gradio_api/file={quote(str(path), safe='/')}"


def offer_tools(demo: gr.Blocks) -> None:
    """Makes the launched app's MCP server offer exactly the two tools, named after their functions.

    Gradio's MCP server (``demo.mcp_server_obj``, made by ``launch(mcp_server=True)``) offers every
    public endpoint; the page's ``generate`` and ``variants`` are public for ``gradio_client`` but
    answer in components (and take the name ``generate`` first). Without an MCP server: nothing to do.
    """
    server = getattr(demo, "mcp_server_obj", None)
    if server is not None:
        server.tool_to_endpoint = {server.valid_and_unique_tool_name(server.tool_prefix + name, set()): "/" + api_name
                                   for name, api_name in TOOL_API_NAMES.items()}  # as Gradio names them


class Tools:
    """The MCP tools (also ``gradio_client`` endpoints); ``wire`` adds them to the Blocks being built.

    Args:
        handlers: the page's handlers: their validators, queue count and service are shared.
    """

    def __init__(self, handlers: Handlers):
        self.handlers, self.service = handlers, handlers.service

    def wire(self, demo: gr.Blocks) -> None:
        """Adds the two endpoints (call inside ``with demo:``), with the page's admission and GPU group."""
        for fn, validator in ((self.generate, self.validate_generate), (self.variants, self.validate_variants)):
            api_name = TOOL_API_NAMES[fn.__name__]
            gr.api(fn, api_name=api_name, concurrency_limit=1, concurrency_id=GPU_GROUP)
            # gr.api takes no validator; Gradio's queue runs the event's ``validator`` before queueing it
            (block_fn,) = [f for f in demo.fns.values() if f.api_name == api_name]
            block_fn.validator = validator

    # -- validators: the page's, for the tools' parameters --------------------------------------------
    def validate_generate(self, prompt, seed=None, mesh_resolution=DEFAULT_RESOLUTION, texture="uv",
                          remove_floaters=False, target_faces=None, request: gr.Request = None):
        verdicts = self.handlers.validate_generate(prompt, seed, seed is None, mesh_resolution, remove_floaters,
                                                   target_faces is not None,
                                                   DEFAULT_FACES if target_faces is None else target_faces, texture,
                                                   request=request)
        by_name = dict(zip(GENERATE_PARAMETERS, verdicts))
        return [by_name[name] for name in TOOL_GENERATE_PARAMETERS]

    def validate_variants(self, prompt, seed=None, count=4, mesh_resolution=DEFAULT_RESOLUTION,
                          request: gr.Request = None):
        try:
            batch, _ = variant_settings(prompt, 0 if seed is None else seed, count, mesh_resolution)
        except InputError as exc:
            return Handlers._verdict(TOOL_VARIANT_PARAMETERS, exc.field, str(exc))
        busy = self.handlers._busy("variants", batch, request, storable=seed is not None)  # random seeds: never stored
        return Handlers._verdict(TOOL_VARIANT_PARAMETERS, "prompt" if busy else None, busy or "")

    # -- the tools ---------------------------------------------------------------------------------------
    @answers_from_store
    @one_line_per_argument
    def generate(self, prompt: str, seed: int | None = None, mesh_resolution: Literal[128, 160, 256, 384] = 160,
                 texture: Literal["uv", "vertex"] = "uv", remove_floaters: bool = False,
                 target_faces: int | None = None, request: gr.Request = None) -> str:
        """Makes a textured 3D mesh of one object from a text description (TriplaneTurbo, text to 3D): a GLB
        file, OBJ (zip), PLY, STL, USDZ (AR) and 3MF (printing) downloads, and a link to a page that shows the
        mesh in a 3D viewer. About a second on a GPU; the same prompt, seed and settings give the same mesh,
        answered at once when stored.

        Args:
            prompt: One object, described in a short English phrase as you would caption a photo of it, e.g.
                "a frog wearing a sweater", "a wooden chair", "a red sports car". Name the object first, then its
                material, colours and style; no scene, background or camera directions. At most 1000 characters
                (the model reads about the first 75 words).
            seed: A whole number from 0 to 9223372036854775807 that picks one of the many meshes the prompt can
                give: the same seed gives the same mesh. Omit it (or null) for a random seed; the answer says
                which seed was used.
            mesh_resolution: The marching-cubes grid per axis: 128, 160 (default), 256 or 384. Finer grids give
                more faces and detail and take longer.
            texture: "uv" (default): a baked texture image that keeps the colours' detail; "vertex": colours
                per vertex (quicker, blurrier, no image).
            remove_floaters: true to drop small parts not attached to the object (under 5% of the largest
                part). Default false.
            target_faces: Simplify the mesh to about this many faces (1000 to 1000000), with a normal map that
                keeps the detail; omit it (or null) for the full mesh.
        Returns:
            A JSON object: "glb_url" (the GLB: a textured mesh in metres, +Y up, about 1 unit across),
                "downloads" ({"glb", "obj_zip", "ply", "stl", "usdz", "3mf"}: URLs;
                STL and 3MF print-ready: millimetres, +Z up, on the plate, 100 mm tall at most; USDZ for AR), "preview_url" (a PNG picture of the
                mesh), "link" (a page showing it in a 3D viewer, to share), "seed" (the seed used), "details"
                (prompt, settings, vertex and face counts, device, seconds per stage, "cached": whether it
                came from the store) and "warnings" (notes on the prompt, if any).
        """
        started, probe = time.perf_counter(), probing()
        with user_errors(probe):
            settings, notes = settings_from_inputs(prompt, seed, seed is None, mesh_resolution, remove_floaters,
                                                   target_faces is not None,
                                                   DEFAULT_FACES if target_faces is None else target_faces, texture)
        entries = self._entries("generate", [settings], request, started, probe, fail_on_empty=True)
        return json.dumps(self._describe(entries[0], settings, request, started, notes))

    @answers_from_store
    @one_line_per_argument
    def variants(self, prompt: str, seed: int | None = None, count: int = 4,
                 mesh_resolution: Literal[128, 160, 256, 384] = 160, request: gr.Request = None) -> str:
        """Makes several textured 3D meshes of one text description in one go, from consecutive seeds (seed,
        seed + 1, …): different takes on the same object to choose from. Variant i is the very mesh that
        generate gives for seed + i (with its default texture, no floater removal and no simplification).

        Args:
            prompt: One object, described in a short English phrase as you would caption a photo of it, e.g.
                "a frog wearing a sweater". Name the object first, then its material, colours and style; no
                scene or background.
            seed: The first seed, a whole number from 0 up; variant i uses seed + i. Omit it (or null) to
                start at a random seed.
            count: How many variants: 1 to 8 (default 4).
            mesh_resolution: The marching-cubes grid per axis: 128, 160 (default), 256 or 384.
        Returns:
            A JSON object: "variants" (a list, one per seed that gave a surface, each with "seed", "glb_url",
                "downloads", "preview_url", "link", "details" and "warnings" as generate answers them),
                "missing_seeds" (seeds that gave no surface) and "warnings".
        """
        started, probe = time.perf_counter(), probing()
        with user_errors(probe):
            if seed is None:
                seed = secrets.randbelow(RANDOM_SEED_LIMIT)  # as the page draws them
            batch, notes = variant_settings(prompt, seed, count, mesh_resolution)
        entries = self._entries("variants", batch, request, started, probe, fail_on_empty=False)
        if not entries:
            raise gr.Error(f"The model produced no surface for any of the seeds {batch[0].seed}…{batch[-1].seed}; "
                           "try other seeds or another prompt.")
        made = [self._describe(entries[i], s, request, started, []) for i, s in enumerate(batch) if i in entries]
        return json.dumps({"variants": made, "missing_seeds": [s.seed for i, s in enumerate(batch) if i not in entries],
                           "warnings": notes})

    # -- the same service as the page ----------------------------------------------------------------------
    def _entries(self, event: str, batch: list[Settings], request, started: float, probe: bool,
                 fail_on_empty: bool) -> dict[int, Entry]:
        """The stored results of ``batch`` by index; the missing ones made in one GPU run (not while probing:
        then a missing one means "queue it"). Admitted, released and logged as the page's events are."""
        with user_errors(probe), self.handlers._logged(f"mcp-{event}", request, started, probe) as line:
            found = {i: e for i, s in enumerate(batch) if (e := self.service.stored(s)) is not None}
            if len(found) < len(batch):
                if probe:
                    raise CacheMissError()
                for made in self.service.produce(batch, lambda fraction, desc: None, fail_on_empty=fail_on_empty,
                                                 first_look=False):
                    if isinstance(made, Stored):
                        found[made.index] = made.entry
            line.entries = [found[i] for i in sorted(found)]
        return found

    @staticmethod
    def _describe(entry: Entry, settings: Settings, request: gr.Request | None, started: float,
                  notes: list[str]) -> dict:
        """One result as the tools answer it: URLs on the app's public address, its link and details."""
        page = page_url(request)
        record = entry.record
        details = {**record, "timings": {k: round(v, 3) for k, v in record["timings"].items()},
                   "cached": not entry.fresh, "total_seconds": round(time.perf_counter() - started, 3)}
        details.pop("warnings", None)
        return {"seed": settings.seed, "glb_url": file_url(page, entry.files["glb"]),
                "downloads": {ANSWER_NAMES.get(fmt, fmt): file_url(page, entry.files[fmt]) if fmt == "glb" else
                              download_url(page, entry.key, fmt, entry.files[fmt].name) for fmt in DOWNLOADS},
                "preview_url": file_url(page, entry.files["preview"]), "link": settings.share_link(page),
                "details": details, "warnings": [*notes, *record.get("warnings", [])]}


__all__ = ["ANSWER_NAMES", "TOOL_API_NAMES", "TOOL_GENERATE_PARAMETERS", "Tools", "file_url", "offer_tools",
           "one_line_per_argument"]
