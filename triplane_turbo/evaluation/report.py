"""The evaluation's outputs: ``metrics.json``, ``metrics.md``, ``contact_sheet.png``, and the comparison of
two runs (``compare.md``, ``compare.png``). Pictures are drawn with Pillow alone (no plotting library)."""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..fileio import write_atomic

METRICS_JSON, METRICS_MD, CONTACT_SHEET = "metrics.json", "metrics.md", "contact_sheet.png"
TIES = ("a view's rank is the number of unique texts whose score w·max(cos, 0) is at least its own "
        "text's, so a tie counts as a miss; no ordering of the prompts enters the metrics")
#: With ``authors_precision``: the authors' float16 arithmetic and argmax (clip.authors_float16_metrics).
AUTHORS_TIES = ("float16 arithmetic as the authors' script; a view's rank counts the texts scoring higher and "
                "the equal ones earlier in line order (argmax's rule; theirs orders texts by a Python set)")


# -------------------------------------------------------------------------------------------------
# One run
# -------------------------------------------------------------------------------------------------

def build_metrics(jobs, lost, scored, texts, settings, pipe, clip, out_dir: Path, views_dir: Path,
                  timing: dict) -> dict:
    """The content of ``metrics.json``, from what ``run.evaluate_pipeline`` computed.

    Args:
        jobs: the evaluated ``PromptJob`` in line order; view k of job i is row ``i·V + k`` of ``scored``.
        lost: the ``PromptLine`` left out by ``settings.drop_apostrophes``.
        scored: ``clip.ClipMetrics`` of all views against ``texts`` (the unique texts).
    """
    views = settings.views
    first_line: dict[str, int] = {}
    for job in jobs:
        first_line.setdefault(job.text, job.line.line)
    prompts = []
    for i, job in enumerate(jobs):
        view_rows = []
        for k, azimuth in enumerate(settings.azimuths()):
            r = i * views + k
            image = views_dir / f"{Path(job.mesh).stem}_{k}.png" if job.mesh else None
            view_rows.append({"azimuth": azimuth, "image": image.relative_to(out_dir).as_posix() if image else None,
                              "clip_score": float(scored.scores[r]) * 100,
                              "cosine": float(scored.cosine[r, scored.targets[r]]), "rank": int(scored.ranks[r]),
                              "top1_line": first_line[texts[int(scored.top1[r])]]})
        ranks = np.array([v["rank"] for v in view_rows])
        prompts.append({"line": job.line.line, "prompt": job.line.prompt, "text": job.text, "seed": job.seed,
                        "mesh": f"meshes/{job.mesh}" if job.mesh else None, "error": job.error,
                        "generate_seconds": job.seconds,
                        "clip_score": float(np.mean([v["clip_score"] for v in view_rows])),
                        "r_at_1": float((ranks <= 1).mean() * 100), "r_at_5": float((ranks <= 5).mean() * 100),
                        "views": view_rows})
    generator = {"revision": getattr(pipe, "revision", None),
                 "num_steps": getattr(getattr(pipe, "config", None), "num_steps", None),
                 "device": str(getattr(pipe, "device", "")),
                 "dtype": str(getattr(pipe, "dtype", "")).removeprefix("torch.")}
    return {"clip_score": scored.clip_score, "r_at_1": scored.recall[1], "r_at_5": scored.recall[5],
            "prompts_evaluated": len(jobs), "views_scored": len(jobs) * views, "unique_texts": len(texts),
            "failed_lines": [job.line.line for job in jobs if job.mesh is None],
            "dropped": [{"line": item.line, "prompt": item.prompt} for item in lost],
            "settings": settings.to_dict(), "azimuths": settings.azimuths(), "generator": generator,
            "clip": {"model": clip.name, "revision": clip.revision, "device": str(clip.device),
                     "dtype": str(clip.dtype).removeprefix("torch.")},
            "definitions": {"clip_score": f"mean over all views of {settings.score_weight}·max(cos, 0), ×100",
                            "r_at_k": "percent of views whose own prompt's text ranks ≤ k among the unique texts",
                            "ties": AUTHORS_TIES if settings.authors_precision else TIES},
            "timing": timing, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "prompts": prompts}


