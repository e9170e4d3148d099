#!/usr/bin/env python
"""The app's time from a request to the textured mesh shown, per stage, on the tiny model.

Calls the app's own handler (``Handlers.generate``, as a click on Generate runs it, without the web
server) with a fresh seed each run and times its two updates: the vertex-coloured first look and the
textured mesh with its downloads. The stages are the record's timings (the networks' stages, the
texture bake, ``export``: what the store writes before the result is shown) and ``other`` (the
preview render, the handler, the rest). Then each download format that the store writes on demand is
asked for once and timed (``on demand``: what a visitor's first click on that button costs).

    python bench/app_stages.py --runs 5 [--record BENCHMARKS.md --note "..."]

The networks are the tiny random model, so their stages are small; the texture, export and preview are
the real code at the real sizes (a 160-grid mesh, a 1024² texture by default).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path and os.environ.get("BENCH_USE_PATH") != "1":  # run from a checkout
    sys.path.insert(0, str(REPO))

from bench import tables  # noqa: E402

NETWORK_STAGES = ("text", "denoise", "decode", "fields", "isosurface", "color")
TABLE = "## The app: request to textured mesh shown"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python bench/app_stages.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed generations (fresh seeds), after one warm-up")
    parser.add_argument("--resolution", type=int, default=160)
    parser.add_argument("--texture-size", type=int, default=None, help="default: the app's")
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--record", type=Path, help="append a row to this BENCHMARKS.md")
    parser.add_argument("--note", default="")
    return parser.parse_args(argv)


def run(args) -> dict:
    import torch

    from triplane_turbo.web import GenerationService, Handlers, ResultStore, make_loader
    from triplane_turbo.web import store as store_module
    from triplane_turbo.web.settings import DEFAULT_TEXTURE_SIZE

    texture_size = args.texture_size or DEFAULT_TEXTURE_SIZE
    loader, bake_fields = make_loader(True, "cpu")
    loader.wait(600)
    store = ResultStore(Path(tempfile.mkdtemp(prefix="app-stages-")) / "outputs")
    handlers = Handlers(GenerationService(loader, store, bake_fields=bake_fields, texture_size=texture_size))
    lazy_formats = [f for f in getattr(store_module, "DOWNLOADS", ()) if f not in getattr(store, "EAGER", ("glb",))]
    rows = []
    for i in range(args.runs + 1):
        start = time.perf_counter()
        first_look = None
        updates = handlers.generate("a frog wearing a sweater", 1000 + i, False, args.resolution,
                                    progress=lambda *a, **k: None)
        for outputs in updates:
            if first_look is None:
                first_look = time.perf_counter() - start
        shown = time.perf_counter() - start
        info = outputs[1]
        timings = dict(info["timings"])
        row = {"first_look": first_look, "shown": shown, "faces": info["faces"], "vertices": info["vertices"],
               **{stage: timings.get(stage, 0.0) for stage in (*NETWORK_STAGES, "texture", "export")}}
        row["other"] = shown - sum(row[s] for s in (*NETWORK_STAGES, "texture", "export"))
        key = _key_of(info, store)
        row["written"] = sorted(p.name.removeprefix(f"triplaneturbo-{key[:12]}")
                                for p in (store.root / "files" / key).iterdir())
        for fmt in lazy_formats:  # the first click on each other download
            began = time.perf_counter()
            store.download(key, fmt)
            row[f"on demand {fmt}"] = time.perf_counter() - began
        if i:  # the first run warms up
            rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    keys = [k for k in rows[0] if isinstance(rows[0][k], float)]
    return {"date": datetime.date.today().isoformat(), "commit": tables.commit(), "machine": _machine(),
            "threads": torch.get_num_threads(), "resolution": args.resolution, "texture_size": texture_size,
            "runs": len(rows), "median": {k: statistics.median(r[k] for r in rows) for k in keys},
            "mesh": [rows[0]["vertices"], rows[0]["faces"]], "written before shown": rows[0]["written"],
            "lazy formats": lazy_formats}


def _key_of(info: dict, store) -> str:
    (folder,) = [p.parent.name for p in store.root.glob(f"files/*/{info['files']['glb']}")]
    return folder


def _machine() -> str:
    """The CPU (``bench.tables.machine``) and whether it has AVX-512."""
    try:
        avx512 = "avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        avx512 = False
    return f"{tables.machine('cpu')}, {'AVX-512' if avx512 else 'no AVX-512'}"


INTRO = ("`python bench/app_stages.py --runs 5 --record BENCHMARKS.md`: the app's handler on the tiny model (CPU), a "
         "fresh seed per run; medians in seconds. *first look*: the vertex-coloured mesh shown; *shown*: the textured "
         "mesh and its downloads shown; *stages*: networks (all six stages of the tiny model) / texture bake / export "
         "(what the store writes before the result is shown) / other (preview render, handler); *written*: the "
         "entry's files when it is shown; *on demand*: seconds to write each other download on its first request.")
HEADER = ("| date | commit | machine | grid, texture | first look s | shown s | stages s (networks / texture / export / "
          "other) | written before shown | on demand s | mesh V / F | runs (warm-up) | note |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def table_row(result: dict, note: str) -> list[str]:
    m = result["median"]
    network = sum(m[s] for s in NETWORK_STAGES)
    lazy = " / ".join(f"{f} {m[f'on demand {f}']:.2f}" for f in result["lazy formats"]) or "–"
    return [result["date"], str(result["commit"]), result["machine"], f"{result['resolution']}, {result['texture_size']}²",
            f"{m['first_look']:.2f}", f"{m['shown']:.2f}",
            f"{network:.2f} / {m['texture']:.2f} / {m['export']:.2f} / {m['other']:.2f}",
            ", ".join(result["written before shown"]), lazy, f"{result['mesh'][0]} / {result['mesh'][1]}",
            f"{result['runs']} (1)", note]


def record(path: Path, result: dict, note: str) -> None:
    tables.add_rows(path, TABLE, INTRO, HEADER, [table_row(result, note)])


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=1))
    print("| " + " | ".join(table_row(result, args.note)) + " |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1), encoding="utf-8")
    if args.record:
        record(args.record, result, args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
