"""Shared test set-up: never touch the network; fixture paths; one tiny pipeline per session."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported anywhere
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

TESTS = Path(__file__).parent
FIXTURES = TESTS / "fixtures"
FIXTURE_A = FIXTURES / "fixture_a"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random base model and adapter written in Hub layout: (base_dir, adapter_file)."""
    from triplane_turbo.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model_dir):
    """The tiny pipeline, loaded through the real from_pretrained (16x16 latents: fast on CPU)."""
    from triplane_turbo import GenerationConfig, TriplaneTurboPipeline

    base_dir, adapter_file = tiny_model_dir
    pipe = TriplaneTurboPipeline.from_pretrained(str(base_dir), str(adapter_file),
                                                 config=GenerationConfig(latent_size=16))
    pipe.set_progress_bar_config(disable=True)
    return pipe
