"""The adapter layout: the published checkpoint's 1110 keys, hyper-parameters read from shapes,
and loud, precise errors for any file that does not fit."""

import json
from pathlib import Path

import pytest
import torch

from triplane_turbo import CheckpointMismatchError, TriplaneTurboPipeline
from triplane_turbo.adapter import AdapterSpec, adapter_slots, expected_layout
from triplane_turbo.checkpoint import read_checkpoint
from triplane_turbo.config import PUBLISHED_ADAPTER, SD21_UNET_CONFIG, SD21_VAE_CONFIG

from .conftest import FIXTURE_A, FIXTURES


def layout_rows(layout):
    return [{"key": k, "shape": list(shape), "module_path": path, "kind": kind}
            for k, (shape, path, kind) in layout.items()]


def manifest_rows(path):
    return [{k: e[k] for k in ("key", "shape", "module_path", "kind")} for e in json.loads(path.read_text())]


def test_full_size_architecture_expects_exactly_the_published_manifest():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD21_UNET_CONFIG)
        vae = AutoencoderKL(**SD21_VAE_CONFIG)
    layout = expected_layout(adapter_slots(unet, vae), AdapterSpec(**PUBLISHED_ADAPTER))
    manifest = manifest_rows(FIXTURES / "checkpoint_manifest.json")
    assert len(layout) == len(manifest) == 1110
    assert sum(torch.Size(s).numel() for s, _, _ in layout.values()) == 22_684_166
    assert layout_rows(layout) == manifest  # keys, shapes, attachment points and file order


def fixture_unet_vae():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    return (UNet2DConditionModel.from_pretrained(FIXTURE_A / "base", subfolder="unet"),
            AutoencoderKL.from_pretrained(FIXTURE_A / "base", subfolder="vae"))


def test_spec_is_read_from_the_tensor_shapes():
    unet, vae = fixture_unet_vae()
    state_dict = read_checkpoint(FIXTURE_A / "adapter.pth")
    spec = AdapterSpec.from_state_dict(state_dict, adapter_slots(unet, vae))
    # fixture A uses three different ranks on purpose (self 8, cross 4, LoCON 6)
    assert spec == AdapterSpec(self_rank=8, cross_rank=4, conv_rank=6, out_channels=64, mlp_hidden=(64, 64))
    layout = expected_layout(adapter_slots(unet, vae), spec)
    assert layout_rows(layout) == manifest_rows(FIXTURE_A / "adapter_manifest.json")
    assert list(layout) == list(state_dict)  # same order as the file


@pytest.fixture()
def state_dict():
    return read_checkpoint(FIXTURE_A / "adapter.pth")


def save(tmp_path, state_dict, name="adapter.pth"):
    path = tmp_path / name
    torch.save({"epoch": 0, "global_step": 0, "pytorch-lightning_version": "2.0.0", "state_dict": state_dict}, path)
    return path


def load(adapter_path):
    return TriplaneTurboPipeline.from_pretrained(str(FIXTURE_A / "base"), str(adapter_path))


def test_missing_key_is_named(tmp_path, state_dict):
    key = "geometry.space_generator.peft_layers.layers.5.to_v_lora.up.weight"
    del state_dict[key]
    path = save(tmp_path, state_dict)
    with pytest.raises(CheckpointMismatchError, match=r"adapter\.pth.*missing key .*layers\.5\.to_v_lora\.up\.weight"):
        load(path)


def test_unexpected_key_is_named(tmp_path, state_dict):
    state_dict["geometry.space_generator.peft_layers.layers.999.down.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected key .*layers\.999\.down\.weight"):
        load(save(tmp_path, state_dict))


def test_wrong_shape_is_named(tmp_path, state_dict):
    key = "geometry.space_generator.peft_layers.layers.40.up.weight"
    state_dict[key] = torch.zeros(3, 6, 1, 1)
    with pytest.raises(CheckpointMismatchError, match=r"layers\.40\.up\.weight.*shape \[3, 6, 1, 1\].*expects"):
        load(save(tmp_path, state_dict))


