"""TriplaneTurbo web app: a thin Gradio UI over ``triplane_turbo`` (text -> textured mesh).

    python app.py           # the published weights (fetched once from the Hugging Face Hub)
    python app.py --tiny    # offline, on a tiny random model (the shapes are meaningless)

Options: --output-dir (env TRIPLANE_TURBO_OUTPUT_DIR, default ./outputs), --device, --share,
--max-output-gb, --max-output-age-hours; GRADIO_SERVER_NAME and GRADIO_SERVER_PORT are honoured.
Tests build the UI without launching it: ``build_demo(pipeline_or_loader, output_dir)``.
"""

from __future__ import annotations

try:  # ZeroGPU needs `spaces` imported before torch initialises CUDA.
    import spaces
except ImportError:  # optional outside Hugging Face Spaces
    spaces = None

import argparse
import logging
import os
import secrets
import time
import unicodedata
import warnings
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import gradio as gr
import torch

from triplane_turbo.config import MAX_SEED
from triplane_turbo.app_support import ModelLoader, ModelNotReadyError, ResultStore
from triplane_turbo.export import FORMATS
from triplane_turbo.pipeline import PromptTruncatedWarning, default_dtype

logger = logging.getLogger("triplane_turbo.app")

ASSETS = Path(__file__).resolve().parent / "assets"
PAPER_URL = "https://arxiv.org/abs/2503.21694"
CODE_URL = "https://github.com/theEricMa/TriplaneTurbo"
REPO_URL = os.environ.get("TRIPLANE_TURBO_REPO_URL", "")  # this project's public page, once it has one
RESOLUTIONS = (128, 160, 256, 384)
DEFAULT_RESOLUTION = 160
MAX_PROMPT_CHARS = 1000
RANDOM_SEED_LIMIT = 2**32  # seeds the app draws stay exact in the browser's float64 numbers
EXAMPLE_SEED = 0
FACES_RANGE = (1_000, 1_000_000)
DEFAULT_FACES = 20_000
FLOATER_FRACTION = 0.05  # parts smaller than 5% of the largest one are "floaters"
QUEUE_SIZE = 64
GPU_SECONDS = {128: 20, 160: 25, 256: 40, 384: 60}
TINY_BANNER = ("**Offline demo on a tiny random model:** the shapes are meaningless blobs. "
               "Use it to try the interface; run `python app.py` for the real TriplaneTurbo weights.")
EMPTY_SURFACE = "The model produced no surface for this seed; try another seed or prompt."


def stage_labels(num_steps: int) -> dict[str, str]:
    """Progress stages in order (the pipeline's callback names, then export) and what each one does."""
    denoise = {f"denoise {i}": f"Denoising, step {i}/{num_steps}" for i in range(1, num_steps + 1)}
    return {"text": "Encoding the prompt", **denoise,
            "decode": "Decoding the triplane", "fields": "Evaluating the fields", "isosurface": "Marching cubes",
            "color": "Colouring the vertices", "export": "Exporting GLB, OBJ, PLY and STL"}


def load_examples(path: Path = ASSETS / "examples.txt") -> list[str]:
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


# ---------------------------------------------------------------------------------------------
# Input checks: every bad value from the page or the API becomes a clear gr.Error
# ---------------------------------------------------------------------------------------------
def clean_prompt(prompt) -> tuple[str, list[str]]:
    """The prompt with control characters removed and whitespace collapsed, plus warnings."""
    if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
        raise gr.Error("The prompt is empty: describe an object, e.g. 'a frog wearing a sweater'.")
    if not isinstance(prompt, str):
        raise gr.Error(f"The prompt must be text, got {type(prompt).__name__}.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise gr.Error(f"The prompt is {len(prompt)} characters long; the limit is {MAX_PROMPT_CHARS}. "
                       "Only the first ~75 words reach the model anyway.")
    whitespace = {"\t", "\n", "\r", "\v", "\f"}
    kept = [" " if c in whitespace else c for c in prompt
            if c in whitespace or unicodedata.category(c) not in ("Cc", "Cs")]  # controls, lone surrogates
    notes = []
    if removed := len(prompt) - len(kept):
        notes.append(f"Removed {removed} control character{'s' * (removed > 1)} from the prompt.")
    text = " ".join("".join(kept).split())
    if not text:
        raise gr.Error("The prompt is empty once control characters are removed: describe an object.")
    return text, notes


