"""TriplaneTurbo web app: text -> textured 3D mesh. The page's layout and wiring; the rest lives in
``triplane_turbo.web`` (settings, store, model loading, generation service, Gradio handlers).

    python app.py [--tiny]    # the published weights (fetched once from the Hub), or a tiny random model offline

It is also an MCP server (tools ``generate`` and ``variants``, ``triplane_turbo.web.tools``) at
/gradio_api/mcp/ unless started with ``--no-mcp`` (or TRIPLANE_TURBO_MCP=0): docs/MCP.md.
"""

from __future__ import annotations

try:  # ZeroGPU needs `spaces` imported before torch initialises CUDA.
    import spaces
except ImportError:  # optional outside Hugging Face Spaces
    spaces = None

import logging
import os
from pathlib import Path

import gradio as gr

from triplane_turbo.web import (GPU_GROUP, GenerationService, Handlers, ModelLoader, OutputFolderError, ResultStore,
                                gpu_seconds, make_loader, pick_device, speed_note)
from triplane_turbo.web.admission import trust_space_proxy
from triplane_turbo.web.downloads import LinkDownloadButton, download_routes
from triplane_turbo.web.memory import freeze_startup_objects, keep_large_arrays_out_of_the_heap
from triplane_turbo.web.meshsource import ARCHIVED
from triplane_turbo.web.options import parse_args
from triplane_turbo.web.settings import (DEFAULT_FACES, DEFAULT_RESOLUTION, DEFAULT_TEXTURE_SIZE, EXAMPLE_SEED,
                                         MAX_VARIANTS, RESOLUTIONS, TEXTURES, texture_label)
from triplane_turbo.web.store import DOWNLOADS
from triplane_turbo.web.tools import Tools, offer_tools

ASSETS = Path(__file__).resolve().parent / "assets"
PAPER_URL = "https://arxiv.org/abs/2503.21694"
CODE_URL = "https://github.com/theEricMa/TriplaneTurbo"
REPO_URL = os.environ.get("TRIPLANE_TURBO_REPO_URL", "")  # this project's public page, once it has one
TINY_BANNER = ("**Offline demo on a tiny random model:** the shapes are meaningless blobs. "
               "Use it to try the interface; run `python app.py` for the real TriplaneTurbo weights.")
#: Visitors' sessions whose state Gradio keeps (least recently active dropped first). Each holds about
#: 100 kB, mostly Gradio's own copy of the page's configuration (measured over the objects a session
#: alone holds; it no longer grows with the meshes made, see Handlers._show), and Gradio's default of
#: 10,000 sessions would be a gigabyte. A session's state (the last result, the variants' list) only
#: serves clicks during a visit; a dropped one answers such a click with a clear message.
SESSION_CAPACITY = 256
#: Browser history: localStorage key; the "secret" only obfuscates (Gradio publishes it in the page config).
HISTORY_STORAGE = dict(storage_key="triplane-turbo-history-v1", secret="triplane-turbo-history")


def load_examples(path: Path = ASSETS / "examples.txt") -> list[str]:
    return [s for s in map(str.strip, path.read_text(encoding="utf-8").splitlines()) if s and not s.startswith("#")]


def on_zero_gpu() -> bool:
    return bool(getattr(getattr(getattr(spaces, "config", None), "Config", None), "zero_gpu", False))


