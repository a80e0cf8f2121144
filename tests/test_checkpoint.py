"""save_quantized / load_quantized: round trips, tied weights, shards, every way a checkpoint can be wrong."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch

import quantcore
from quantcore import CheckpointError

from .conftest import TinyLM

pytest.importorskip("quantcore_torch", reason="the quantcore-torch backend is not installed")
from quantcore_torch import TorchWeightOnlyConfig

IDS = torch.arange(20).reshape(2, 10) % 64


def quantized_lm(tied: bool = True, **config) -> TinyLM:
    torch.manual_seed(0)
    model = TinyLM(tied=tied)
    quantcore.quantize(model, TorchWeightOnlyConfig(**(config or {"bits": 4, "group_size": 32})))
    return model


def skeleton(tied: bool = True) -> TinyLM:
    with quantcore.empty_weights():
        return TinyLM(tied=tied)


def snapshot(model: torch.nn.Module) -> dict:
    """Every module object and tensor of ``model``, to check it was not touched."""
    return {
        "modules": [(n, id(m)) for n, m in model.named_modules()],
        "tensors": [(n, id(t), t.device.type) for n, t in model.state_dict(keep_vars=True).items()],
    }


@pytest.fixture
def saved(tmp_path):
    model = quantized_lm()
    quantcore.save_quantized(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


# ---------------------------------------------------------------------- round trips
@pytest.mark.parametrize("config", [{"bits": 8}, {"bits": 4, "group_size": 32}, {"bits": 4, "group_size": 64}])
@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_gives_identical_outputs(tmp_path, config, tied):
    model = quantized_lm(tied, **config)
    quantcore.save_quantized(model, tmp_path / "ckpt")
    loaded = quantcore.load_quantized(tmp_path / "ckpt", skeleton(tied))
    assert torch.equal(loaded(IDS), model(IDS))
    assert quantcore.get_quantization_state(loaded) == quantcore.get_quantization_state(model)
    assert not any(t.is_meta for t in loaded.state_dict().values())


def test_folder_layout_and_state_file(saved):
    _, path = saved
    assert sorted(os.listdir(path)) == ["model.safetensors", "quantization_config.json"]
    data = json.loads((path / "quantization_config.json").read_text())
    assert data["format"] == "quantcore" and data["format_version"] == 1
    assert data["config"] == TorchWeightOnlyConfig(bits=4, group_size=32).to_dict()
    assert data["modules"]["layers.0.mlp.up_proj"] == "config"
    assert data["tied_weights"] == {"lm_head.weight": "embed.weight"}


def test_tied_weights_saved_once_and_tied_again(saved):
    _, path = saved
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "embed.weight" in keys and "lm_head.weight" not in keys
    loaded = quantcore.load_quantized(path, skeleton())
    assert loaded.lm_head.weight is loaded.embed.weight


def test_tied_checkpoint_into_untied_skeleton(saved):
    model, path = saved
    loaded = quantcore.load_quantized(path, skeleton(tied=False))
    assert torch.equal(loaded.lm_head.weight, model.embed.weight)


def test_sharded_save_writes_an_index_and_loads(tmp_path):
    model = quantized_lm()
    quantcore.save_quantized(model, tmp_path / "ckpt", max_shard_size="10KB")
    files = sorted(os.listdir(tmp_path / "ckpt"))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for k, t in model.state_dict().items() if k != "lm_head.weight"
    )
    assert torch.equal(quantcore.load_quantized(tmp_path / "ckpt", skeleton())(IDS), model(IDS))


def test_overrides_and_mixed_formats_round_trip(tmp_path):
    torch.manual_seed(0)
    model = TinyLM()
    quantcore.quantize(
        model,
        TorchWeightOnlyConfig(bits=8),
        overrides={
            "*.mlp.*": TorchWeightOnlyConfig(bits=4, group_size=32),
            "layers.1.self_attn.q_proj": None,
        },
    )
    quantcore.save_quantized(model, tmp_path / "ckpt")
    loaded = quantcore.load_quantized(tmp_path / "ckpt", skeleton())
    assert loaded.layers[0].mlp.up_proj.bits == 4 and loaded.layers[0].self_attn.q_proj.bits == 8
    assert type(loaded.layers[1].self_attn.q_proj) is torch.nn.Linear
    assert torch.equal(loaded(IDS), model(IDS))


def test_load_into_a_real_float_model_does_not_quantize_again(saved):
    model, path = saved
    torch.manual_seed(1)
    target = TinyLM()  # different float weights: the checkpoint's must win
    quantcore.load_quantized(path, target)
    assert torch.equal(target(IDS), model(IDS))


def test_saving_replaces_an_old_checkpoint_and_keeps_other_files(saved):
    _, path = saved
    (path / "tokenizer.json").write_text("{}")
    other = quantized_lm(bits=8)
    quantcore.save_quantized(other, path)
    assert (path / "tokenizer.json").read_text() == "{}"
    assert torch.equal(quantcore.load_quantized(path, skeleton())(IDS), other(IDS))
    assert [p for p in path.parent.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------- saving errors
def test_model_never_quantized_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="never quantized by quantcore"):
        quantcore.save_quantized(TinyLM(), tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def files_of(path):
    return {p.name: p.read_bytes() for p in path.iterdir()}


def test_failing_write_leaves_the_old_checkpoint_intact(saved, monkeypatch):
    _, path = saved
    before = files_of(path)
    calls = []

    def fail_on_second_shard(tensors, file, *rest):
        calls.append(file)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(tensors, file, *rest)

    import quantcore.shards

    real = quantcore.shards.save_file
    monkeypatch.setattr(quantcore.shards, "save_file", fail_on_second_shard)
    with pytest.raises(OSError, match="disk full"):
        quantcore.save_quantized(quantized_lm(bits=8), path, max_shard_size="10KB")
    assert files_of(path) == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt"]


def test_unserializable_state_leaves_the_target_untouched(saved):
    model, path = saved
    before = files_of(path)

    class WithExtraState(torch.nn.Module):
        def get_extra_state(self):
            return {"not": "a tensor"}

        def set_extra_state(self, state):
            pass

    model.layers[0].__class__ = WithExtraState
    with pytest.raises(CheckpointError, match=r"layers\.0\._extra_state.*not a tensor"):
        quantcore.save_quantized(model, path)
    assert files_of(path) == before


# ---------------------------------------------------------------------- loading errors
def rewrite(path, tensors):
    from safetensors.torch import save_file

    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def load_all(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def assert_load_fails(path, match):
    sk = skeleton()
    before = snapshot(sk)
    with pytest.raises(CheckpointError, match=match) as info:
        quantcore.load_quantized(path, sk)
    assert snapshot(sk) == before, "a failed load changed the skeleton"
    assert quantcore.get_quantization_state(sk) is None
    return str(info.value)


def test_truncated_file(saved):
    _, path = saved
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    message = assert_load_fails(path, "truncated")
    assert "model.safetensors" in message


def test_corrupt_header(saved):
    _, path = saved
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:12] = b"#!%@"
    f.write_bytes(bytes(data))
    assert_load_fails(path, r"(?s)model\.safetensors.*not valid JSON")


def test_header_length_past_the_end(saved):
    _, path = saved
    f = path / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 10**7) + f.read_bytes()[8:100])
    assert_load_fails(path, "truncated or corrupt")


def test_missing_tensor(saved):
    _, path = saved
    tensors = load_all(path)
    del tensors["layers.1.norm.bias"]
    rewrite(path, tensors)
    assert_load_fails(path, r"missing tensor 'layers\.1\.norm\.bias'")


def test_missing_tensors_of_a_quantized_module(saved):
    _, path = saved
    rewrite(path, {k: v for k, v in load_all(path).items() if not k.startswith("layers.0.mlp.up_proj.")})
    assert_load_fails(path, r"quantized module 'layers\.0\.mlp\.up_proj'")


def test_unexpected_tensor(saved):
    _, path = saved
    rewrite(path, {**load_all(path), "layers.0.extra": torch.zeros(3)})
    assert_load_fails(path, r"unexpected tensor 'layers\.0\.extra' in model\.safetensors")


def test_wrong_shape(saved):
    _, path = saved
    tensors = load_all(path)
    tensors["layers.0.norm.weight"] = torch.zeros(65)
    rewrite(path, tensors)
    assert_load_fails(path, r"'layers\.0\.norm\.weight' in model\.safetensors has shape \[65\]")


def test_wrong_shape_inside_a_quantized_module(saved):
    _, path = saved
    tensors = load_all(path)
    tensors["layers.0.mlp.up_proj.scale"] = torch.zeros(3, 3)
    rewrite(path, tensors)
    assert_load_fails(path, r"layers\.0\.mlp\.up_proj.*model\.safetensors.*scale")


def test_every_problem_is_listed_at_once(saved):
    _, path = saved
    tensors = load_all(path)
    del tensors["layers.1.norm.bias"]
    tensors["layers.0.norm.weight"] = torch.zeros(65)
    tensors["bogus"] = torch.zeros(1)
    rewrite(path, tensors)
    message = assert_load_fails(path, "3 problems")
    assert "layers.1.norm.bias" in message and "layers.0.norm.weight" in message and "bogus" in message


def test_config_that_does_not_match_the_tensors(saved):
    _, path = saved
    state_file = path / "quantization_config.json"
    data = json.loads(state_file.read_text())
    data["config"]["bits"] = 8  # the tensors are int4
    state_file.write_text(json.dumps(data))
    assert_load_fails(path, r"in model\.safetensors do not fit module 'layers\.0\.[a-z_.]+'.*torch_wo int8")


def test_config_naming_a_module_the_model_lacks(saved):
    _, path = saved
    state_file = path / "quantization_config.json"
    data = json.loads(state_file.read_text())
    data["modules"]["layers.7.mlp.up_proj"] = "config"
    state_file.write_text(json.dumps(data))
    assert_load_fails(path, r"'layers\.7\.mlp\.up_proj' is quantized in the checkpoint but is not in the TinyLM")


def test_corrupt_state_file(saved):
    _, path = saved
    (path / "quantization_config.json").write_text("{not json")
    assert_load_fails(path, r"quantization_config\.json: cannot read JSON")


def test_sharded_checkpoint_with_a_missing_shard(tmp_path):
    quantcore.save_quantized(quantized_lm(), tmp_path / "ckpt", max_shard_size="10KB")
    second = sorted((tmp_path / "ckpt").glob("model-*.safetensors"))[1]
    second.unlink()
    assert_load_fails(tmp_path / "ckpt", rf"lists '{second.name}', which is not a file")


def test_float_checkpoint_is_refused(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "f").mkdir()
    save_file(TinyLM(tied=False).state_dict(), str(tmp_path / "f" / "model.safetensors"))
    assert_load_fails(tmp_path / "f", "not a quantized checkpoint")


# ---------------------------------------------------------------------- a backend's own config file
def float_folder(tmp_path):
    from safetensors.torch import save_file

    save_file(TinyLM(tied=False).state_dict(), str(tmp_path / "model.safetensors"))
    return tmp_path


def read_state(folder):
    from quantcore.checkpoint import read_quantization_state
    from quantcore.shards import CheckpointFiles

    return read_quantization_state(folder, CheckpointFiles.open(folder), skeleton(tied=False))


def test_a_config_file_a_backend_names_is_read_without_quant_method(tmp_path):
    from .half_backend import HalfConfig, make_plugin

    folder = float_folder(tmp_path)
    assert read_state(folder) is None  # no backend names legacy.json yet
    quantcore.register_plugin(make_plugin("half", config_files=("legacy.json",)))
    (folder / "legacy.json").write_text(json.dumps({"modules_to_not_convert": ["head"]}))
    state, tied = read_state(folder)
    assert state.config == HalfConfig(modules_to_not_convert=["head"]) and tied == {}


def test_a_config_file_two_backends_name_needs_its_quant_method(tmp_path):
    from .half_backend import make_plugin

    folder = float_folder(tmp_path)
    quantcore.register_plugin(make_plugin("half", config_files=("legacy.json",)))
    quantcore.register_plugin(make_plugin("other", config_files=("legacy.json",)))
    (folder / "legacy.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"legacy\.json has no quant_method and the backends 'half', 'other'"):
        read_state(folder)
    (folder / "legacy.json").write_text(json.dumps({"quant_method": "other"}))
    state, _ = read_state(folder)
    assert state.config.quant_method == "other"
