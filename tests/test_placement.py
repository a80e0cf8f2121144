"""Device maps sized as the model will be once quantized, planned for GPUs this machine lacks.

Every map here is inferred for a Llama-shaped model on the meta device with explicit budgets
(``max_memory={0: ..., 1: ..., "cpu": ...}``) and ``check_devices=False``: accelerate plans for
absent GPUs from the budgets alone, so these tests run on a CPU-only CI machine.
"""

from __future__ import annotations

import re
import sys

import pytest
import torch

import quantcore
from quantcore import ConfigError
from quantcore.placement import Placement, infer_device_map, offload_policy
from quantcore.walk import Walk

from .half_backend import HalfConfig, HalfQuantizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

FITS_QUANTIZED = {0: "60MiB", 1: "60MiB", "cpu": "1GiB"}  # the bf16 model needs 151 MiB, NF4 45 MiB
TOO_SMALL = {0: "20MiB", 1: "20MiB", "cpu": "1GiB"}  # even NF4 spills to the CPU
ROOMY = {0: "1GiB", 1: "1GiB", "cpu": "1GiB"}


def nf4(**fields):
    bnb = pytest.importorskip("quantcore_bnb")
    pytest.importorskip("bitsandbytes")
    return bnb.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", **fields)


def int4():
    torch_backend = pytest.importorskip("quantcore_torch")
    return torch_backend.TorchWeightOnlyConfig(bits=4, group_size=64)


BACKENDS = [pytest.param(nf4, id="bitsandbytes-nf4"), pytest.param(int4, id="torch_wo-int4")]


def llama(dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """24 decoder layers of 6.3 MiB in bfloat16; 2 MiB embeddings and head."""
    config = transformers.LlamaConfig(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=24,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=2048,
    )
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config).to(dtype)


@pytest.fixture(scope="module")
def model():
    return llama()


def plan(model, config=None, **kwargs) -> Placement:
    kwargs.setdefault("max_memory", FITS_QUANTIZED)
    kwargs.setdefault("check_devices", False)
    return infer_device_map(model, config, **kwargs)


def gpus(placement: Placement) -> set:
    return {d for d in placement.device_map.values() if isinstance(d, int)}


# ---------------------------------------------------------------------- quantized sizes
@pytest.mark.parametrize("config", BACKENDS)
def test_a_model_that_fits_only_quantized_goes_on_the_gpus(model, config):
    float_map = plan(model).device_map
    assert "cpu" in float_map.values()
    placement = plan(model, config())
    assert set(placement.device_map.values()) == {0, 1}
    assert placement.float_modules == {}


@pytest.mark.parametrize("config", BACKENDS)
def test_sizes_are_the_quantized_sizes_of_the_report(model, config):
    placement = plan(model, config())
    report = quantcore.quantize(model, config(), dry_run=True)
    assert report.quantized
    for record in report.modules:
        assert placement.module_sizes[record.name] == record.bytes_after, record.name
    assert placement.module_sizes[""] == report.bytes_after
    assert sum(placement.device_bytes.values()) == report.bytes_after
    assert placement.report.to_dict()["modules"] == report.to_dict()["modules"]


def test_dtype_sizes_the_weights_as_they_will_be_loaded():
    in_float32 = llama(torch.float32)
    placement = plan(in_float32, int4(), dtype="bfloat16")
    assert placement.module_sizes == plan(llama(), int4()).module_sizes
    assert all(p.dtype == torch.float32 for p in in_float32.parameters())  # the model is not changed


def test_overrides_and_skips_of_a_walk_are_sized(model):
    main = quantcore.AutoQuantizer.from_config(int4())
    walk = Walk.build(main, model, overrides={"model.layers.0": None}, skip_modules=["*.mlp.down_proj"])
    placement = infer_device_map(model, walk, max_memory=ROOMY, check_devices=False)
    report = walk.plan()
    assert placement.module_sizes["model.layers.0.self_attn.q_proj"] == 512 * 512 * 2
    assert placement.module_sizes["model.layers.1.mlp.down_proj"] == 1408 * 512 * 2
    assert (
        placement.module_sizes["model.layers.1"]
        == sum(r.bytes_after for r in report.modules if r.name.startswith("model.layers.1.")) + 2 * 512 * 2
    )  # and the two RMSNorm weights


