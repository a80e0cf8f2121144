"""The calibration engine, through a third-party calibrated backend registered at run time.

``absmax`` is what a plugin author would write: int8 weights whose per-input-column scale folds in
the largest activation each column saw (a toy SmoothQuant), so it needs calibration data. The
model is plain PyTorch with transformers-style blocks (hidden states positional, a mask keyword).
"""

from __future__ import annotations

import warnings
from typing import ClassVar

import pytest
import torch
from torch import nn

import quantcore
from quantcore import Backend, ConfigError, QuantizationConfigMixin, QuantizationError, Quantizer, define_config
from quantcore.calibrate import find_blocks

from .half_backend import make_plugin


@define_config
class AbsMaxConfig(QuantizationConfigMixin):
    """int8 weights scaled by the calibration activations' column maxima."""

    quant_method: ClassVar[str] = "absmax"
    fail_in_block: int | None = quantcore.config_field(default=None, help="Test knob: raise in this block.")


class AbsMaxLinear(nn.Module):
    def __init__(self, linear: nn.Linear, act_max: torch.Tensor):
        super().__init__()
        w = linear.weight.detach() * act_max  # fold the activation range into the weight
        self.register_buffer("scale", w.abs().amax(1, keepdim=True).clamp(min=1e-8) / 127)
        self.register_buffer("qweight", torch.round(w / self.scale).to(torch.int8))
        self.register_buffer("act_max", act_max)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.qweight.float() * self.scale / self.act_max
        return nn.functional.linear(x, w.to(x.dtype), self.bias)


class AbsMaxQuantizer(Quantizer):
    requires_calibration = True
    produces = (AbsMaxLinear,)
    blocks_seen: ClassVar[list[str]] = []

    def quantized_nbytes(self, module: nn.Module) -> int:
        return module.weight.numel() + 8 * module.in_features

    def quantize_block(self, block) -> None:
        type(self).blocks_seen.append(block.name)
        if self.config.fail_in_block is not None and block.name.endswith(f".{self.config.fail_in_block}"):
            raise RuntimeError("refusing on purpose")
        maxima: dict[str, torch.Tensor] = {}

        def record(name: str, x: torch.Tensor) -> None:
            m = x.abs().amax(0)
            maxima[name] = torch.maximum(maxima[name], m) if name in maxima else m

        with block.observe(block.targets, record):
            block.run()
        for name, linear in block.targets.items():
            block.replace(name, AbsMaxLinear(linear, maxima[name].clamp(min=1e-5)))


class AbsMaxPlugin:
    @quantcore.hookimpl
    def register_backends(register):
        register(Backend("absmax", AbsMaxConfig, AbsMaxQuantizer, description="toy calibrated int8"))


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, scale: float = 1.0):
        x = self.norm(hidden)
        scores = self.q_proj(x) @ self.k_proj(x).transpose(-1, -2) / x.shape[-1] ** 0.5
        if attention_mask is not None:
            scores = scores.masked_fill(~attention_mask[:, None, :].bool(), float("-inf"))
        hidden = hidden + self.o_proj(scores.softmax(-1) @ x) * scale
        return (hidden + self.down(torch.relu(self.up(hidden))),)  # a tuple, as older transformers return


class Decoder(nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 32, layers: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h, attention_mask=attention_mask, scale=0.5)[0]
        return self.head(h)


@pytest.fixture
def decoder() -> Decoder:
    torch.manual_seed(0)
    AbsMaxQuantizer.blocks_seen = []
    quantcore.register_plugin(AbsMaxPlugin)
    return Decoder().eval()


def batches(n: int = 4, seq: int = 6) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 50, (1, seq), generator=gen) for _ in range(n)]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_blocks_are_the_largest_list_of_same_type_layers(decoder):
    name, blocks = find_blocks(decoder)
    assert name == "layers" and blocks is decoder.layers
    with pytest.raises(ConfigError, match=r"'head' is not a non-empty nn\.ModuleList"):
        find_blocks(decoder, "head")


def test_calibrated_backend_quantizes_block_by_block_and_reports_tokens(decoder):
    ids = batches()
    with torch.no_grad():
        before = decoder(torch.cat(ids))
    report = quantcore.quantize(decoder, {"quant_method": "absmax"}, calibration=ids)
    assert AbsMaxQuantizer.blocks_seen == ["layers.0", "layers.1", "layers.2"]
    assert len(report.quantized) == 15
    assert {r.calibration_tokens for r in report.quantized} == {4 * 6}
    head = report.record("head")
    assert head.action == "skipped" and head.rule == "calibration: outside the repeated blocks layers.*"
    assert isinstance(decoder.layers[2].down, AbsMaxLinear) and isinstance(decoder.head, nn.Linear)
    with torch.no_grad():
        after = decoder(torch.cat(ids))
    assert (after - before).abs().max() < 0.05 * before.abs().max()
    state = quantcore.get_quantization_state(decoder)
    assert set(state.modules) == {r.name for r in report.quantized}