def _whole_number(value, name: str) -> int:
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise gr.Error(f"{name} must be a whole number, got {value!r:.40}.")
    return value


def _flag(value, name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise gr.Error(f"{name} must be true or false, got {value!r:.40}.")
    return value


def pick_seed(seed, randomize) -> int:
    if _flag(randomize, "randomize_seed"):
        return secrets.randbelow(RANDOM_SEED_LIMIT)
    if seed is None or seed == "":
        raise gr.Error("Enter a seed, or tick 'Randomize seed'.")
    seed = _whole_number(seed, "The seed")
    if not 0 <= seed <= MAX_SEED:
        raise gr.Error(f"The seed must be between 0 and {MAX_SEED}, got {seed}.")
    return seed


def check_resolution(value) -> int:
    try:
        value = _whole_number(value, "mesh_resolution")
    except gr.Error:
        value = None
    if value not in RESOLUTIONS:
        raise gr.Error(f"mesh_resolution must be one of {', '.join(map(str, RESOLUTIONS))}.")
    return value


def check_faces(value) -> int:
    value = _whole_number(value, "target_faces")
    if not FACES_RANGE[0] <= value <= FACES_RANGE[1]:
        raise gr.Error(f"target_faces must be between {FACES_RANGE[0]} and {FACES_RANGE[1]}, got {value}.")
    return value


def page_url(request: gr.Request | None) -> str:
    """The app's public address for a request: the page itself for a browser, else the host."""
    if request is None:
        return ""
    headers = request.headers
    if referer := headers.get("referer"):
        parts = urlsplit(referer)
        return f"{parts.scheme}://{parts.netloc}{parts.path}"
    host = headers.get("x-forwarded-host") or headers.get("host", "localhost")
    proto = headers.get("x-forwarded-proto") or request.url.scheme
    return f"{proto}://{host}{request.url.path.split('/gradio_api')[0].rstrip('/')}/"


def share_link(request, settings: dict) -> str:
    params = {"prompt": settings["prompt"], "seed": settings["seed"], "resolution": settings["mesh_resolution"]}
    if settings["remove_floaters"]:
        params["floaters"] = 1
    if settings["target_faces"]:
        params["faces"] = settings["target_faces"]
    return f"{page_url(request)}?{urlencode(params)}"


# ---------------------------------------------------------------------------------------------
# Event handlers
# ---------------------------------------------------------------------------------------------
def _gpu_seconds(prompt, seed, resolution, *args, **kwargs) -> int:
    return GPU_SECONDS.get(resolution, 60)


def _on_gpu(fn):
    return spaces.GPU(duration=_gpu_seconds)(fn) if spaces is not None else fn


class TriplaneTurboApp:
    def __init__(self, loader: ModelLoader, store: ResultStore, device: str | None = None):
        self.loader, self.store, self.device = loader, store, device
        self.run_on_device = _on_gpu(self._run_on_device)  # one generation = one GPU call

    def _target_device(self) -> torch.device:
        wanted = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if wanted.type == "cuda" and wanted.index is None:
            wanted = torch.device("cuda", torch.cuda.current_device())
        return wanted

    def _pipe(self):
        try:
            return self.loader.get()
        except ModelNotReadyError as exc:
            raise gr.Error(str(exc), title="Model not ready") from None

    def _run_on_device(self, prompt: str, seed: int, resolution: int, floaters: bool, faces: int | None, progress):
        pipe, device = self._pipe(), self._target_device()
        stages = stage_labels(pipe.config.num_steps)

        def report(stage: str, step: int, total: int) -> None:
            key = f"denoise {step}" if stage == "denoise" else stage
            if key in stages:
                done = list(stages).index(key) + 1
                progress((done, len(stages)), desc=list(stages.values())[done])

        progress((0, len(stages)), desc=stages["text"])
        try:
            dtype = default_dtype(device)  # weights load on the CPU in float32; CUDA runs in float16
            if pipe.device != device or pipe.dtype != dtype:
                pipe.to(device, dtype)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = pipe(prompt, seed=seed, mesh_resolution=resolution, callback=report,
                           remove_floaters_below=FLOATER_FRACTION if floaters else None, target_faces=faces)
        except torch.cuda.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise gr.Error("The GPU ran out of memory. Try a lower mesh resolution, or again in a moment.") from None
        notes = [str(w.message) for w in caught if issubclass(w.category, PromptTruncatedWarning)]
        name = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)
        return out.meshes[0], dict(out.timings), name, notes

    def generate(self, prompt, seed, randomize_seed, mesh_resolution, remove_floaters=False, simplify=False,
                 target_faces=DEFAULT_FACES, request: gr.Request = None, progress=gr.Progress()):
        """Text to a textured mesh: returns the GLB, the details, the seed used, the GLB/OBJ/PLY/STL files
        and a link that reproduces the result."""
        started = time.perf_counter()
        text, notes = clean_prompt(prompt)
        settings = dict(prompt=text, seed=pick_seed(seed, randomize_seed),
                        mesh_resolution=check_resolution(mesh_resolution),
                        remove_floaters=_flag(remove_floaters, "remove_floaters"),
                        target_faces=check_faces(target_faces) if _flag(simplify, "simplify") else None)
        pipe = self._pipe()
        key = ResultStore.key(**settings, revision=pipe.revision)
        meta = self.store.load(key)
        cached = meta is not None
        try:
            if not cached:
                mesh, timings, device, truncated = self.run_on_device(
                    text, settings["seed"], settings["mesh_resolution"], settings["remove_floaters"],
                    settings["target_faces"], progress)
                if len(mesh.faces) == 0:
                    raise gr.Error(EMPTY_SURFACE)
                stages = stage_labels(pipe.config.num_steps)
                progress((len(stages) - 1, len(stages)), desc=stages["export"])
                meta = {**settings, "vertices": len(mesh.vertices), "faces": len(mesh.faces), "device": device,
                        "model_revision": pipe.revision, "timings": timings}
                if truncated:
                    meta["warnings"] = truncated
                self.store.save(key, mesh, meta)
            self.store.enforce_limits(keep=key)
        except gr.Error:
            raise
        except Exception as exc:
            logger.exception("generation failed")
            raise gr.Error(f"Generation failed ({type(exc).__name__}); the server log has the details.") from exc
        for note in notes + meta.get("warnings", []):
            gr.Warning(note)
        files = {fmt: str(path) for fmt, path in self.store.files(key).items()}
        info = {**meta, "timings": {k: round(v, 3) for k, v in meta["timings"].items()}, "cached": cached,
                "files": {fmt: Path(path).name for fmt, path in files.items()},
                "total_seconds": round(time.perf_counter() - started, 3)}
        return (files["glb"], info, settings["seed"], files["glb"], files["obj"], files["ply"], files["stl"],
                share_link(request, settings))

    def on_load(self, request: gr.Request):
        """Model status; with ?prompt=…&seed=…&resolution=… fills the inputs and starts a generation."""
        query = dict(request.query_params) if request is not None else {}
        if not query.get("prompt", "").strip():
            return self.loader.status(), *[gr.skip()] * 8
        seed, randomize = gr.skip(), True
        if "seed" in query:
            try:
                seed, randomize = _whole_number(query["seed"], "seed"), False
            except gr.Error:
                gr.Warning(f"The link's seed {query['seed']!r:.30} is not a whole number; using a random seed.")
        try:
            resolution = check_resolution(query.get("resolution", DEFAULT_RESOLUTION))
        except gr.Error:
            gr.Warning(f"The link's resolution is not one of {RESOLUTIONS}; using {DEFAULT_RESOLUTION}.")
            resolution = DEFAULT_RESOLUTION
        faces = query.get("faces", "")
        simplify = faces.isdigit()
        return (self.loader.status(), query["prompt"], seed, randomize, resolution,
                query.get("floaters", "") in ("1", "true"), simplify, int(faces) if simplify else gr.skip(),
                time.time_ns())