def test_inconsistent_rank_is_named(tmp_path, state_dict):
    # a second self-attention group with another rank than the first: not one checkpoint family
    key = "geometry.space_generator.peft_layers.layers.2.to_k_yz_lora_tex.down.weight"
    state_dict[key] = torch.zeros(5, state_dict[key].shape[1])
    with pytest.raises(CheckpointMismatchError, match=r"layers\.2\.to_k_yz_lora_tex\.down\.weight"):
        load(save(tmp_path, state_dict))


def test_checkpoint_for_another_base_model_is_refused(tmp_path, state_dict):
    # drop a whole LoCON group: the indices after it no longer line up with the architecture
    for key in [k for k in state_dict if ".layers.40." in k]:
        del state_dict[key]
    with pytest.raises(CheckpointMismatchError, match="adapter.pth"):
        load(save(tmp_path, state_dict))


def test_corrupt_file(tmp_path):
    path = tmp_path / "adapter.pth"
    path.write_bytes((FIXTURE_A / "adapter.pth").read_bytes()[:5000])
    with pytest.raises(CheckpointMismatchError, match=r"adapter\.pth: not a readable"):
        load(path)


class Payload:
    """Any class at all: unpickling it could run code, so weights_only loading must refuse it."""


def test_arbitrary_pickle_is_refused(tmp_path):
    path = tmp_path / "adapter.pth"
    torch.save({"state_dict": Payload()}, path)
    with pytest.raises(CheckpointMismatchError, match="adapter.pth"):
        load(path)


def test_every_tensor_of_the_file_changes_the_model(state_dict):
    """Loading is complete: the fixture's adapter moves every adapter parameter off its initial value."""
    from triplane_turbo.adapter import adapter_parameters

    pipe = TriplaneTurboPipeline.from_pretrained(str(FIXTURE_A / "base"), str(FIXTURE_A / "adapter.pth"),
                                                 fuse_lora=False)
    count = 0
    for model in (pipe.unet, pipe.vae):
        for name, param in adapter_parameters(model):
            assert param.abs().sum() > 0, name
            count += param.numel()
    count += sum(p.numel() for p in pipe.fields.parameters()) + pipe.fields.bbox.numel()
    assert count == sum(t.numel() for t in state_dict.values())


def test_the_facts_the_code_cites_are_in_the_repository():
    """Modules cite docs/CHECKPOINT.md by section; every cited section exists there (and nothing
    points outside the repository any more)."""
    import re

    repo = Path(__file__).resolve().parents[1]
    headings = set(re.findall(r"^#+ (\d+(?:\.\d+)?)\.? ", (repo / "docs" / "CHECKPOINT.md").read_text(), re.M))
    cited = set()
    for path in (repo / "triplane_turbo").glob("*.py"):
        text = path.read_text()
        assert "shared/reference" not in text, path
        cited |= set(re.findall(r"docs/CHECKPOINT\.md §(\d+(?:\.\d+)?)", text))
    assert cited and cited <= headings, cited - headings


def test_writing_an_adapter_is_the_inverse_of_loading_it(tmp_path):
    from triplane_turbo.checkpoint import adapter_state_dict, save_checkpoint

    original = read_checkpoint(FIXTURE_A / "adapter.pth")
    pipe = TriplaneTurboPipeline.from_pretrained(str(FIXTURE_A / "base"), str(FIXTURE_A / "adapter.pth"),
                                                 fuse_lora=False)
    written = adapter_state_dict(pipe.unet, pipe.vae, pipe.fields, pipe.spec)
    assert list(written) == list(original)  # the published order
    for key, value in original.items():
        assert torch.equal(written[key], value), key
    save_checkpoint(tmp_path / "again.pth", written, global_step=7)
    assert list(read_checkpoint(tmp_path / "again.pth")) == list(original)
    assert torch.load(tmp_path / "again.pth", weights_only=True)["global_step"] == 7
    fused = TriplaneTurboPipeline.from_pretrained(str(FIXTURE_A / "base"), str(FIXTURE_A / "adapter.pth"))
    with pytest.raises(ValueError, match="fuse_lora=False"):
        adapter_state_dict(fused.unet, fused.vae, fused.fields, fused.spec)
