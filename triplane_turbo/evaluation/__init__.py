"""The paper's evaluation (CLIP score and CLIP Recall@1 over the DreamFusion prompts), for the published
model and for your own adapters.

    from triplane_turbo.evaluation import ClipScorer, EvalSettings, evaluate_pipeline

    clip = ClipScorer.from_pretrained()                     # openai/clip-vit-base-patch32, float16 on CUDA
    result = evaluate_pipeline(pipe, "prompts.txt", "eval/", EvalSettings(), clip)
    print(result.clip_score, result.r_at_1, result.r_at_5)  # percent; result.metrics == metrics.json

Parts: ``protocol`` (settings, prompts, texts), ``views`` (the authors' pictures with the project's
rasteriser), ``clip`` (features and metrics), ``run`` (the chain, resumable, over processes),
``report`` (metrics.json, markdown, contact sheet, comparison of two runs). The command line is
``python -m triplane_turbo.evaluate``.
"""

from .clip import ClipMetrics, ClipScorer, authors_float16_metrics, clip_metrics, resolve_clip
from .protocol import AUTHORS_TEMPLATE, DEFAULT_CLIP, DEFAULT_TEMPLATE, EvalSettings, clip_text, read_eval_prompts
from .report import compare_runs
from .run import EvalResult, evaluate_pipeline
from .views import ViewMesh, render_views

__all__ = ["AUTHORS_TEMPLATE", "ClipMetrics", "ClipScorer", "DEFAULT_CLIP", "DEFAULT_TEMPLATE", "EvalResult",
           "EvalSettings", "ViewMesh", "authors_float16_metrics", "clip_metrics", "clip_text", "compare_runs",
           "evaluate_pipeline", "read_eval_prompts", "render_views", "resolve_clip"]
