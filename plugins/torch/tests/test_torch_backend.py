"""The backend through quantcore's public API: discovery, whole-model quantization, reports, dequantize."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from quantcore_torch import TorchWeightOnlyConfig, TorchWeightOnlyQuantizer, WeightOnlyLinear
from torch import nn

import quantcore
from quantcore.quantizer import module_nbytes


def model_nbytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def test_entry_point_is_installed():
    eps = importlib.metadata.entry_points(group="quantcore")
    (ep,) = [ep for ep in eps if ep.name == "torch"]
    assert ep.value == "quantcore_torch.plugin"
    assert ep.dist.name == "quantcore-torch"


def test_available_backends_lists_torch_wo_with_its_distribution():
    (info,) = [b for b in quantcore.available_backends() if b.quant_method == "torch_wo"]
    assert info.plugin == "torch"
    assert info.distribution == "quantcore-torch"
    assert info.version == importlib.metadata.version("quantcore-torch")
    assert info.usable and info.reason is None
    assert info.backend.config_class is TorchWeightOnlyConfig
    assert info.backend.quantizer_class() is TorchWeightOnlyQuantizer


def test_disabling_the_plugin_removes_the_backend(monkeypatch):
    monkeypatch.setenv("QUANTCORE_DISABLE_PLUGINS", "torch")
    quantcore.reset_plugins()
    assert "torch_wo" not in {b.quant_method for b in quantcore.available_backends()}
    with pytest.raises(quantcore.ConfigError, match="quantcore-torch"):
        quantcore.AutoQuantizationConfig.from_dict({"quant_method": "torch_wo"})


def test_auto_config_builds_the_plugins_config():
    config = quantcore.AutoQuantizationConfig.from_dict({"quant_method": "torch_wo", "bits": 4})
    assert config == TorchWeightOnlyConfig(bits=4)
    assert isinstance(quantcore.AutoQuantizer.from_config(config), TorchWeightOnlyQuantizer)


@pytest.mark.parametrize(
    ("settings", "label"),
    [
        ({"bits": 8}, "torch_wo int8"),
        ({"bits": 4, "group_size": 32}, "torch_wo int4 g32"),
        ({"bits": 4}, "torch_wo int4 g128"),
    ],
)
def test_quantize_a_whole_model(tiny_model, ids, settings, label):
    reference = tiny_model(ids)
    size_before = model_nbytes(tiny_model)

    report = quantcore.quantize(tiny_model, {"quant_method": "torch_wo", **settings})

    quantized = {name for name, m in tiny_model.named_modules() if isinstance(m, WeightOnlyLinear)}
    projections = ("q_proj", "o_proj", "up_proj", "down_proj")
    assert quantized == {f"layers.{i}.{p}" for i in range(2) for p in projections}
    assert isinstance(tiny_model.lm_head, nn.Linear)  # the output head stays in float by default
    # The report's numbers are the model's real numbers.
    assert report.bytes_before == size_before
    assert report.bytes_after == model_nbytes(tiny_model)
    assert report.bytes_after < report.bytes_before
    for record in report.modules:
        module = tiny_model.get_submodule(record.name)
        assert record.bytes_after == module_nbytes(module), record.name
        if record.action == "quantized":
            assert record.method == label
    assert [r.name for r in report.modules if r.action == "skipped"] == ["lm_head"]
    out = tiny_model(ids)
    bound = 0.01 if settings["bits"] == 8 else 0.15
    assert ((out - reference).norm() / reference.norm()).item() < bound


def test_dry_run_plans_the_same_numbers(tiny_model, ids):
    config = {"quant_method": "torch_wo", "bits": 4, "group_size": 64}
    plan = quantcore.quantize(tiny_model, config, dry_run=True)
    assert not any(isinstance(m, WeightOnlyLinear) for m in tiny_model.modules())
    report = quantcore.quantize(tiny_model, config)
    assert plan.dry_run and not report.dry_run
    assert [(r.name, r.action, r.bytes_after) for r in plan.modules] == [
        (r.name, r.action, r.bytes_after) for r in report.modules
    ]
    assert plan.bytes_after == report.bytes_after == model_nbytes(tiny_model)


def test_modules_to_not_convert_keeps_them_in_float(tiny_model):
    config = TorchWeightOnlyConfig(bits=8, modules_to_not_convert=["down_proj", "layers.0.*"])
    report = quantcore.quantize(tiny_model, config)
    skipped = {r.name: r.rule for r in report.modules if r.action == "skipped"}
    assert set(skipped) == {
        "lm_head",
        "layers.1.down_proj",
        "layers.0.q_proj",
        "layers.0.o_proj",
        "layers.0.up_proj",
        "layers.0.down_proj",
    }
    assert "modules_to_not_convert" in skipped["layers.1.down_proj"]
    assert isinstance(tiny_model.layers[1].up_proj, WeightOnlyLinear)


class AttentionBlock(nn.Module):
    """``nn.MultiheadAttention`` (which reads its ``out_proj.weight`` itself) and a plain projection."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.attn(x, x, x, need_weights=False)[0])


def test_multihead_attention_out_proj_is_skipped_and_reported():
    torch.manual_seed(0)
    model = AttentionBlock().eval()
    x = torch.randn(2, 5, 32)
    reference = model(x)
    report = quantcore.quantize(model, {"quant_method": "torch_wo", "bits": 8})
    actions = {r.name: r.action for r in report.modules}
    assert actions == {"attn.out_proj": "skipped", "proj": "quantized"}
    assert report.modules[0].rule == "default: MultiheadAttention reads its weight directly"
    assert ((model(x) - reference).norm() / reference.norm()).item() < 0.01


def test_dequantize_the_whole_model(tiny_model, ids):
    quantcore.quantize(tiny_model, {"quant_method": "torch_wo", "bits": 8})
    quantized_out = tiny_model(ids)
    report = quantcore.dequantize(tiny_model)
    assert len(report.modules) == 8
    assert not any(isinstance(m, WeightOnlyLinear) for m in tiny_model.modules())
    torch.testing.assert_close(tiny_model(ids), quantized_out)


def test_save_and_load_a_quantized_model_through_meta_skeletons(tiny_model, ids):
    # What a checkpoint loader does: float skeleton on meta -> quantized skeleton -> load the tensors.
    config = TorchWeightOnlyConfig(bits=4, group_size=32)
    quantcore.quantize(tiny_model, config)
    state = tiny_model.state_dict()
    expected = tiny_model(ids)

    with torch.device("meta"):
        torch.manual_seed(0)
        fresh = type(tiny_model)()
    quantizer = TorchWeightOnlyQuantizer(config)
    for name, module in list(fresh.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            skeleton = quantizer.create_quantized_module(module, name)
            prefix = name + "."
            part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            parent, _, child = name.rpartition(".")
            setattr(fresh.get_submodule(parent), child, quantizer.load_quantized_state(skeleton, part))
    rest = {
        k: v
        for k, v in state.items()
        if not any(k.startswith(n + ".") for n, m in fresh.named_modules() if isinstance(m, WeightOnlyLinear))
    }
    fresh.load_state_dict(rest, strict=False, assign=True)
    assert torch.equal(fresh.eval()(ids), expected)