def build_demo(loader: ModelLoader, output_dir, *, tiny: bool = False, max_bytes: float = 2e9,
               max_age_s: float = 86400.0, bake_fields=None, max_queue: int = 64, max_waiting_per_client: int = 2,
               texture_size: int = DEFAULT_TEXTURE_SIZE) -> gr.Blocks:
    """The app's Blocks, queued but not launched."""
    store = ResultStore(output_dir, max_bytes, max_age_s)
    store.enforce_limits()
    on_device = (lambda fn: spaces.GPU(duration=gpu_seconds)(fn)) if spaces is not None else None
    service = GenerationService(loader, store, bake_fields=bake_fields, on_device=on_device, texture_size=texture_size)
    handlers = Handlers(service, max_queue, max_waiting_per_client)
    gr.set_static_paths(store.served)  # results are served in place; nothing else is

    with gr.Blocks(title="TriplaneTurbo: instant text-to-mesh") as demo:
        repo = f" · [this app's code]({REPO_URL})" if REPO_URL else ""
        gr.Markdown("# TriplaneTurbo: instant text-to-mesh\nType a description and get a textured 3D mesh in about "
                    f"a second on a GPU. [Paper (arXiv 2503.21694)]({PAPER_URL}) · [Authors' code]({CODE_URL}){repo}",
                    elem_id="intro")
        if tiny:
            gr.Markdown(TINY_BANNER, elem_id="tiny-banner")
        gr.Markdown(speed_note(tiny, loader.device), elem_id="speed-note")
        status = gr.Markdown(loader.status(), elem_id="model-status")
        with gr.Row(elem_id="workspace"):  # the form, then the result; on phones one list (assets/style.css)
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", placeholder="a frog wearing a sweater", max_lines=1, elem_id="prompt")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=EXAMPLE_SEED, precision=0, elem_id="seed")
                    randomize = gr.Checkbox(label="Randomize seed", value=True, elem_id="randomize")
                with gr.Accordion("Advanced", open=False):
                    resolution = gr.Dropdown(list(RESOLUTIONS), value=DEFAULT_RESOLUTION, label="Mesh resolution",
                                             info="Marching-cubes grid per axis: finer meshes take longer.")
                    texture = gr.Radio(list(TEXTURES), value=texture_label("uv"), label="Colours", elem_id="texture",
                                       info=f"A baked texture ({texture_size}²; about half a second of CPU work per "
                                            "mesh) keeps the field's detail; vertex colours are shown first either way.")
                    floaters = gr.Checkbox(label="Remove small floating parts", value=False)
                    with gr.Row():
                        simplify = gr.Checkbox(label="Simplify to a target face count (adds a normal map)", value=False)
                        faces = gr.Number(label="Target faces", value=DEFAULT_FACES, precision=0)
                with gr.Accordion("Variants", open=False):
                    count = gr.Slider(1, MAX_VARIANTS, value=4, step=1, label="Variants", elem_id="count",
                                      info="Several meshes from consecutive seeds, in one go.")
                    variants_button = gr.Button("Make variants", elem_id="make-variants")
                    variants_gallery = gr.Gallery(label="Variants (click one to open it)", columns=4, height=220,
                                                  fit_columns=False, object_fit="contain", elem_id="variants",
                                                  allow_preview=False)
                    variant_files = gr.File(label="Variant GLBs", file_count="multiple", elem_id="variant-files")
            with gr.Column(scale=3):
                model3d = gr.Model3D(str(store.empty_glb), label="Mesh", camera_position=(90, 75, None), height=440,
                                     clear_color=(0.96, 0.96, 0.97, 1.0), interactive=False, elem_id="model3d")
                with gr.Row():
                    downloads = [LinkDownloadButton(f"Download {fmt.upper()}{' (zip)' if fmt in ARCHIVED else ''}",
                                                    size="sm", elem_id=f"download-{fmt}") for fmt in DOWNLOADS]
                link = gr.Textbox(label="Link to this result", buttons=["copy"], interactive=False, elem_id="share-link",
                                  placeholder="Generate something to get a link.")
                info = gr.JSON(label="Details", elem_id="details")
        history = gr.BrowserState({"version": 1, "entries": []}, **HISTORY_STORAGE)
        with gr.Accordion("History (this browser)", open=True):
            history_gallery = gr.Gallery(label="Your results, newest first (click one to open it)", columns=8,
                                         height=170, fit_columns=False, object_fit="contain", elem_id="history",
                                         allow_preview=False)
            clear = gr.Button("Clear history", size="sm", elem_id="clear-history")
        examples = gr.Examples([[p] for p in load_examples()], [prompt], examples_per_page=16,
                               label="Examples (from the authors' talk)")

        result, chosen_variants, link_trigger = gr.State(None), gr.State([]), gr.State(None)
        timer = gr.Timer(2.0, active=not loader.wait(0))  # refreshes the status while the weights load
        timer.tick(lambda: (loader.status(), gr.Timer(active=not loader.wait(0))), None, [status, timer],
                   api_visibility="private", show_progress="hidden")

        inputs = [prompt, seed, randomize, resolution, floaters, simplify, faces, texture]
        outputs = [model3d, info, seed, *downloads, link, result]
        opened = [*outputs, prompt, randomize, resolution, floaters, simplify, faces, texture]
        # One GPU: its events queue in Gradio (real positions); progress on the details, so that the
        # viewer stays uncovered and draws the vertex-coloured first look while the texture bakes.
        gpu = dict(concurrency_limit=1, concurrency_id=GPU_GROUP, show_progress_on=[info])
        private = dict(api_visibility="private")
        remember = dict(fn=handlers.remember, inputs=[result, history], outputs=[history, history_gallery], **private)
        gr.on([button.click, prompt.submit, link_trigger.change], handlers.generate, inputs, outputs,
              api_name="generate", preprocess=False, validator=handlers.validate_generate, **gpu).success(**remember)
        examples.load_input_event.then(handlers.generate_example, [prompt], outputs, validator=handlers.validate_example,
                                       **gpu, **private).success(**remember)
        variants_button.click(handlers.variants, [prompt, seed, count, resolution],
                              [variants_gallery, variant_files, chosen_variants], api_name="variants", preprocess=False,
                              validator=handlers.validate_variants, concurrency_limit=1, concurrency_id=GPU_GROUP)
        variants_gallery.select(handlers.pick_variant, [chosen_variants], opened, validator=handlers.validate_pick,
                                **gpu, **private).success(**remember)
        history_gallery.select(handlers.pick_history, [history], opened, validator=handlers.validate_pick,
                               **gpu, **private).success(**remember)
        clear.click(handlers.clear_history, None, [history, history_gallery], **private)
        demo.load(handlers.on_load, None, [status, *inputs, link_trigger], **private)
        demo.load(handlers.history_gallery, [history], [history_gallery], **private)
        Tools(handlers).wire(demo)  # the MCP tools (also gradio_client endpoints): launch() then offer_tools()
    # The queue is bounded per request by the validators (max_queue waiting for the GPU), not by
    # Gradio's max_size, which would also turn away stored results.
    demo.queue(max_size=None, default_concurrency_limit=None)
    handlers.demo = demo
    demo.download_routes = download_routes(store)  # added to Gradio's FastAPI app at launch (launch_kwargs)
    return demo