def test_later_blocks_see_the_quantized_earlier_blocks(decoder):
    """Block 1's inputs come from block 0 as quantized, not from the float model."""
    seen: list[torch.Tensor] = []
    decoder.layers[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    ids = batches(n=1)
    quantcore.quantize(decoder, {"quant_method": "absmax"}, calibration=ids)
    with torch.no_grad():
        expected = decoder.layers[0](decoder.embed(ids[0]), scale=0.5)[0]
    assert torch.equal(seen[0], expected)


def test_a_one_dimensional_tensor_is_one_sequence(decoder):
    report = quantcore.quantize(decoder, {"quant_method": "absmax"}, calibration=[torch.arange(7)])
    assert report.record("layers.2.q_proj").calibration_tokens == 7


def test_dict_batches_pass_keyword_arguments_to_every_block(decoder):
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    report = quantcore.quantize(
        decoder, {"quant_method": "absmax"}, calibration=[{"input_ids": ids, "attention_mask": mask}]
    )
    assert report.record("layers.1.up").calibration_tokens == 10


def test_a_failing_block_leaves_the_model_unchanged(decoder):
    before = snapshot(decoder)
    with pytest.raises(QuantizationError, match=r"block 'layers.1'.*refusing on purpose.*left unchanged"):
        quantcore.quantize(decoder, {"quant_method": "absmax", "fail_in_block": 1}, calibration=batches())
    assert AbsMaxQuantizer.blocks_seen == ["layers.0", "layers.1"]
    assert not any(isinstance(m, AbsMaxLinear) for m in decoder.modules())
    after = decoder.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert quantcore.get_quantization_state(decoder) is None


def test_missing_calibration_is_an_error_naming_it(decoder):
    with pytest.raises(ConfigError, match=r"calibration: absmax needs calibration data"):
        quantcore.quantize(decoder, {"quant_method": "absmax"})
    plan = quantcore.quantize(decoder, {"quant_method": "absmax"}, dry_run=True)
    assert plan.dry_run and plan.record("head").rule == "calibration: outside the repeated blocks layers.*"
    same = quantcore.AutoQuantizer.from_config({"quant_method": "absmax"}).plan(decoder)
    assert [r.to_dict() for r in same.modules] == [r.to_dict() for r in plan.modules]


def test_bad_calibration_batches_are_listed_together(decoder):
    with pytest.raises(ConfigError) as info:
        quantcore.quantize(
            decoder, {"quant_method": "absmax"}, calibration=[torch.zeros(1, 3, dtype=torch.long), "text", 3]
        )
    assert [field for field, _ in info.value.errors] == ["calibration[1]", "calibration[2]"]
    with pytest.raises(ConfigError, match="wrap it in a list"):
        quantcore.quantize(decoder, {"quant_method": "absmax"}, calibration=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ConfigError, match="is empty"):
        quantcore.quantize(decoder, {"quant_method": "absmax"}, calibration=[])


def test_data_free_methods_ignore_calibration_with_a_warning(decoder):
    quantcore.register_plugin(make_plugin("half"))
    with pytest.warns(UserWarning, match="calibration data ignored: half fp16"):
        report = quantcore.quantize(decoder, {"quant_method": "half"}, calibration=batches())
    assert report.record("head").action == "quantized"
    assert all(r.calibration_tokens is None for r in report.modules)


def test_data_free_overrides_join_a_calibrated_call(decoder):
    quantcore.register_plugin(make_plugin("half"))
    report = quantcore.quantize(
        decoder, {"quant_method": "absmax"}, overrides={"down": {"quant_method": "half"}}, calibration=batches()
    )
    assert report.record("layers.0.down").method == "half fp16"
    assert report.record("layers.0.down").calibration_tokens is None
    assert type(decoder.layers[0].down).__name__ == "HalfLinear"
    assert isinstance(decoder.layers[0].up, AbsMaxLinear)


def test_a_forward_that_never_reaches_the_blocks_is_named(decoder):
    decoder.forward = lambda input_ids, attention_mask=None: decoder.embed(input_ids)  # type: ignore[method-assign]
    with pytest.raises(QuantizationError, match="batch 0: the forward finished without reaching the first block"):
        quantcore.quantize(decoder, {"quant_method": "absmax"}, calibration=batches())


def test_training_modes_are_kept_module_by_module(decoder):
    decoder.train()
    decoder.layers[1].eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantcore.quantize(decoder, {"quant_method": "absmax"}, calibration=batches(n=1))
    assert decoder.training and decoder.layers[0].training and decoder.layers[0].up.training
    assert not decoder.layers[1].training and not decoder.layers[1].up.training


def test_a_run_can_stop_once_the_modules_it_waits_for_have_run():
    from quantcore.calibrate import CalibrationBlock

    block = Block(8)
    inputs = [((torch.randn(1, 3, 8),), {}), ((torch.randn(1, 5, 8),), {})]
    view = CalibrationBlock("b", block, {"q_proj": block.q_proj, "down": block.down}, torch.device("cpu"), inputs, [])
    calls: list[str] = []
    with view.observe(["q_proj", "down"], lambda name, x: calls.append(name)):
        view.run(stop_after=["q_proj"])
    assert calls == ["q_proj", "q_proj"] and view.tokens == {"q_proj": 8, "down": 0}
    with view.observe(["q_proj", "down"], lambda name, x: calls.append(name)):
        view.run()
    assert calls[2:] == ["q_proj", "down", "q_proj", "down"] and view.tokens == {"q_proj": 8, "down": 8}
