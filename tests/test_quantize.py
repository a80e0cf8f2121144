"""Selecting, replacing and reporting modules: the AutoQuantizer engine on real (small) models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quantcore
from quantcore import ConfigError, QuantizationError

from .conftest import TinyLM
from .half_backend import HalfConfig, HalfLinear, make_plugin

LINEARS = [
    f"layers.{i}.{p}"
    for i in range(2)
    for p in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
]


@pytest.fixture(autouse=True)
def half_backends():
    quantcore.register_plugin(make_plugin("half"))
    quantcore.register_plugin(make_plugin("half2"))


def rules(report) -> dict[str, tuple[str, str]]:
    return {m.name: (m.action, m.rule) for m in report.modules}


def test_quantize_replaces_linears_and_keeps_tied_head(tiny_lm):
    ids = torch.arange(10)[None]
    ref = tiny_lm(ids)
    report = quantcore.quantize(tiny_lm, HalfConfig())
    assert [m.name for m in report.quantized] == LINEARS
    assert rules(report)["lm_head"] == ("skipped", "default: output head")
    assert all(isinstance(tiny_lm.get_submodule(n), HalfLinear) for n in LINEARS)
    torch.testing.assert_close(tiny_lm(ids), ref, atol=1e-2, rtol=1e-2)


def test_untied_head_found_by_get_output_embeddings_and_tied_linear_by_identity(untied_lm):
    untied_lm.layers[1].mlp.down_proj.weight = untied_lm.layers[0].mlp.down_proj.weight
    r = rules(quantcore.quantize(untied_lm, HalfConfig(), dry_run=True))
    assert r["lm_head"] == ("skipped", "default: output head")
    assert r["layers.0.mlp.down_proj"] == ("skipped", "default: weight tied to layers.1.mlp.down_proj.weight")
    assert r["layers.1.mlp.down_proj"] == ("skipped", "default: weight tied to layers.0.mlp.down_proj.weight")


def _nbytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


@pytest.mark.parametrize("tie", ["head-to-embeddings", "two-linears"])
def test_report_sizes_match_reality_when_tied_weights_are_quantized(tiny_lm, untied_lm, tie):
    # A quantized output head whose weight is the input embeddings' frees none of it (the
    # embeddings keep it, and the head gets its own quantized copy); two linears that share a
    # weight, both quantized, free it once. The plan and the report say what memory holds.
    if tie == "head-to-embeddings":
        model = tiny_lm
        assert model.lm_head.weight is model.embed.weight
    else:
        model = untied_lm
        model.layers[1].mlp.down_proj.weight = model.layers[0].mlp.down_proj.weight
    before = _nbytes(model)
    plan = quantcore.quantize(model, HalfConfig(), default_skips=False, dry_run=True)
    report = quantcore.quantize(model, HalfConfig(), default_skips=False)
    assert report.bytes_before == before
    assert plan.bytes_after == report.bytes_after == _nbytes(model)


def test_report_sizes_match_reality(untied_lm):
    before = sum(t.numel() * t.element_size() for t in (*untied_lm.parameters(), *untied_lm.buffers()))
    report = quantcore.quantize(untied_lm, HalfConfig())
    after = sum(t.numel() * t.element_size() for t in (*untied_lm.parameters(), *untied_lm.buffers()))
    assert (report.bytes_before, report.bytes_after) == (before, after)
    q = report.record("layers.0.mlp.up_proj")
    assert (q.bytes_before, q.bytes_after, q.params) == (64 * 128 * 4 + 128 * 4, 64 * 128 * 2 + 128 * 4, 64 * 128 + 128)
    assert report.model_params == sum(p.numel() for p in TinyLM(tied=False).parameters())
    assert 16 < report.quantized_bits_per_param < 17
    d = report.to_dict()
    assert d["counts"] == {"quantized": 12, "skipped": 1} and len(d["modules"]) == 13
    table = report.table()
    assert "layers.0.mlp.up_proj" in table and "default: output head" in table and "bits/param" in table


def test_skip_list_matches_full_name_suffix_glob_and_regex(untied_lm):
    config = HalfConfig(
        modules_to_not_convert=["layers.0.self_attn.q_proj", "k_proj", "*.mlp.up_*", "re:.*\\.1\\..*o_proj"]
    )
    r = rules(quantcore.quantize(untied_lm, config, dry_run=True))
    assert r["layers.0.self_attn.q_proj"][0] == "skipped"
    assert r["layers.1.self_attn.q_proj"][0] == "quantized"
    assert r["layers.0.self_attn.k_proj"] == ("skipped", "skip: 'k_proj' (modules_to_not_convert)")
    assert r["layers.1.self_attn.k_proj"][0] == "skipped"
    assert r["layers.1.mlp.up_proj"] == ("skipped", "skip: '*.mlp.up_*' (modules_to_not_convert)")
    assert r["layers.1.self_attn.o_proj"][0] == "skipped"
    assert r["layers.0.self_attn.o_proj"][0] == "quantized"


def test_ancestor_match_keeps_every_linear_below_it(untied_lm):
    # As real checkpoints' llm_int8_skip_modules carry: a container's name, not its linears'.
    r = rules(quantcore.quantize(untied_lm, HalfConfig(modules_to_not_convert=["layers.1.mlp"]), dry_run=True))
    assert r["layers.1.mlp.up_proj"] == ("skipped", "skip: 'layers.1.mlp' (modules_to_not_convert)")
    assert r["layers.1.mlp.down_proj"][0] == "skipped"
    assert r["layers.0.mlp.up_proj"][0] == "quantized"


def test_user_skip_list_adds_to_defaults_and_switch_turns_them_off(tiny_lm):
    r = rules(quantcore.quantize(tiny_lm, HalfConfig(modules_to_not_convert=["q_proj"]), dry_run=True))
    assert r["lm_head"] == ("skipped", "default: output head")
    assert r["layers.0.self_attn.q_proj"][0] == "skipped"
    r = rules(quantcore.quantize(tiny_lm, HalfConfig(), skip_modules=["v_proj"], default_skips=False, dry_run=True))
    assert r["lm_head"] == ("quantized", "config")
    assert r["layers.0.self_attn.v_proj"] == ("skipped", "skip: 'v_proj' (skip_modules)")


def test_overrides_mix_backends_first_match_wins_and_none_skips(untied_lm):
    report = quantcore.quantize(
        untied_lm,
        {"quant_method": "half"},
        overrides={
            "*.self_attn.*": {"quant_method": "half2"},
            "layers.1.mlp": None,
            "*.mlp.*": {"quant_method": "half2"},
        },
    )
    by = {m.name: m for m in report.modules}
    assert (by["layers.0.self_attn.q_proj"].method, by["layers.0.self_attn.q_proj"].rule) == (
        "half2 fp16",
        "override: '*.self_attn.*'",
    )
    assert by["layers.1.mlp.up_proj"].rule == "override: 'layers.1.mlp' -> keep in float"
    assert by["layers.1.mlp.up_proj"].action == "skipped"
    assert by["layers.0.mlp.up_proj"].method == "half2 fp16"
    assert isinstance(untied_lm.layers[0].mlp.up_proj, HalfLinear)
    assert type(untied_lm.layers[1].mlp.up_proj) is nn.Linear


def test_overrides_alone_without_main_config(untied_lm):
    report = quantcore.quantize(untied_lm, None, overrides={"*.mlp.*": {"quant_method": "half"}})
    assert {m.name for m in report.quantized} == {n for n in LINEARS if ".mlp." in n}
    assert report.record("layers.0.self_attn.q_proj").rule == "no rule matched"


def test_bad_override_and_skip_patterns_are_reported_together(untied_lm):
    with pytest.raises(ConfigError) as err:
        quantcore.quantize(
            untied_lm,
            HalfConfig(modules_to_not_convert=["re:("]),
            overrides={"*.mlp.*": {"quant_method": "half", "bogus": 1}},
        )
    fields = [f for f, _ in err.value.errors]
    assert fields == ["modules_to_not_convert", "overrides['*.mlp.*']"]


def test_plan_is_a_dry_run(untied_lm):
    before = {n: type(m) for n, m in untied_lm.named_modules()}
    quantizer = quantcore.AutoQuantizer.from_config({"quant_method": "half"})
    report = quantizer.plan(untied_lm)
    assert report.dry_run and len(report.quantized) == 12
    assert {n: type(m) for n, m in untied_lm.named_modules()} == before
    assert report.bytes_after < report.bytes_before


def test_failure_rolls_back_everything(untied_lm):
    state = {k: v.clone() for k, v in untied_lm.state_dict().items()}
    modules = dict(untied_lm.named_modules())
    with pytest.raises(QuantizationError, match=r"'layers.1.self_attn.k_proj'.*failing on purpose.*left unchanged"):
        quantcore.quantize(untied_lm, HalfConfig(fail_on="layers.1.self_attn.k_proj"))
    assert dict(untied_lm.named_modules()) == modules
    for k, v in untied_lm.state_dict().items():
        assert torch.equal(v, state[k])


def test_quantizing_twice_leaves_quantized_modules_alone(untied_lm):
    quantcore.quantize(untied_lm, HalfConfig())
    again = quantcore.quantize(untied_lm, HalfConfig())
    assert again.quantized == [] and [m.name for m in again.modules] == ["lm_head"]


def test_meta_device_model_is_planned_and_replaced():
    with torch.device("meta"):
        model = TinyLM(tied=False)
    report = quantcore.quantize(model, HalfConfig())
    assert len(report.quantized) == 12
    assert model.layers[0].mlp.up_proj.weight.device.type == "meta"
    assert model.layers[0].mlp.up_proj.weight.dtype == torch.float16


def test_dequantize_restores_float_linears(untied_lm):
    ids = torch.arange(8)[None]
    quantcore.quantize(untied_lm, HalfConfig())
    quantized_out = untied_lm(ids)
    report = quantcore.dequantize(untied_lm)
    assert len(report.modules) == 12 and {m.action for m in report.modules} == {"dequantized"}
    assert all(type(untied_lm.get_submodule(n)) is nn.Linear for n in LINEARS)
    assert untied_lm.layers[0].mlp.up_proj.weight.dtype == torch.float32
    torch.testing.assert_close(untied_lm(ids), quantized_out)
    assert report.bytes_after > report.bytes_before


def test_auto_quantizer_overrides_config_fields():
    q = quantcore.AutoQuantizer.from_config(HalfConfig(), modules_to_not_convert=["x"])
    assert q.config.modules_to_not_convert == ["x"]
    q = quantcore.AutoQuantizer.from_config({"quant_method": "half"}, modules_to_not_convert=["y"])
    assert q.config.modules_to_not_convert == ["y"]


def test_quantize_requires_some_config(untied_lm):
    with pytest.raises(ConfigError, match="give a config"):
        quantcore.quantize(untied_lm, None)


def test_state_on_model_records_configs_per_module(untied_lm):
    assert quantcore.get_quantization_state(untied_lm) is None
    quantcore.quantize(untied_lm, {"quant_method": "half"}, overrides={"*.mlp.*": {"quant_method": "half2"}})
    state = quantcore.get_quantization_state(untied_lm)
    assert state.modules["layers.0.self_attn.q_proj"] == "config"
    assert state.modules["layers.0.mlp.up_proj"] == "*.mlp.*"
    assert state.config_for("layers.0.mlp.up_proj").quant_method == "half2"
    assert state.config_for("lm_head") is None
    again = quantcore.QuantizationState.from_dict(state.to_dict())
    assert again.to_dict() == state.to_dict()


def test_linears_read_directly_by_torch_containers_stay_in_float():
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True), nn.Linear(32, 8))
    x = torch.randn(2, 5, 32)
    report = quantcore.quantize(model.eval(), HalfConfig())
    rules = {m.name: (m.action, m.rule) for m in report.modules}
    assert rules["0.linear1"] == ("skipped", "default: TransformerEncoderLayer reads its weight directly")
    assert rules["0.self_attn.out_proj"][1] == "default: MultiheadAttention reads its weight directly"
    assert rules["1"] == ("quantized", "config")
    assert model(x).shape == (2, 5, 8)


def test_unsupported_module_reason_is_reported(untied_lm):
    class PickyQuantizer(type(quantcore.AutoQuantizer.from_config({"quant_method": "half"}))):
        def can_replace(self, module):
            return module.in_features != 128

    report = PickyQuantizer(HalfConfig()).plan(untied_lm)
    assert report.record("layers.0.mlp.down_proj").rule == "config: Linear not supported by half fp16"