def launch_kwargs(demo: gr.Blocks | None = None, mcp: bool = True) -> dict:
    """launch() arguments shared by main() and the tests: with a ``demo`` of ``build_demo``, its own
    routes too (the downloads written on first request); ``mcp``: also serve MCP at /gradio_api/mcp/."""
    return dict(app_kwargs={"routes": getattr(demo, "download_routes", [])},
                ssr_mode=False, theme=gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"],
                                                      font_mono=["ui-monospace", "monospace"]),
                mcp_server=mcp, css_paths=[ASSETS / "style.css"], footer_links=["api", "gradio", "settings"],
                max_threads=64,  # quick handlers (lookups, validators, history) for a crowd; the GPU runs one
                state_session_capacity=SESSION_CAPACITY)


def main(argv=None) -> None:
    args = parse_args(argv)
    keep_large_arrays_out_of_the_heap()  # before the model's arrays: RSS flat over weeks (web/memory.py)
    zero_gpu = on_zero_gpu()
    device = pick_device(args.device, zero_gpu)
    if device.startswith("cuda") and not zero_gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"--device {device}: CUDA is not available here (use --device cpu)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:  # the output folder first: refusing it must not wait for gigabytes of weights
        ResultStore(args.output_dir)
    except OutputFolderError as exc:
        raise SystemExit(f"error: {exc}") from None
    loader, bake_fields = make_loader(args.tiny, device, zero_gpu)
    logging.getLogger("triplane_turbo.app").info(loader.describe)
    demo = build_demo(loader, args.output_dir, tiny=args.tiny, max_bytes=args.max_output_gb * 1e9,
                      max_age_s=args.max_output_age_hours * 3600, bake_fields=bake_fields, max_queue=args.max_queue,
                      max_waiting_per_client=args.max_waiting_per_client, texture_size=args.texture_size)
    if trust_space_proxy():  # before launch(): uvicorn reads it then
        logging.getLogger("triplane_turbo.app").info("on a Space: client addresses from X-Forwarded-For of %s",
                                                     os.environ["FORWARDED_ALLOW_IPS"])
    freeze_startup_objects()  # cheap garbage collections after each generation (web/memory.py)
    demo.launch(share=args.share, prevent_thread_lock=True, **launch_kwargs(demo, mcp=args.mcp))
    offer_tools(demo)
    demo.block_thread()


if __name__ == "__main__":
    main()
