"""Every module the engine puts in a model takes the train/eval mode of the module it replaces.

Modules are built in training mode; bitsandbytes' int8 matmul takes another path in training, so
a new module left in training mode inside an eval model changes its outputs. Each path that swaps
modules is checked, for every backend: the core's test backend (a third party), torch_wo and
bitsandbytes.
"""

from __future__ import annotations

import pytest
import torch

import quantcore

from .conftest import TinyLM
from .half_backend import make_plugin

BACKENDS = {
    "half": ({"quant_method": "half"}, None),
    "torch_wo-int8": ({"quant_method": "torch_wo", "bits": 8}, "quantcore_torch"),
    "torch_wo-int4": ({"quant_method": "torch_wo", "bits": 4, "group_size": 32}, "quantcore_torch"),
    "bnb-int8": ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "bitsandbytes"),
    "bnb-nf4": ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "bitsandbytes"),
}


@pytest.fixture(params=list(BACKENDS))
def config(request):
    config, needs = BACKENDS[request.param]
    if needs is not None:
        pytest.importorskip(needs, reason=f"{needs} is not installed")
    quantcore.register_plugin(make_plugin("half"))
    return config


def model_in(training: bool) -> TinyLM:
    torch.manual_seed(0)
    return TinyLM().train(training)


def modes(model: torch.nn.Module) -> set[bool]:
    return {m.training for m in model.modules()}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_quantize_keeps_the_mode(config, training):
    model = model_in(training)
    report = quantcore.quantize(model, config)
    assert report.quantized
    assert modes(model) == {training}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_overrides_and_dequantize_keep_the_mode(config, training):
    model = model_in(training)
    quantcore.quantize(model, None, overrides={"layers.0.*": config, "layers.1.*": {"quant_method": "half"}})
    assert modes(model) == {training}
    quantcore.dequantize(model)
    assert type(model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert modes(model) == {training}


def test_modules_in_one_mode_stay_in_theirs(config):
    # a model whose blocks are in different modes: each new module follows the one it replaces
    model = model_in(True)
    model.layers[1].eval()
    quantcore.quantize(model, config)
    assert modes(model.layers[0]) == {True} and modes(model.layers[1]) == {False}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_load_quantized_keeps_the_skeletons_mode(tmp_path, config, training):
    quantcore.quantize(model := model_in(False), config)
    quantcore.save_quantized(model, tmp_path / "q")
    with quantcore.empty_weights():
        skeleton = TinyLM().train(training)
    quantcore.load_quantized(tmp_path / "q", skeleton)
    assert modes(skeleton) == {training}
    ids = torch.arange(20).reshape(2, 10) % 64
    with torch.no_grad():
        assert torch.equal(skeleton.eval()(ids), model.eval()(ids))
