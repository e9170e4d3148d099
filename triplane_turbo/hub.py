"""Finding the weights: Hub repo ids or local paths, through huggingface_hub's cache.

Only the files the pipeline uses are fetched: the safetensors of the UNet, the VAE (whose encoder is
then dropped) and the text encoder (in one precision variant), the tokenizer and the scheduler config (no EMA copies, no
``.bin`` duplicates, no safety checker). ``HF_HUB_OFFLINE=1`` is honoured by huggingface_hub itself.

Every way a download can fail becomes a ``WeightsNotAvailableError`` whose message names the
repository and the way out; ``explain_hub_error`` holds that mapping.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .config import DEFAULT_ADAPTER_FILENAME, DEFAULT_BASE_MODEL, ENV_ADAPTER, ENV_BASE_MODEL, LEGACY_BASE_MODEL

logger = logging.getLogger(__name__)

#: Small files of a diffusers Stable Diffusion folder that the pipeline reads.
BASE_MODEL_CONFIG_FILES = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "tokenizer/*",
    "unet/config.json",
    "vae/config.json",
]
#: Weight file of each network, ``{variant}`` being "" (float32) or ".fp16".
WEIGHT_FILES = {
    "text_encoder": "text_encoder/model{variant}.safetensors",
    "unet": "unet/diffusion_pytorch_model{variant}.safetensors",
    "vae": "vae/diffusion_pytorch_model{variant}.safetensors",
}
#: Precision variants a base model repository may hold, by name (None: the float32 files).
VARIANTS = (None, "fp16")


def weight_files(variant: str | None = None) -> list[str]:
    """Relative paths of the three networks' weights in ``variant`` (None = float32)."""
    suffix = f".{variant}" if variant else ""
    return [pattern.format(variant=suffix) for pattern in WEIGHT_FILES.values()]


def base_model_files(variant: str | None = None) -> list[str]:
    """Download patterns for one precision variant of the base model."""
    return BASE_MODEL_CONFIG_FILES + weight_files(variant)


#: The float32 files (what a float32 or bfloat16 pipeline downloads).
BASE_MODEL_FILES = base_model_files(None)


class WeightsNotAvailableError(RuntimeError):
    """The weights could not be found locally nor downloaded; the message says what to do."""


class IncompatibleBaseModelError(ValueError):
    """The base model is a Stable Diffusion the adapter was not trained on (e.g. the 768-px v-model)."""


@dataclass(frozen=True)
class ResolvedWeights:
    """Local paths of the weights, plus a short id of their exact version (for result caches).

    ``variant`` is the precision variant of the base model's weight files ("fp16") or None (float32).
    """

    base_dir: Path
    adapter_file: Path
    revision: str
    variant: str | None = None


# -------------------------------------------------------------------------------------------------
# Errors a user can act on
# -------------------------------------------------------------------------------------------------

def explain_hub_error(exc: BaseException, repo_id: str, what: str, env: str, files: str = "") -> str:
    """One message for a failed download of ``repo_id``: what happened and what to do about it.

    Args:
        exc: what huggingface_hub (or the file system) raised.
        repo_id: the repository that was asked for.
        what: "base model" or "adapter".
        env: the environment variable that points elsewhere.
        files: the file name(s) for the ``hf download`` hint, with a leading space ("" for all).
    """
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, IncompleteSnapshotError,
                                        LocalEntryNotFoundError, OfflineModeIsEnabled, RemoteEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    if isinstance(exc, LocalEntryNotFoundError) and isinstance(exc.__cause__, HfHubHTTPError):
        exc = exc.__cause__  # huggingface_hub looked in the cache after the Hub answered with an error
    elsewhere = f"set {env} to another Hub repository or a local copy"
    tiny = "or run with --tiny for the offline demo model"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, GatedRepoError):
        return (f"The {what} '{repo_id}' is gated: accept its conditions on https://huggingface.co/{repo_id} "
                f"and log in with `hf auth login` (or set HF_TOKEN); or {elsewhere}.")
    if isinstance(exc, RepositoryNotFoundError):
        withdrawn = (f" Stability AI withdrew '{LEGACY_BASE_MODEL}' from the Hub in November 2025; "
                     f"the maintained mirror is '{DEFAULT_BASE_MODEL}'." if repo_id == LEGACY_BASE_MODEL else "")
        return (f"The Hugging Face Hub has no {what} '{repo_id}' (it does not exist, or it is private and "
                f"needs a token: `hf auth login`).{withdrawn} Check the name, or {elsewhere}.")
    if isinstance(exc, RevisionNotFoundError):
        return f"The {what} '{repo_id}' has no such revision; {elsewhere}."
    if isinstance(exc, RemoteEntryNotFoundError):
        return f"The {what} repository '{repo_id}' has no file{files or 's needed here'}; {elsewhere}."
    if isinstance(exc, HfHubHTTPError) and status in (401, 403):
        return (f"The Hugging Face Hub refused access to the {what} '{repo_id}' (HTTP {status}): log in with "
                f"`hf auth login` (or set HF_TOKEN) with a token that can read it; or {elsewhere}.")
    if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled, IncompleteSnapshotError)):
        from huggingface_hub import constants

        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hugging Face Hub could not be reached"
        return (f"The {what} '{repo_id}' is not in the local cache (or only partly) and {why}. Download it "
                f"once while online (`hf download {repo_id}{files}`), or {elsewhere}, {tiny}.")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        from huggingface_hub import constants

        return (f"The disk ran full while downloading the {what} '{repo_id}' into {constants.HF_HUB_CACHE}. "
                f"Free some space (the base model needs about 5.2 GB, 2.6 GB in float16), or set HF_HOME "
                f"to a larger disk, or {elsewhere}.")
    if isinstance(exc, HfHubHTTPError):
        return (f"The Hugging Face Hub answered with an error for the {what} '{repo_id}' "
                f"(HTTP {status}); try again later, or {elsewhere}.")
    return f"Could not get the {what} '{repo_id}' ({type(exc).__name__}: {exc}); {elsewhere}, {tiny}."