def _cell(text: str) -> str:
    """Text for a markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def markdown(metrics: dict) -> str:
    """``metrics.md``: the summary row, what produced it, and one row per prompt."""
    s, g, c = metrics["settings"], metrics["generator"], metrics["clip"]
    lines = [f"# Evaluation: C.S. {metrics['clip_score']:.2f} · R@1 {metrics['r_at_1']:.2f} · "
             f"R@5 {metrics['r_at_5']:.2f}", "",
             "| C.S. | R@1 | R@5 | prompts | views | unique texts | failed | dropped |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| {metrics['clip_score']:.2f} | {metrics['r_at_1']:.2f} | {metrics['r_at_5']:.2f} | "
             f"{metrics['prompts_evaluated']} | {metrics['views_scored']} | {metrics['unique_texts']} | "
             f"{len(metrics['failed_lines'])} | {len(metrics['dropped'])} |", "",
             f"Generator: revision `{g['revision']}`, {g['num_steps']} steps, {g['dtype']} on {g['device']}. "
             f"CLIP: `{c['model']}` @ `{c['revision']}`, {c['dtype']} on {c['device']}.",
             f"Settings: seed {s['seed']} (line n: seed + n − 1), marching cubes at {s['mesh_resolution']}, "
             f"texture {s['texture']}, {s['views']} views of {s['image_size']}² at azimuths "
             f"{', '.join(map(str, metrics['azimuths']))}, {s['elevation']:g}° above the horizon, radius "
             f"{s['radius']:g}, vertical fov {s['fov']:g}°; text `{s['text_template']}`"
             f"{' (commas and periods stripped)' if s['strip_punctuation'] else ''}"
             f"{'; prompts with an apostrophe dropped' if s['drop_apostrophes'] else ''}.",
             f"C.S.: {metrics['definitions']['clip_score']}. R@k: {metrics['definitions']['r_at_k']}; "
             f"{metrics['definitions']['ties']}.", ""]
    if metrics["failed_lines"]:
        lines += [f"Failed (no mesh; scored as blank white views): lines "
                  f"{', '.join(map(str, metrics['failed_lines']))}.", ""]
    if metrics["dropped"]:
        lines += ["Dropped (as the authors' run): " + "; ".join(f"line {d['line']}: {_cell(d['prompt'])}"
                                                             for d in metrics["dropped"]), ""]
    lines += ["## Per prompt", "", "| line | prompt | C.S. | R@1 | R@5 | top-1 line per view |",
              "|---:|---|---:|---:|---:|---|"]
    for p in metrics["prompts"]:
        lines.append(f"| {p['line']} | {_cell(p['prompt'])} | {p['clip_score']:.2f} | {p['r_at_1']:.0f} | "
                     f"{p['r_at_5']:.0f} | {', '.join(str(v['top1_line']) for v in p['views'])} |")
    return "\n".join(lines) + "\n"


def _font(size: int = 11):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _latin1(text: str) -> str:
    """The default fonts cover Latin-1 only."""
    return text.encode("latin-1", errors="replace").decode("latin-1")


def contact_sheet(metrics: dict, out_dir: Path, thumb: int = 128, per_row: int = 4) -> bytes:
    """Every view, small: one cell per prompt (its views side by side, captioned with its line,
    scores and prompt), ``per_row`` cells per row. Returns PNG bytes."""
    from PIL import Image, ImageDraw

    prompts = metrics["prompts"]
    views = metrics["settings"]["views"]
    thumb = min(thumb, metrics["settings"]["image_size"])
    caption, gap = 30, 8
    cell_w, cell_h = views * thumb, thumb + caption
    columns = max(1, min(per_row, len(prompts)))
    rows = max(1, math.ceil(len(prompts) / columns))
    sheet = Image.new("RGB", (columns * cell_w + (columns + 1) * gap, rows * cell_h + (rows + 1) * gap),
                      (228, 228, 232))
    draw, font = ImageDraw.Draw(sheet), _font()
    for i, prompt in enumerate(prompts):
        x0 = gap + (i % columns) * (cell_w + gap)
        y0 = gap + (i // columns) * (cell_h + gap)
        for k, view in enumerate(prompt["views"]):
            if view["image"]:
                with Image.open(out_dir / view["image"]) as image:
                    tile = image.convert("RGB").resize((thumb, thumb), Image.LANCZOS)
            else:
                tile = Image.new("RGB", (thumb, thumb), (255, 255, 255))
            sheet.paste(tile, (x0 + k * thumb, y0))
        hits = sum(v["rank"] <= 1 for v in prompt["views"])
        head = f"#{prompt['line']}  C.S. {prompt['clip_score']:.1f}  R@1 {hits}/{views}" + \
            ("  (no mesh)" if prompt["mesh"] is None else "")
        draw.text((x0 + 2, y0 + thumb + 2), head, fill=(20, 20, 20), font=font)
        text = _latin1(prompt["prompt"])
        if draw.textlength(text, font=font) > cell_w - 4:
            while len(text) > 1 and draw.textlength(text + "...", font=font) > cell_w - 4:
                text = text[:-1]
            text += "..."
        draw.text((x0 + 2, y0 + thumb + 15), text, fill=(70, 70, 70), font=font)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def write_reports(metrics: dict, out_dir: Path, sheet: bool = True) -> None:
    """``metrics.json``, ``metrics.md`` and (if ``sheet``) ``contact_sheet.png`` in ``out_dir``, atomically."""
    write_atomic(out_dir / METRICS_JSON, (json.dumps(metrics, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    write_atomic(out_dir / METRICS_MD, markdown(metrics).encode("utf-8"))
    if sheet:
        write_atomic(out_dir / CONTACT_SHEET, contact_sheet(metrics, out_dir))


# -------------------------------------------------------------------------------------------------
# Two runs side by side
# -------------------------------------------------------------------------------------------------

@dataclass
class Comparison:
    """Per-prompt C.S. of two runs on the prompts they share (matched by prompt), B against A.

    ``rows``: (prompt, line in A, C.S. A, C.S. B, R@1 A, R@1 B) per shared prompt, in A's order.
    ``wins``/``losses``/``ties``: prompts where B's C.S. is higher / lower / equal.
    """

    a: dict
    b: dict
    rows: list[tuple[str, int, float, float, float, float]]
    only_a: list[str]
    only_b: list[str]

    @property
    def wins(self) -> int:
        return sum(row[3] > row[2] for row in self.rows)

    @property
    def losses(self) -> int:
        return sum(row[3] < row[2] for row in self.rows)

    @property
    def ties(self) -> int:
        return len(self.rows) - self.wins - self.losses

    def sign_test(self) -> float:
        """Two-sided sign test p-value of the wins against the losses (ties left out)."""
        n, k = self.wins + self.losses, min(self.wins, self.losses)
        if n == 0:
            return 1.0
        return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def load_metrics(run_dir: str | Path) -> dict:
    path = Path(run_dir) / METRICS_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {METRICS_JSON} (is it an evaluation's output folder?)")
    return json.loads(path.read_text(encoding="utf-8"))


def compare(a: dict, b: dict) -> Comparison:
    """Match the two runs' prompts (each prompt's first line) and pair their scores."""
    in_b = {}
    for p in b["prompts"]:
        in_b.setdefault(p["prompt"], p)
    rows, seen = [], set()
    for p in a["prompts"]:
        if p["prompt"] in seen or p["prompt"] not in in_b:
            continue
        seen.add(p["prompt"])
        q = in_b[p["prompt"]]
        rows.append((p["prompt"], p["line"], p["clip_score"], q["clip_score"], p["r_at_1"], q["r_at_1"]))
    only_a = [p["prompt"] for p in a["prompts"] if p["prompt"] not in in_b]
    only_b = [p["prompt"] for p in b["prompts"] if p["prompt"] not in {q["prompt"] for q in a["prompts"]}]
    return Comparison(a, b, rows, only_a, only_b)


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            out += _differences(a[key], b[key], f"{prefix}{key}.")
        elif a.get(key) != b.get(key):
            out.append(f"{prefix}{key}: {a.get(key)!r} vs {b.get(key)!r}")
    return out


def comparison_markdown(result: Comparison, name_a: str, name_b: str) -> str:
    a, b = result.a, result.b
    deltas = [row[3] - row[2] for row in result.rows]
    settings = _differences({"settings": a["settings"], "generator": a["generator"], "clip": a["clip"]},
                            {"settings": b["settings"], "generator": b["generator"], "clip": b["clip"]})
    lines = [f"# {_cell(name_b)} (B) against {_cell(name_a)} (A)", "",
             "| | A | B |", "|---|---:|---:|",
             f"| run | {_cell(name_a)} | {_cell(name_b)} |",
             f"| C.S. | {a['clip_score']:.2f} | {b['clip_score']:.2f} |",
             f"| R@1 | {a['r_at_1']:.2f} | {b['r_at_1']:.2f} |",
             f"| R@5 | {a['r_at_5']:.2f} | {b['r_at_5']:.2f} |",
             f"| prompts | {a['prompts_evaluated']} | {b['prompts_evaluated']} |", "",
             "What differs: " + ("; ".join(settings) if settings else "nothing in the settings or weights") + ".", "",
             f"Per prompt (C.S., {len(result.rows)} shared prompts): B wins {result.wins}, loses {result.losses}, "
             f"ties {result.ties}; sign test p = {result.sign_test():.3g}; mean difference "
             f"{(sum(deltas) / len(deltas) if deltas else 0):+.2f}.", ""]
    if result.only_a or result.only_b:
        lines += [f"Not shared: {len(result.only_a)} prompts only in A, {len(result.only_b)} only in B.", ""]
    lines += ["| line (A) | prompt | C.S. A | C.S. B | B − A | R@1 A | R@1 B |", "|---:|---|---:|---:|---:|---:|---:|"]
    for prompt, line, cs_a, cs_b, r_a, r_b in result.rows:
        lines.append(f"| {line} | {_cell(prompt)} | {cs_a:.2f} | {cs_b:.2f} | {cs_b - cs_a:+.2f} | {r_a:.0f} | "
                     f"{r_b:.0f} |")
    return "\n".join(lines) + "\n"


def scatter_plot(result: Comparison, name_a: str, name_b: str, size: int = 560) -> bytes:
    """Per-prompt C.S., A across and B up, with the diagonal (above it: B better). PNG bytes."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw, font = ImageDraw.Draw(image), _font(12)
    left, right, top, bottom = 64, size - 20, 36, size - 56
    values = [v for row in result.rows for v in row[2:4]] or [0.0, 100.0]
    low, high = min(values), max(values)
    pad = max((high - low) * 0.06, 0.5)
    low, high = low - pad, high + pad
    step = _nice_step((high - low) / 5)

    def px(value: float) -> float:
        return left + (value - low) / (high - low) * (right - left)

    def py(value: float) -> float:
        return bottom - (value - low) / (high - low) * (bottom - top)

    tick = math.ceil(low / step) * step
    while tick <= high:
        draw.line([(px(tick), top), (px(tick), bottom)], fill=(236, 236, 236))
        draw.line([(left, py(tick)), (right, py(tick))], fill=(236, 236, 236))
        label = f"{tick:g}"
        draw.text((px(tick) - draw.textlength(label, font=font) / 2, bottom + 6), label, fill=(60, 60, 60), font=font)
        draw.text((left - 8 - draw.textlength(label, font=font), py(tick) - 7), label, fill=(60, 60, 60), font=font)
        tick += step
    draw.rectangle([left, top, right, bottom], outline=(90, 90, 90))
    draw.line([(px(low), py(low)), (px(high), py(high))], fill=(150, 150, 150), width=1)
    for _, _, cs_a, cs_b, _, _ in result.rows:
        colour = (30, 140, 60) if cs_b > cs_a else (200, 50, 40) if cs_b < cs_a else (120, 120, 120)
        x, y = px(cs_a), py(cs_b)
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    title = _latin1(f"C.S. per prompt: B wins {result.wins}, loses {result.losses}, ties {result.ties}")
    draw.text((left, 10), title, fill=(20, 20, 20), font=font)
    label_a = _latin1(f"A: {name_a}")
    draw.text(((left + right) / 2 - draw.textlength(label_a, font=font) / 2, size - 26), label_a, fill=(20, 20, 20),
              font=font)
    label_b = Image.new("RGB", (int(draw.textlength(_latin1(f"B: {name_b}"), font=font)) + 4, 16), (255, 255, 255))
    ImageDraw.Draw(label_b).text((2, 1), _latin1(f"B: {name_b}"), fill=(20, 20, 20), font=font)
    rotated = label_b.rotate(90, expand=True)
    image.paste(rotated, (4, int((top + bottom) / 2 - rotated.height / 2)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _nice_step(raw: float) -> float:
    """1, 2 or 5 times a power of ten, at least ``raw``."""
    raw = max(raw, 1e-9)
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def compare_runs(dir_a: str | Path, dir_b: str | Path, out_dir: str | Path) -> Comparison:
    """``compare.md`` (both runs' metrics, what differs, per-prompt wins and losses) and ``compare.png``
    (the scatter plot) in ``out_dir``, for two evaluation folders."""
    result = compare(load_metrics(dir_a), load_metrics(dir_b))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name_a, name_b = Path(dir_a).resolve().name, Path(dir_b).resolve().name
    write_atomic(out_dir / "compare.md", comparison_markdown(result, name_a, name_b).encode("utf-8"))
    write_atomic(out_dir / "compare.png", scatter_plot(result, name_a, name_b))
    return result


__all__ = ["CONTACT_SHEET", "Comparison", "METRICS_JSON", "METRICS_MD", "build_metrics", "compare", "compare_runs",
           "contact_sheet", "load_metrics", "markdown", "scatter_plot", "write_reports"]