def on_zero_gpu() -> bool:
    return bool(getattr(getattr(getattr(spaces, "config", None), "Config", None), "zero_gpu", False))


def speed_note(tiny: bool, device: str | None) -> str:
    if on_zero_gpu() or (device != "cpu" and torch.cuda.is_available()):
        return "Running on a GPU: a generation takes about a second (plus any wait in the queue)."
    if tiny:
        return "Running on CPU: about 1–3 s per model (the tiny demo model)."
    return ("Running on CPU: one model takes minutes here (about 1.5 min on a 2-core server CPU; "
            "about a second on a GPU). Progress is shown while it works.")


def build_demo(model, output_dir, *, tiny: bool | None = None, device: str | None = None,
               max_bytes: float = 2e9, max_age_s: float = 86400.0) -> gr.Blocks:
    """The app's Blocks, queued but not launched; ``model`` is a pipeline or a ``ModelLoader``."""
    loader = model if isinstance(model, ModelLoader) else ModelLoader.loaded(model)
    if tiny is None:
        tiny = loader.pipe is not None and loader.pipe.revision == "tiny"
    store = ResultStore(output_dir, max_bytes, max_age_s)
    store.enforce_limits()
    app = TriplaneTurboApp(loader, store, device)
    gr.set_static_paths([store.root])  # results are served from the output folder, not copied

    with gr.Blocks(title="TriplaneTurbo: instant text-to-mesh") as demo:
        repo = f" · [this app's code]({REPO_URL})" if REPO_URL else ""
        gr.Markdown("# TriplaneTurbo: instant text-to-mesh\nType a description and get a textured 3D mesh in about "
                    f"a second on a GPU. [Paper (arXiv 2503.21694)]({PAPER_URL}) · [Authors' code]({CODE_URL}){repo}")
        if tiny:
            gr.Markdown(TINY_BANNER, elem_id="tiny-banner")
        gr.Markdown(speed_note(tiny, device), elem_id="speed-note")
        status = gr.Markdown(loader.status(), elem_id="model-status")
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", placeholder="a frog wearing a sweater", max_lines=1,
                                    elem_id="prompt")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=EXAMPLE_SEED, precision=0, elem_id="seed")
                    randomize = gr.Checkbox(label="Randomize seed", value=True, elem_id="randomize")
                with gr.Accordion("Advanced", open=False):
                    resolution = gr.Dropdown(list(RESOLUTIONS), value=DEFAULT_RESOLUTION, label="Mesh resolution",
                                             info="Marching-cubes grid per axis: finer meshes take longer.")
                    floaters = gr.Checkbox(label="Remove small floating parts", value=False)
                    with gr.Row():
                        simplify = gr.Checkbox(label="Simplify to a target face count", value=False)
                        faces = gr.Number(label="Target faces", value=DEFAULT_FACES, precision=0)
                examples = gr.Examples([[p, EXAMPLE_SEED, False] for p in load_examples()], [prompt, seed, randomize],
                                       visible_columns=[0], examples_per_page=16, cache_examples=False,
                                       api_visibility="private", label="Examples (from the authors' talk)")
            with gr.Column(scale=3):
                model3d = gr.Model3D(label="Mesh", camera_position=(90, 75, None), clear_color=(0.96, 0.96, 0.97, 1.0),
                                     height=440, interactive=False, elem_id="model3d")
                with gr.Row():
                    downloads = [gr.DownloadButton(f"Download {fmt.upper()}", size="sm", elem_id=f"download-{fmt}")
                                 for fmt in FORMATS]
                link = gr.Textbox(label="Link to this result", buttons=["copy"], interactive=False,
                                  elem_id="share-link", placeholder="Generate something to get a link.")
                info = gr.JSON(label="Details", elem_id="details")
        link_trigger = gr.State(None)
        timer = gr.Timer(2.0, active=not loader.wait(0))  # refreshes the status while weights load
        timer.tick(lambda: (loader.status(), gr.Timer(active=not loader.wait(0))), None, [status, timer],
                   api_visibility="private", show_progress="hidden")

        inputs = [prompt, seed, randomize, resolution, floaters, simplify, faces]
        outputs = [model3d, info, seed, *downloads, link]
        gpu = dict(fn=app.generate, inputs=inputs, outputs=outputs, preprocess=False, show_progress_on=[model3d],
                   concurrency_id="gpu", concurrency_limit=1)
        gr.on([button.click, prompt.submit, link_trigger.change], api_name="generate", **gpu)
        examples.load_input_event.then(api_visibility="private", **gpu)
        demo.load(app.on_load, None, [status, *inputs, link_trigger], api_visibility="private")
    demo.queue(max_size=QUEUE_SIZE)
    return demo