def _looks_local(source: str) -> bool:
    return os.path.exists(source) or source.startswith((".", "/", "~")) or source.endswith(".pth")


def _missing(folder: Path, files: list[str]) -> list[str]:
    return [name for name in files if not (folder / name).is_file()]


def _hub_snapshot(repo_id: str, patterns: list[str], revision: str | None, tqdm_class, **kwargs) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, tqdm_class=tqdm_class,
                                  **kwargs))


# -------------------------------------------------------------------------------------------------
# The base model
# -------------------------------------------------------------------------------------------------

def check_base_model(base_dir: Path, source: str) -> None:
    """Refuse base models the adapter was not trained on, before gigabytes are read.

    The published adapter was trained on the epsilon-predicting 512-px SD 2.1-base; the 768-px SD 2.1
    has the same architecture (so the adapter would load) but predicts v, which gives garbage.
    """
    try:
        config = json.loads((base_dir / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WeightsNotAvailableError(f"{source}: no readable scheduler/scheduler_config.json ({exc})") from exc
    prediction = config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise IncompatibleBaseModelError(
            f"The base model '{source}' predicts {prediction!r} (like the 768-px Stable Diffusion 2.1); the "
            f"TriplaneTurbo adapter was trained on the epsilon-predicting 512-px Stable Diffusion 2.1-base. "
            f"Use '{DEFAULT_BASE_MODEL}' (the default) or a copy of it.")


def local_variant(folder: Path, variant: str | None) -> str | None:
    """The variant a local folder can serve: ``variant`` if all its weight files are there, else None."""
    return variant if variant and not _missing(folder, weight_files(variant)) else None


def resolve_base_model(source: str, revision: str | None = None, *, variant: str | None = None,
                       tqdm_class=None) -> tuple[Path, str | None]:
    """A diffusers folder for ``source`` (a local folder, or a Hub repo id fetched into the cache).

    Args:
        source: local folder or Hub repo id.
        revision: Hub branch, tag or commit (None: the default branch).
        variant: "fp16" to prefer the half-size float16 weight files where the repo (or folder) has
            them; the float32 files are used otherwise.
        tqdm_class: progress bar class handed to huggingface_hub's downloads.
    Returns:
        (folder, the variant actually found: "fp16" or None for float32).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown weight variant {variant!r}; expected one of {VARIANTS}")
    if _looks_local(source):
        path = Path(source).expanduser()
        if not (path / "unet" / "config.json").is_file():
            raise WeightsNotAvailableError(
                f"{path} is not a diffusers Stable Diffusion folder (no unet/config.json)")
        found = local_variant(path, variant)
        if missing := _missing(path, weight_files(found)):
            raise WeightsNotAvailableError(f"{path} lacks {missing[0]}")
        check_base_model(path, source)
        return path, found
    try:
        folder, found = _fetch_base_model(source, revision, variant, tqdm_class)
    except WeightsNotAvailableError as failure:
        if source != DEFAULT_BASE_MODEL or revision is not None:
            raise
        # The default moved from the withdrawn stabilityai repo to its mirror: anyone who still has
        # the withdrawn repo in the cache keeps working offline.
        try:
            folder, found = _fetch_base_model(LEGACY_BASE_MODEL, None, variant, tqdm_class, local_files_only=True)
        except WeightsNotAvailableError:
            raise failure from failure.__cause__
        logger.warning("Using the cached copy of %s (%s could not be fetched)", LEGACY_BASE_MODEL, source)
        source = LEGACY_BASE_MODEL
    check_base_model(folder, source)
    return folder, found


def _fetch_base_model(repo_id: str, revision: str | None, variant: str | None, tqdm_class,
                      **kwargs) -> tuple[Path, str | None]:
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    if variant:
        # Try the smaller variant first; a repo without it (or a cache holding only float32) falls back.
        try:
            folder = _hub_snapshot(repo_id, base_model_files(variant), revision, tqdm_class, **kwargs)
            if not _missing(folder, weight_files(variant)):
                return folder, variant
            logger.info("%s has no %s weights; using the float32 files", repo_id, variant)
        except (IncompleteSnapshotError, LocalEntryNotFoundError):
            pass
        except Exception as exc:  # noqa: BLE001 - every other failure is explained below
            raise WeightsNotAvailableError(explain_hub_error(exc, repo_id, "base model", ENV_BASE_MODEL)) from exc
    logger.info("Fetching base model %s (about 5.2 GB the first time; cached afterwards)", repo_id)
    try:
        folder = _hub_snapshot(repo_id, base_model_files(None), revision, tqdm_class, **kwargs)
    except Exception as exc:  # noqa: BLE001 - mapped to a message a user can act on
        raise WeightsNotAvailableError(explain_hub_error(exc, repo_id, "base model", ENV_BASE_MODEL)) from exc
    if missing := _missing(folder, weight_files(None)):
        from huggingface_hub.errors import LocalEntryNotFoundError

        exc = LocalEntryNotFoundError(f"{missing[0]} is not in the cached snapshot {folder}")
        raise WeightsNotAvailableError(explain_hub_error(exc, repo_id, "base model", ENV_BASE_MODEL)) from exc
    return folder, None


# -------------------------------------------------------------------------------------------------
# The adapter
# -------------------------------------------------------------------------------------------------

def resolve_adapter(source: str, filename: str = DEFAULT_ADAPTER_FILENAME, revision: str | None = None, *,
                    tqdm_class=None) -> Path:
    """The adapter ``.pth`` file: a local file, a local folder holding ``filename``, or a Hub repo id."""
    if _looks_local(source):
        path = Path(source).expanduser()
        if path.is_dir():
            path = path / filename
        if not path.is_file():
            raise WeightsNotAvailableError(f"adapter checkpoint not found: {path}")
        return path
    from huggingface_hub import hf_hub_download

    logger.info("Fetching adapter %s/%s (about 90 MB the first time)", source, filename)
    try:
        return Path(hf_hub_download(source, filename, revision=revision, tqdm_class=tqdm_class))
    except Exception as exc:  # noqa: BLE001 - mapped to a message a user can act on
        raise WeightsNotAvailableError(explain_hub_error(exc, source, "adapter", ENV_ADAPTER, f" {filename}")) from exc


# -------------------------------------------------------------------------------------------------
# Both, with a version id
# -------------------------------------------------------------------------------------------------

def snapshot_commit(path: Path) -> str | None:
    """The commit of a path inside huggingface_hub's cache (``…/snapshots/<commit>/…``), else None.

    Read from the path as huggingface_hub returned it: resolving it would follow the cache's
    symlinks into ``blobs/`` and lose the commit.
    """
    parts = Path(os.path.abspath(path)).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def weights_revision(base_dir: Path, adapter_file: Path, variant: str | None = None) -> str:
    """A short id that changes whenever either set of weights changes.

    Hub snapshots are identified by their commit; local files by size and modification time.
    """
    parts = [variant or "fp32"]
    for p in (Path(base_dir), Path(adapter_file)):
        if commit := snapshot_commit(p):
            parts.append(commit)
        else:
            files = [p] if p.is_file() else sorted(p.rglob("*.safetensors"))
            parts += [f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def resolve(base_model: str, adapter: str, adapter_filename: str = DEFAULT_ADAPTER_FILENAME, *,
            variant: str | None = None, tqdm_class=None) -> ResolvedWeights:
    """Both sets of weights as local paths (downloading what is missing), and their version id."""
    base_dir, found = resolve_base_model(base_model, variant=variant, tqdm_class=tqdm_class)
    adapter_file = resolve_adapter(adapter, adapter_filename, tqdm_class=tqdm_class)
    return ResolvedWeights(base_dir, adapter_file, weights_revision(base_dir, adapter_file, found), found)


__all__ = ["BASE_MODEL_FILES", "ENV_ADAPTER", "ENV_BASE_MODEL", "IncompatibleBaseModelError", "ResolvedWeights",
           "WeightsNotAvailableError", "base_model_files", "explain_hub_error", "resolve", "resolve_adapter",
           "resolve_base_model", "weight_files", "weights_revision"]
