"""Finding the weights: Hub repo ids or local paths, through huggingface_hub's cache.

Only the files the pipeline uses are fetched: the fp32 safetensors of the UNet, the VAE and the
text encoder, the tokenizer and the scheduler config (no EMA/fp16 variants, no ``.bin`` copies, no
safety checker). ``HF_HUB_OFFLINE=1`` is honoured by huggingface_hub itself.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .config import DEFAULT_ADAPTER_FILENAME, ENV_ADAPTER, ENV_BASE_MODEL

logger = logging.getLogger(__name__)

#: Files of a diffusers Stable Diffusion folder that the pipeline reads.
BASE_MODEL_FILES = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/*",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]


class WeightsNotAvailableError(RuntimeError):
    """The weights could not be found locally nor downloaded; the message says what to do."""


@dataclass(frozen=True)
class ResolvedWeights:
    """Local paths of the weights, plus a short id of their exact version (for result caches)."""

    base_dir: Path
    adapter_file: Path
    revision: str


def _looks_local(source: str) -> bool:
    return os.path.exists(source) or source.startswith((".", "/", "~")) or source.endswith(".pth")


def _offline_hint(repo_id: str, what: str, env: str, files: str = "") -> str:
    return (
        f"Could not get the {what} '{repo_id}' from the Hugging Face Hub (offline, or not cached yet). "
        f"Download it once while online (`hf download {repo_id}{files}`), or point {env} "
        f"to a local copy, or run with --tiny for the offline demo model."
    )


def resolve_base_model(source: str, revision: str | None = None) -> Path:
    """A diffusers folder for ``source`` (a local folder, or a Hub repo id fetched into the cache)."""
    if _looks_local(source):
        path = Path(source).expanduser()
        if not (path / "unet" / "config.json").is_file():
            raise WeightsNotAvailableError(
                f"{path} is not a diffusers Stable Diffusion folder (no unet/config.json)")
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    logger.info("Fetching base model %s (about 5.2 GB the first time; cached afterwards)", source)
    try:
        return Path(snapshot_download(source, revision=revision, allow_patterns=BASE_MODEL_FILES))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise WeightsNotAvailableError(_offline_hint(source, "base model", ENV_BASE_MODEL)) from exc


def resolve_adapter(source: str, filename: str = DEFAULT_ADAPTER_FILENAME, revision: str | None = None) -> Path:
    """The adapter ``.pth`` file: a local file, a local folder holding ``filename``, or a Hub repo id."""
    if _looks_local(source):
        path = Path(source).expanduser()
        if path.is_dir():
            path = path / filename
        if not path.is_file():
            raise WeightsNotAvailableError(f"adapter checkpoint not found: {path}")
        return path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    logger.info("Fetching adapter %s/%s (about 90 MB the first time)", source, filename)
    try:
        return Path(hf_hub_download(source, filename, revision=revision))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise WeightsNotAvailableError(_offline_hint(source, "adapter", ENV_ADAPTER, f" {filename}")) from exc


def weights_revision(base_dir: Path, adapter_file: Path) -> str:
    """A short id that changes whenever either set of weights changes.

    Hub snapshots are named by commit hash; local files are identified by size and mtime.
    """
    parts = []
    for p in (base_dir, adapter_file):
        p = Path(p).resolve()
        if "snapshots" in p.parts:
            parts.append(p.parts[p.parts.index("snapshots") + 1])
        else:
            files = [p] if p.is_file() else sorted(p.rglob("*.safetensors"))
            parts += [f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def resolve(base_model: str, adapter: str, adapter_filename: str = DEFAULT_ADAPTER_FILENAME) -> ResolvedWeights:
    base_dir = resolve_base_model(base_model)
    adapter_file = resolve_adapter(adapter, adapter_filename)
    return ResolvedWeights(base_dir, adapter_file, weights_revision(base_dir, adapter_file))


__all__ = ["BASE_MODEL_FILES", "ENV_ADAPTER", "ENV_BASE_MODEL", "ResolvedWeights", "WeightsNotAvailableError",
           "resolve", "resolve_adapter", "resolve_base_model", "weights_revision"]
