"""CLIP: embeddings of the views and of the prompts' texts, and the two metrics.

The authors score with OpenAI's ``clip`` package (ViT-B/32). The same network is on the Hub as
``openai/clip-vit-base-patch32`` and runs here through transformers:

* images: ``CLIPImageProcessorPil`` (PIL bicubic resize of the shortest side to 224, centre crop,
  scale to [0, 1], CLIP's mean and std) — the same arithmetic as the ``clip`` package's transform. The
  torchvision-backed ``CLIPImageProcessor`` of transformers 5 resizes differently, so it is not used;
* texts: ``CLIPTokenizer`` (lower case, 77 tokens with start and end, longer texts cut);
* features: the projected pooled outputs (``text_projection`` / ``visual_projection``), in batches, in
  float16 on CUDA (as ``clip.load`` on a GPU) and float32 elsewhere; compared in float64.

Metrics (``clip_metrics``): each view scores w·max(cos, 0) against its own prompt's text (w = 2.5);
C.S. is the mean over all views, ×100. For Recall@k every view is a query over the unique texts,
ranked by the same clipped score; its rank is the number of texts scoring at least as high as its own
(so a tie counts against it: with no set order involved, a query is a hit at k only when fewer than k
other texts reach its own text's score). R@k is the share of views with rank ≤ k, in percent.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .protocol import DEFAULT_CLIP

logger = logging.getLogger(__name__)

#: Environment variable naming another CLIP (a Hub id or a local folder).
ENV_CLIP = "TRIPLANE_TURBO_CLIP"
#: Files of a transformers CLIP folder the scorer reads (weights: safetensors, else the .bin).
CLIP_FILES = ["config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
              "merges.txt", "special_tokens_map.json", "model.safetensors"]


def resolve_clip(source: str | os.PathLike | None = None, revision: str | None = None) -> tuple[Path, str]:
    """A CLIP folder on disk and an id of its exact version: (folder, revision).

    ``source``: a local folder or a Hub id (default: ``TRIPLANE_TURBO_CLIP``, else
    ``openai/clip-vit-base-patch32``). Hub snapshots are identified by their commit, local folders
    by a hash of their files' names and contents (so the same weights written twice get the same id).

    Raises:
        WeightsNotAvailableError: the model could not be fetched (the message says why and what to do).
    """
    from ..hub import WeightsNotAvailableError, explain_hub_error, snapshot_commit

    source = str(source or os.environ.get(ENV_CLIP) or DEFAULT_CLIP)
    folder = Path(source).expanduser()
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(source, revision=revision, allow_patterns=CLIP_FILES))
            if not (folder / "model.safetensors").is_file():  # older repositories hold only the pickle
                folder = Path(snapshot_download(source, revision=revision,
                                                allow_patterns=CLIP_FILES[:-1] + ["pytorch_model.bin"]))
        except Exception as exc:  # noqa: BLE001 - every failure becomes one message for the user
            raise WeightsNotAvailableError(explain_hub_error(exc, source, "CLIP model", ENV_CLIP)) from exc
    if not (folder / "config.json").is_file():
        raise WeightsNotAvailableError(f"{folder} is not a transformers CLIP folder (no config.json)")
    commit = snapshot_commit(folder)
    if commit is None:
        digest = hashlib.sha256()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(block)
        commit = "local:" + digest.hexdigest()[:12]
    return folder, commit


def _image_processor_class():
    """transformers' PIL CLIP preprocessing (``CLIPImageProcessorPil`` in 5.x; ``CLIPImageProcessor``,
    which was PIL-based, before)."""
    try:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    except ImportError:
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor


class ClipScorer:
    """A CLIP model with its tokenizer and preprocessing, giving L2-normalised-ready features.

    Build it with ``ClipScorer.from_pretrained(source)``; ``name`` and ``revision`` say which weights
    (they go into ``metrics.json``).
    """

    def __init__(self, model, tokenizer, processor, *, name: str, revision: str, image_batch: int = 64,
                 text_batch: int = 256):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.processor = processor
        self.name = name
        self.revision = revision
        self.image_batch = image_batch
        self.text_batch = text_batch

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike | None = None, *, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, revision: str | None = None, name: str | None = None,
                        **options) -> "ClipScorer":
        """Load CLIP from a Hub id or a folder (``resolve_clip``) onto ``device`` (default: CUDA when
        available), in ``dtype`` (default: float16 on CUDA, float32 elsewhere). ``name``: how reports
        call it (default: ``source``); ``options``: ``image_batch``, ``text_batch``."""
        from transformers import CLIPModel, CLIPTokenizer

        folder, commit = resolve_clip(source, revision)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        model = CLIPModel.from_pretrained(str(folder)).to(device=device, dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(str(folder))
        processor_class = _image_processor_class()
        processor = processor_class.from_pretrained(str(folder)) if (folder / "preprocessor_config.json").is_file() \
            else processor_class()
        name = name or str(source or os.environ.get(ENV_CLIP) or DEFAULT_CLIP)
        return cls(model, tokenizer, processor, name=name, revision=commit, **options)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> projected features [N, D] float32 on the CPU (not normalised)."""
        out = []
        for start in range(0, len(texts), self.text_batch):
            tokens = self.tokenizer(list(texts[start:start + self.text_batch]), padding="max_length", truncation=True,
                                    max_length=self.tokenizer.model_max_length, return_tensors="pt")
            hidden = self.model.text_model(input_ids=tokens.input_ids.to(self.device),
                                           attention_mask=tokens.attention_mask.to(self.device))
            out.append(self.model.text_projection(hidden.pooler_output).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.projection_dim)

    @torch.inference_mode()
    def embed_images(self, images: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
        """RGB images (each [H, W, 3] uint8) -> projected features [N, D] float32 on the CPU."""
        from PIL import Image

        out = []
        for start in range(0, len(images), self.image_batch):
            chunk = [Image.fromarray(np.asarray(image, dtype=np.uint8))
                     for image in images[start:start + self.image_batch]]
            pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"]
            hidden = self.model.vision_model(pixel_values=pixels.to(device=self.device, dtype=self.dtype))
            out.append(self.model.visual_projection(hidden.pooler_output).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.projection_dim)


# -------------------------------------------------------------------------------------------------
# Metrics
# -------------------------------------------------------------------------------------------------

@dataclass
class ClipMetrics:
    """The scores of N views against P unique texts.

    Attributes:
        cosine: [N, P] float64 cosine similarities.
        targets: [N] int, each view's own text.
        scores: [N] float64, w·max(cos, 0) of each view with its own text (in [0, w]).
        ranks: [N] int, how many texts score at least as high as the view's own (1 = strictly best).
        top1: [N] int, the best-scoring text of each view (the lowest index among equals; for display).
        clip_score: mean of ``scores`` ×100.
        recall: {k: percent of views with rank ≤ k}.
    """

    cosine: np.ndarray
    targets: np.ndarray
    scores: np.ndarray
    ranks: np.ndarray
    top1: np.ndarray
    clip_score: float
    recall: dict[int, float]


def clip_metrics(image_features, text_features, targets, weight: float = 2.5,
                 ks: Sequence[int] = (1, 5)) -> ClipMetrics:
    """C.S. and Recall@k from features.

    Args:
        image_features: [N, D] one row per view (any scale: normalised here, in float64).
        text_features: [P, D] one row per unique text.
        targets: [N] the index of each view's own text.
        weight: w in w·max(cos, 0).
    """
    images = torch.as_tensor(image_features).double()
    texts = torch.as_tensor(text_features).double()
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    if images.ndim != 2 or texts.ndim != 2 or images.shape[1] != texts.shape[1] or len(targets) != len(images):
        raise ValueError(f"expected [N, D] image and [P, D] text features and N targets, got "
                         f"{list(images.shape)}, {list(texts.shape)}, {len(targets)}")
    if len(targets) and (int(targets.min()) < 0 or int(targets.max()) >= len(texts)):
        raise ValueError("a target is not the index of a text")
    images = images / images.norm(dim=1, keepdim=True).clamp(min=1e-300)
    texts = texts / texts.norm(dim=1, keepdim=True).clamp(min=1e-300)
    cosine = images @ texts.T
    clipped = weight * cosine.clamp(min=0)
    own = clipped.gather(1, targets[:, None])
    ranks = (clipped >= own).sum(1)
    scores = own[:, 0]
    count = max(len(scores), 1)
    top1 = clipped.argmax(1).numpy() if len(texts) else np.zeros(len(scores), np.int64)
    return ClipMetrics(cosine.numpy(), targets.numpy(), scores.numpy(), ranks.numpy(), top1,
                       float(scores.sum()) / count * 100, {k: float((ranks <= k).sum()) / count * 100 for k in ks})


def authors_float16_metrics(image_features, text_features, targets, weight: float = 2.5,
                            ks: Sequence[int] = (1, 5)) -> ClipMetrics:
    """C.S. and Recall@k computed as the authors' script does on a GPU (``--authors-precision``).

    Their ``evaluation/clipscore/compute.py`` takes OpenAI's ``clip`` features as float16 numpy arrays
    (the model runs in float16 on CUDA, line 104-106) and does everything in float16: L2 norms
    ``x / sqrt(sum(x²))`` (lines 132-133, 154-155), the per-view score ``w · clip(sum(image · text), 0)``
    (line 135) and its mean (line 202); R@1 is ``clip(images @ texts.T, 0).argmax(-1) == target``
    (lines 157-159). Here the same numpy operations on the features rounded to float16. ``ranks``
    follow argmax's rule (ties go to the lower text index: texts in line order); the authors' texts
    are ``list(set(captions))`` (line 209), whose order, and so their tie-breaking, changes from run
    to run with Python's string hashing. What also remains different: their model keeps LayerNorm in
    float32 (``clip.model.LayerNorm``), transformers' float16 CLIP does not; on the CPU their script
    runs in float32.
    """
    images = np.asarray(torch.as_tensor(image_features).float().numpy(), dtype=np.float16)
    texts = np.asarray(torch.as_tensor(text_features).float().numpy(), dtype=np.float16)
    targets = np.asarray(targets, dtype=np.int64)
    if images.ndim != 2 or texts.ndim != 2 or images.shape[1] != texts.shape[1] or len(targets) != len(images):
        raise ValueError(f"expected [N, D] image and [P, D] text features and N targets, got "
                         f"{list(images.shape)}, {list(texts.shape)}, {len(targets)}")
    images = images / np.sqrt(np.sum(images ** 2, axis=1, keepdims=True))
    texts = texts / np.sqrt(np.sum(texts ** 2, axis=1, keepdims=True))
    per_view = weight * np.clip(np.sum(images * texts[targets], axis=1), 0, None)  # float16
    cosine = images @ texts.T  # float16
    clipped = np.clip(cosine, 0, None)
    rows = np.arange(len(targets))
    own = clipped[rows, targets]
    index = np.arange(len(texts))[None]
    ranks = (clipped > own[:, None]).sum(1) + ((clipped == own[:, None]) & (index < targets[:, None])).sum(1) + 1
    count = max(len(targets), 1)
    mean = float(np.mean(per_view)) if len(targets) else 0.0
    top1 = clipped.argmax(1) if len(texts) else np.zeros(len(targets), np.int64)
    return ClipMetrics(cosine.astype(np.float64), targets, per_view.astype(np.float64), ranks, top1, mean * 100,
                       {k: float((ranks <= k).sum()) / count * 100 for k in ks})


__all__ = ["CLIP_FILES", "ClipMetrics", "ClipScorer", "ENV_CLIP", "authors_float16_metrics", "clip_metrics",
           "resolve_clip"]