# ---------------------------------------------------------------------- modes
def test_balanced_spreads_over_both_gpus_and_sequential_fills_gpu_0_first(model):
    balanced = plan(model, int4(), device_map="balanced", max_memory=ROOMY)
    assert gpus(balanced) == {0, 1}
    low, high = sorted(balanced.device_bytes.values())
    assert low / high > 0.8
    assert plan(model, int4(), device_map="auto", max_memory=ROOMY).device_map == balanced.device_map

    sequential = plan(model, int4(), device_map="sequential", max_memory=ROOMY)
    assert sequential.device_map == {"": 0}

    low_0 = plan(model, int4(), device_map="balanced_low_0", max_memory=ROOMY)
    assert low_0.device_bytes.get(0, 0) < low_0.device_bytes[1]


def test_no_split_classes_come_from_the_model(model):
    placement = plan(model, int4(), max_memory=ROOMY)
    layers = [k for k in placement.device_map if k.startswith("model.layers.")]
    assert layers and all(re.fullmatch(r"model\.layers\.\d+", k) for k in layers)


def test_planning_for_absent_gpus_needs_check_devices_false(model):
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    with pytest.raises(ConfigError, match=r"max_memory\[1\].*check_devices=False"):
        infer_device_map(model, int4(), max_memory=FITS_QUANTIZED)


def test_without_gpus_auto_puts_everything_on_the_cpu(model):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    placement = infer_device_map(model, nf4())  # real budgets: only the CPU
    assert placement.device_map == {"": "cpu"}
    assert placement.float_modules == {}  # all on the CPU is no offload: quantize there


# ---------------------------------------------------------------------- the fp32 offload rule
def test_offloading_quantized_modules_is_refused_by_default(model):
    with pytest.raises(ConfigError) as info:
        plan(model, nf4(), max_memory=TOO_SMALL)
    message = str(info.value)
    assert "llm_int8_enable_fp32_cpu_offload=True" in message
    assert "max_memory" in message
    count = int(re.search(r"puts (\d+) modules on the CPU or disk next to GPUs \(", message).group(1))
    named = re.findall(r"'(model\.layers\.\d+\.\w+\.\w+)'", message)
    assert len(named) == 5 and f"and {count - 5} more" in message
    assert "model.layers.23.mlp.down_proj" not in named  # the first few, in model order


def test_fp32_offload_keeps_the_offloaded_modules_unquantized(model):
    config = nf4(llm_int8_enable_fp32_cpu_offload=True)
    placement = plan(model, config, max_memory=TOO_SMALL)
    on_cpu = {
        r.name
        for r in placement.report.modules
        if placement.device_of(r.name) == "cpu" and r.rule != "default: output head"
    }
    assert on_cpu and set(placement.float_modules) == on_cpu
    assert set(placement.float_modules.values()) == {"device map: cpu (fp32 offload)"}
    assert gpus(placement) == {0, 1}
    for name in on_cpu:
        record = placement.report.record(name)
        assert (record.action, record.rule) == ("skipped", "device map: cpu (fp32 offload)")
        assert placement.module_sizes[name] == 4 * record.params  # sized in float32
    on_gpu = [r for r in placement.report.modules if isinstance(placement.device_of(r.name), int)]
    assert on_gpu and all(r.action == "quantized" for r in on_gpu)


def test_apply_adds_the_float_modules_to_a_walk_ahead_of_its_rules(model):
    config = nf4(llm_int8_enable_fp32_cpu_offload=True)
    main = quantcore.AutoQuantizer.from_config(config)
    walk = Walk.build(main, model, overrides={"model.layers.23.*": None})
    placement = infer_device_map(model, walk, max_memory=TOO_SMALL, check_devices=False)
    report = placement.apply(walk).plan()
    for name, label in placement.float_modules.items():
        assert report.record(name).rule == label
    assert report.record("lm_head").rule == "default: output head"
    assert report.record("model.layers.23.mlp.up_proj").rule == "override: 'model.layers.23.*' -> keep in float"
    assert "model.layers.23.mlp.up_proj" not in placement.float_modules
    assert report.record("model.layers.0.mlp.up_proj").action == "quantized"