def launch_kwargs(output_dir) -> dict:
    """launch() arguments shared by main() and the tests: only the output folder is served."""
    return dict(allowed_paths=[str(Path(output_dir).expanduser().resolve())], ssr_mode=False,
                theme=gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"],
                                     font_mono=["ui-monospace", "monospace"]),
                css_paths=[ASSETS / "style.css"], footer_links=["api", "gradio", "settings"])


def parse_args(argv=None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description="TriplaneTurbo web app (Gradio).")
    parser.add_argument("--tiny", action="store_true", default=env("TRIPLANE_TURBO_TINY", "") in ("1", "true"),
                        help="offline demo on a tiny random model (env TRIPLANE_TURBO_TINY=1)")
    parser.add_argument("--output-dir", default=env("TRIPLANE_TURBO_OUTPUT_DIR", "outputs"),
                        help="where results are kept (env TRIPLANE_TURBO_OUTPUT_DIR, default ./outputs)")
    parser.add_argument("--device", default=env("TRIPLANE_TURBO_DEVICE"),
                        help="cuda, cuda:1 or cpu (default: CUDA when available)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--max-output-gb", type=float, default=float(env("TRIPLANE_TURBO_OUTPUT_MAX_GB", 2)),
                        help="evict the oldest results above this size (default 2)")
    parser.add_argument("--max-output-age-hours", type=float, default=float(env("TRIPLANE_TURBO_OUTPUT_MAX_AGE_H", 24)),
                        help="evict results older than this (default 24)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if (args.device or "").startswith("cuda") and not (torch.cuda.is_available() or on_zero_gpu()):
        raise SystemExit(f"--device {args.device}: CUDA is not available here (use --device cpu)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.tiny:
        from triplane_turbo.tiny import tiny_pipeline as factory

        loading = "Building the tiny offline model…"
    else:
        from triplane_turbo import TriplaneTurboPipeline

        factory = TriplaneTurboPipeline.from_pretrained  # on the CPU; moved to the GPU per generation
        loading = ("Loading the model weights… The first start downloads about 5.3 GB from the Hugging Face Hub "
                   "(Stable Diffusion 2.1-base and the TriplaneTurbo adapter); later starts use the cache.")
    logger.info(loading)
    demo = build_demo(ModelLoader(factory, loading_message=loading), args.output_dir, tiny=args.tiny, device=args.device,
                      max_bytes=args.max_output_gb * 1e9, max_age_s=args.max_output_age_hours * 3600)
    demo.launch(share=args.share, **launch_kwargs(args.output_dir))


if __name__ == "__main__":
    main()
