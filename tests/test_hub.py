"""Finding weights: local folders, a Hub cache in its real layout (offline), environment variables,
and the message a user gets when nothing is there."""

import shutil

import pytest

from triplane_turbo import TriplaneTurboPipeline, WeightsNotAvailableError
from triplane_turbo.config import DEFAULT_ADAPTER_FILENAME, ENV_ADAPTER, ENV_BASE_MODEL
from triplane_turbo.hub import BASE_MODEL_FILES, resolve_adapter, resolve_base_model

from .conftest import FIXTURE_A

BASE_COMMIT = "a" * 40
ADAPTER_COMMIT = "b" * 40


def make_hub_cache(cache, tiny_model_dir):
    """Lay the tiny model out as huggingface_hub caches downloads: models--org--name/{refs,snapshots}."""
    base_dir, adapter_file = tiny_model_dir
    for repo, commit in (("models--test--base", BASE_COMMIT), ("models--test--adapter", ADAPTER_COMMIT)):
        (cache / repo / "refs").mkdir(parents=True)
        (cache / repo / "refs" / "main").write_text(commit)
    # only the files the download would fetch: loading from them proves they are enough
    from huggingface_hub.utils import filter_repo_objects

    snapshot = cache / "models--test--base" / "snapshots" / BASE_COMMIT
    files = [p.relative_to(base_dir).as_posix() for p in base_dir.rglob("*") if p.is_file()]
    for name in filter_repo_objects(files, allow_patterns=BASE_MODEL_FILES):
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(base_dir / name, snapshot / name)
    snapshot = cache / "models--test--adapter" / "snapshots" / ADAPTER_COMMIT
    snapshot.mkdir(parents=True)
    shutil.copy(adapter_file, snapshot / DEFAULT_ADAPTER_FILENAME)


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch, tiny_model_dir):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    make_hub_cache(cache, tiny_model_dir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_loads_from_hub_cache_offline(hub_cache):
    pipe = TriplaneTurboPipeline.from_pretrained("test/base", "test/adapter")
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a wooden chair", seed=3, mesh_resolution=48)
    assert len(out.meshes[0].faces) > 0
    # the revision names the exact snapshots, so caches keyed on it follow weight updates
    again = TriplaneTurboPipeline.from_pretrained("test/base", "test/adapter")
    assert pipe.revision == again.revision != "local"


def test_environment_variables_choose_the_weights(hub_cache, monkeypatch):
    monkeypatch.setenv(ENV_BASE_MODEL, "test/base")
    monkeypatch.setenv(ENV_ADAPTER, "test/adapter")
    pipe = TriplaneTurboPipeline.from_pretrained()
    assert pipe.spec.out_channels == 16  # the tiny adapter, not the published one


#: The files of stabilityai/stable-diffusion-2-1-base on the Hub (weights in several variants).
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


def test_base_model_download_fetches_only_what_is_used():
    from huggingface_hub.utils import filter_repo_objects

    kept = set(filter_repo_objects(SD21_BASE_REPO_FILES, allow_patterns=BASE_MODEL_FILES))
    assert kept == {
        "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
        "text_encoder/model.safetensors", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    }


def test_offline_with_nothing_cached_says_what_to_do(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsNotAvailableError) as info:
        TriplaneTurboPipeline.from_pretrained()
    message = str(info.value)
    assert "stabilityai/stable-diffusion-2-1-base" in message
    assert "hf download" in message and ENV_BASE_MODEL in message and "--tiny" in message
    with pytest.raises(WeightsNotAvailableError, match=f"{DEFAULT_ADAPTER_FILENAME}.*{ENV_ADAPTER}"):
        resolve_adapter("ZhiyuanthePony/TriplaneTurbo")


def test_local_paths(tmp_path):
    assert resolve_base_model(str(FIXTURE_A / "base")) == FIXTURE_A / "base"
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