def test_a_given_map_follows_the_same_rule(model):
    offloaded = {"": 0, "model.layers.20": "cpu", "model.layers.21": "disk"}
    with pytest.raises(ConfigError, match=re.escape("'model.layers.20.self_attn.q_proj'")):
        plan(model, nf4(), device_map=offloaded)
    placement = plan(model, nf4(llm_int8_enable_fp32_cpu_offload=True), device_map=offloaded)
    assert len(placement.float_modules) == 14
    assert placement.float_modules["model.layers.21.mlp.up_proj"] == "device map: disk (fp32 offload)"
    # in accelerate's form: no key inside another's module (its hooks move a key's whole module)
    assert placement.device_map["model.layers.21"] == "disk" and placement.device_map["model.layers.0"] == 0
    assert "" not in placement.device_map and "model.layers" not in placement.device_map
    for name, _ in model.named_parameters():
        expected = "disk" if ".layers.21." in name else "cpu" if ".layers.20." in name else 0
        assert placement.device_of(name) == expected


def test_all_on_the_cpu_is_not_an_offload(model):
    assert plan(model, nf4(), device_map="cpu").float_modules == {}


class OffloadableHalf(HalfQuantizer):
    """A backend whose quantized modules run wherever accelerate puts them."""

    def offload_policy(self):
        return "quantized"


def test_a_backend_decides_its_offload_policy(model):
    placement = plan(model, OffloadableHalf(HalfConfig()), max_memory={0: "30MiB", 1: "30MiB", "cpu": "1GiB"})
    assert "cpu" in placement.device_map.values()
    assert placement.float_modules == {}
    assert offload_policy(HalfQuantizer(HalfConfig())) == "refuse"
    with pytest.raises(ConfigError, match=r"device_map: .* where half fp16 cannot run them"):
        plan(model, HalfQuantizer(HalfConfig()), max_memory={0: "30MiB", 1: "30MiB", "cpu": "1GiB"})


# ---------------------------------------------------------------------- given maps
def test_a_given_map_is_normalised_and_kept(model):
    placement = plan(
        model,
        int4(),
        device_map={
            "model.embed_tokens": "cuda:0",
            "model.layers": torch.device("cuda", 1),
            "model.norm": 1,
            "model.rotary_emb": "cpu",
            "lm_head": "cuda:1",
        },
    )
    assert placement.device_map["model.embed_tokens"] == 0
    assert placement.device_map["model.layers"] == 1
    assert placement.device_of("model.layers.3.mlp.up_proj.weight") == 1
    assert placement.max_memory == {}


def test_a_single_device_is_the_whole_model(model):
    assert plan(model, int4(), device_map="cuda:1").device_map == {"": 1}
    assert plan(model, int4(), device_map=0).device_map == {"": 0}


def test_every_problem_of_a_given_map_is_reported_at_once(model):
    with pytest.raises(ConfigError) as info:
        plan(model, int4(), device_map={"": 0, "model.layer.0": 1, "lm_head": "gpu7", 3: "cpu"})
    message = str(info.value)
    assert "3 problems" in message
    assert "did you mean 'model.layers.0'" in message
    assert "'gpu7' is not a device" in message
    assert "device_map[3]" in message


def test_a_given_map_must_place_every_tensor(model):
    with pytest.raises(
        ConfigError,
        match=r"gives no device to 3 modules: 'model.norm', 'model.rotary_emb', "
        r"'lm_head'; map them",
    ):
        plan(model, int4(), device_map={"model.embed_tokens": 0, "model.layers": 1})


def test_a_given_map_names_devices_of_this_machine(model):
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    with pytest.raises(ConfigError, match=r"device_map\['lm_head'\]: GPU 1 is not on this machine.*check_devices"):
        infer_device_map(model, int4(), device_map={"": "cpu", "lm_head": "cuda:1"})


def test_an_unknown_mode_is_an_error(model):
    with pytest.raises(ConfigError, match="'balance' is neither a mode"):
        plan(model, int4(), device_map="balance")


def test_accelerate_is_optional(model, monkeypatch):
    monkeypatch.setitem(sys.modules, "accelerate.utils.modeling", None)
    with pytest.raises(ImportError, match=re.escape("pip install 'quantcore[transformers]'")):
        plan(model, int4())
    assert plan(model, int4(), device_map={"": 0}).device_map == {"": 0}  # a given map needs no accelerate
