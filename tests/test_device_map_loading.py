"""from_pretrained with a device map: planned by quantized size, streamed to each module's device.

The CPU tests load small Llama checkpoints saved to ``tmp_path`` with maps that only name the CPU
(and check they give the plain load's logits), and check every refusal before a tensor is read.
A map mixing GPUs and the CPU cannot run here: its planning is tested with
:func:`quantcore.loading.plan_device_map` and ``check_devices=False``, and the loads themselves by
the ``gpu`` tests (one GPU with fp32 CPU offload; two GPUs, skipped with fewer).
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import quantcore
from quantcore import ConfigError
from quantcore.loading import plan_device_map
from quantcore.shards import CheckpointFiles, parse_size

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
pytest.importorskip("accelerate", reason="accelerate is not installed")

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 2, 100, 127, 3]])
ROOT = Path(__file__).resolve().parent.parent

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


@pytest.fixture(autouse=True)
def _quiet():
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def save_llama(folder: Path, layers: int = 2, hidden: int = 64, intermediate: int = 128) -> Path:
    """A random bf16 Llama checkpoint (untied head, so the head has its own device)."""
    config = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.fixture
def tiny(tmp_path) -> Path:
    return save_llama(tmp_path / "tiny")


@pytest.fixture
def deep(tmp_path) -> Path:
    """16 layers of 1.1 MiB in bf16, 0.3 MiB in NF4: small GPU budgets split it."""
    return save_llama(tmp_path / "deep", layers=16, hidden=256, intermediate=512)


def nf4(**fields):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    bnb = pytest.importorskip("quantcore_bnb", reason="the quantcore-bnb backend is not installed")
    return bnb.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", **fields)


def int4():
    backend = pytest.importorskip("quantcore_torch", reason="the quantcore-torch backend is not installed")
    return backend.TorchWeightOnlyConfig(bits=4, group_size=32)


CONFIGS = [pytest.param(lambda: None, id="float"), pytest.param(nf4, id="bnb-nf4"), pytest.param(int4, id="torch-int4")]

# Per-GPU budgets that split ``deep`` over two GPUs with nothing left over: the float model (18 MiB)
# needs three times the quantized one's (5 to 6 MiB), and a budget sized for NF4 would send 14 of
# its 16 float layers to disk. test_the_two_gpu_budgets_fit_both_gpus checks them on any machine.
TWO_GPUS = [
    pytest.param(lambda: None, {0: "12MiB", 1: "12MiB"}, id="float"),
    pytest.param(nf4, {0: "4MiB", 1: "4MiB"}, id="bnb-nf4"),
    pytest.param(int4, {0: "4MiB", 1: "4MiB"}, id="torch-int4"),
]


def logits(model: nn.Module, device: str = "cpu") -> torch.Tensor:
    with torch.no_grad():
        return model(IDS.to(device)).logits.float().cpu()


@pytest.fixture
def no_reads(monkeypatch):
    """Fail the test if the load reads a tensor: errors must come before."""

    def stream(*args, **kwargs):
        raise AssertionError("a tensor was read before the error")

    monkeypatch.setattr(CheckpointFiles, "stream", stream)


TOP = ("model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head")


# ---------------------------------------------------------------------- maps that name the CPU only
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize(
    "device_map, max_memory",
    [
        pytest.param({"": "cpu"}, None, id="whole-model"),
        pytest.param("auto", {"cpu": "1GiB"}, id="auto"),
        pytest.param("sequential", {"cpu": "1GiB"}, id="sequential"),
        pytest.param(dict.fromkeys(TOP, "cpu"), None, id="every-top-module"),
    ],
)
def test_cpu_maps_give_the_plain_load(tiny, config, device_map, max_memory):
    plain = quantcore.from_pretrained(tiny, config())
    model = quantcore.from_pretrained(tiny, config(), device_map=device_map, max_memory=max_memory)
    assert torch.equal(logits(model), logits(plain))
    expected = dict.fromkeys(device_map, "cpu") if isinstance(device_map, dict) else {"": "cpu"}
    assert model.hf_device_map == expected
    if config() is not None:
        assert model.quantcore_report.to_dict()["modules"] == plain.quantcore_report.to_dict()["modules"]


def test_a_saved_quantized_checkpoint_loads_with_a_map(tiny, tmp_path):
    quantcore.save_quantized(quantcore.from_pretrained(tiny, nf4()), tmp_path / "q")
    plain = quantcore.from_pretrained(tmp_path / "q")
    model = quantcore.from_pretrained(tmp_path / "q", device_map="auto", max_memory={"cpu": "1GiB"})
    assert model.hf_device_map == {"": "cpu"}
    assert torch.equal(logits(model), logits(plain))


# ---------------------------------------------------------------------- the CPU and disk
ON_DISK = {"": "cpu", "model.layers.1": "disk", "lm_head": "disk"}


@pytest.mark.parametrize(
    "config, device_map, max_memory",  # float, and torch_wo (its offload policy: "quantized")
    [
        pytest.param(lambda: None, ON_DISK, None, id="float-dict"),
        pytest.param(int4, ON_DISK, None, id="torch-int4-dict"),
        pytest.param(lambda: None, "sequential", {"cpu": "100KB"}, id="float-sequential"),
        pytest.param(int4, "sequential", {"cpu": "60KB"}, id="torch-int4-sequential"),  # smaller: 4-bit fits more
    ],
)
def test_cpu_and_disk_maps_give_the_plain_load(tiny, tmp_path, config, device_map, max_memory):
    plain = quantcore.from_pretrained(tiny, config())
    folder = tmp_path / "offload"
    model = quantcore.from_pretrained(
        tiny, config(), device_map=device_map, max_memory=max_memory, offload_folder=folder
    )
    on_disk = [name for name, device in model.hf_device_map.items() if device == "disk"]
    assert on_disk and "cpu" in model.hf_device_map.values()
    assert not any(a.startswith(b + ".") or not b for a in model.hf_device_map for b in model.hf_device_map if a != b)
    held = [n for n, t in model.named_parameters() if not t.is_meta]
    assert held and not any(n.startswith(tuple(f"{d}." for d in on_disk)) for n in held)  # disk tensors not in memory
    assert torch.equal(logits(model), logits(plain))
    written = sorted(p.name for p in folder.iterdir())
    if config() is None:
        assert written == []  # float tensors on disk are read from the checkpoint itself
    else:  # one file per quantized module on disk
        assert "model.layers.1.mlp.down_proj.safetensors" in written and len(written) in (7, 14)
        assert model.quantcore_report.to_dict()["modules"] == plain.quantcore_report.to_dict()["modules"]


def test_tensors_on_disk_are_never_read(tiny, tmp_path, monkeypatch):
    real, read = CheckpointFiles.stream, []

    def recording(self, keys, to=None):
        for entry, tensor in real(self, keys, to):
            read.append(entry.name)
            yield entry, tensor

    monkeypatch.setattr(CheckpointFiles, "stream", recording)
    quantcore.from_pretrained(tiny, device_map=ON_DISK, offload_folder=tmp_path / "offload")
    assert "model.layers.0.mlp.up_proj.weight" in read
    assert not [k for k in read if k.startswith(("model.layers.1.", "lm_head."))]


def test_each_tensor_is_streamed_to_its_own_gpu(deep):
    """The loader of a 2-GPU map sends each tensor straight to its GPU; CPU ones are read to the host."""
    from quantcore.loading import _prepare

    device_map = {"": 0, "model.layers.15": 1, "lm_head": "cpu"}
    load = _prepare(
        deep,
        int4(),
        None,
        device_map,
        max_memory=None,
        no_split_module_classes=None,
        overrides=None,
        skip_modules=None,
        default_skips=True,
        auto_class=None,
        check_devices=False,
        config_kwargs={},
        plan_only=True,
    )
    load.loader.check()
    to = load.loader._stream_device()
    entries = CheckpointFiles.open(deep).entries
    assert to(entries["model.embed_tokens.weight"]) == torch.device("cuda", 0)
    assert to(entries["model.layers.15.mlp.up_proj.weight"]) == torch.device("cuda", 1)  # quantized there
    assert to(entries["model.layers.15.input_layernorm.weight"]) == torch.device("cuda", 1)
    assert to(entries["lm_head.weight"]) is None


def test_fp32_offload_to_disk_keeps_the_disk_linears_in_float32(tiny, tmp_path):
    Linear4bit = pytest.importorskip("bitsandbytes.nn", reason="bitsandbytes is not installed").Linear4bit

    config = nf4(llm_int8_enable_fp32_cpu_offload=True)
    model = quantcore.from_pretrained(tiny, config, device_map=ON_DISK, offload_folder=tmp_path / "offload")
    kept = [r.name for r in model.quantcore_report.modules if r.rule == "device map: disk (fp32 offload)"]
    linears = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj")
    assert kept == [f"model.layers.1.{m}" for m in (*linears, "mlp.up_proj", "mlp.down_proj")]
    assert all(type(model.get_submodule(name)) is nn.Linear for name in kept)
    assert isinstance(model.model.layers[0].mlp.down_proj, Linear4bit)  # on the CPU: quantized there
    assert model.model.layers[1].mlp.down_proj.weight.dtype == torch.float32
    reference = logits(quantcore.from_pretrained(tiny, nf4(), skip_modules=kept))  # kept in bf16 instead
    out = logits(model)
    assert (out - reference).abs().max() <= 0.05 * reference.abs().max()


def test_a_failed_disk_offload_leaves_no_file(tiny, tmp_path, monkeypatch):
    real, calls = quantcore.shards.save_file, []

    def fail_on_the_third_module(tensors, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        real(tensors, path)

    monkeypatch.setattr(quantcore.shards, "save_file", fail_on_the_third_module)
    folder = tmp_path / "offload"
    with pytest.raises(OSError, match="disk full"):
        quantcore.from_pretrained(tiny, int4(), device_map=ON_DISK, offload_folder=folder)
    assert len(calls) == 3 and list(folder.iterdir()) == []


# ---------------------------------------------------------------------- refusals, before any tensor is read
def test_offloading_nf4_without_the_setting_is_refused(tiny, no_reads):
    with pytest.raises(ConfigError) as info:
        quantcore.from_pretrained(tiny, nf4(), device_map={"": 0, "model.layers.1": "cpu"})
    message = str(info.value)
    assert "llm_int8_enable_fp32_cpu_offload=True" in message
    assert "7 modules" in message and "'model.layers.1.self_attn.q_proj'" in message
    if not torch.cuda.is_available():  # every problem at once: the absent GPU too
        assert "device_map['']: GPU 0 is not on this machine" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_this_machine_lacks_is_an_error(tiny, no_reads):
    with pytest.raises(ConfigError, match=r"max_memory\[0\]: GPU 0 is not on this machine"):
        quantcore.from_pretrained(tiny, nf4(), device_map="auto", max_memory={0: "1GiB", "cpu": "1GiB"})
    with pytest.raises(ConfigError, match=r"device_map\['lm_head'\]: GPU 1 is not on this machine") as info:
        offload = nf4(llm_int8_enable_fp32_cpu_offload=True)
        quantcore.from_pretrained(tiny, offload, device_map={"": "cpu", "lm_head": 1})
    assert "llm_int8_enable_fp32_cpu_offload" not in str(info.value)  # allowed: only the device is wrong


def test_quantized_modules_on_disk_need_an_offload_folder(tiny, no_reads):
    with pytest.raises(ConfigError, match=r"(?s)offload_folder: the device map puts 7 modules: .*on disk, quantized"):
        quantcore.from_pretrained(tiny, int4(), device_map=ON_DISK)


def test_an_offload_folder_that_cannot_be_written_is_an_error(tiny, tmp_path, no_reads):
    (tmp_path / "a-file").write_text("in the way")
    with pytest.raises(ConfigError, match=r"offload_folder: .*a-file/offload' cannot hold the offloaded tensors"):
        quantcore.from_pretrained(tiny, int4(), device_map=ON_DISK, offload_folder=tmp_path / "a-file" / "offload")


def test_disk_offload_follows_the_backends_policy(tiny, tmp_path, no_reads):
    """bitsandbytes refuses offloaded modules unless they stay float32; on the CPU the rest is quantized."""
    with pytest.raises(ConfigError) as info:
        quantcore.from_pretrained(tiny, nf4(), device_map=ON_DISK, offload_folder=tmp_path / "offload")
    message = str(info.value)
    assert "llm_int8_enable_fp32_cpu_offload=True" in message and "puts 7 modules on disk (" in message
    assert "'model.layers.0." not in message  # the CPU modules of a map without GPUs are not offloaded
    assert not (tmp_path / "offload").exists()


def test_a_bad_map_lists_every_problem(tiny, no_reads):
    with pytest.raises(ConfigError, match=r"(?s)2 problems.*did you mean 'model.layers'.*'gpu7' is not a device"):
        quantcore.from_pretrained(tiny, device_map={"": "cpu", "model.layer": "cpu", "lm_head": "gpu7"})


# ---------------------------------------------------------------------- planning for GPUs this machine lacks
def test_fp32_offload_plan_keeps_the_offloaded_linears_in_float(deep):
    config = nf4(llm_int8_enable_fp32_cpu_offload=True)
    placement = plan_device_map(deep, config, "auto", max_memory={0: "4MiB", "cpu": "1GiB"}, check_devices=False)
    on_cpu = [name for name, device in placement.device_map.items() if device == "cpu"]
    assert 0 in placement.device_map.values() and "model.layers.15" in on_cpu
    assert set(placement.float_modules.values()) == {"device map: cpu (fp32 offload)"}
    assert "model.layers.15.mlp.down_proj" in placement.float_modules
    assert not any(name.startswith("model.layers.0.") for name in placement.float_modules)
    assert placement.report.record("model.layers.0.mlp.down_proj").action == "quantized"


@pytest.mark.parametrize("config, budgets", TWO_GPUS)
def test_the_two_gpu_budgets_fit_both_gpus(deep, config, budgets):
    """test_two_gpus_give_the_one_gpu_logits's budgets put the model on both GPUs, nowhere else."""
    placement = plan_device_map(deep, config(), "balanced", max_memory=budgets, check_devices=False)
    assert set(placement.device_map.values()) == {0, 1}
    assert placement.module_sizes[""] > parse_size(budgets[0])  # and one GPU is too small: the split is needed


def test_the_gpu_tests_premises_hold(deep, tmp_path):
    """The budgets the gpu tests use split the model as they expect (checked here, on any machine)."""
    balanced = plan_device_map(deep, nf4(), "balanced", max_memory={0: "4MiB", 1: "4MiB"}, check_devices=False)
    assert set(balanced.device_map.values()) == {0, 1}
    assert set(
        plan_device_map(deep, nf4(), "auto", max_memory={0: "1GiB"}, check_devices=False).device_map.values()
    ) == {0}
    quantcore.save_quantized(quantcore.from_pretrained(deep, nf4()), tmp_path / "q")
    saved = plan_device_map(tmp_path / "q", None, "balanced", max_memory={0: "4MiB", 1: "4MiB"}, check_devices=False)
    assert saved.device_map == balanced.device_map


def test_a_saved_quantized_checkpoint_cannot_be_kept_in_float(tiny, tmp_path):
    quantcore.save_quantized(
        quantcore.from_pretrained(tiny, nf4(llm_int8_enable_fp32_cpu_offload=True)), tmp_path / "q"
    )
    with pytest.raises(ConfigError, match="saved quantized on the CPU or disk next to GPUs"):
        plan_device_map(tmp_path / "q", device_map={"": 0, "model.layers.1": "cpu"}, check_devices=False)


# ---------------------------------------------------------------------- the FSDP2 + QLoRA script, without GPUs
def test_fsdp_qlora_dry_run_on_the_cpu():
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    script = ROOT / "bench" / "fsdp_qlora.py"
    done = subprocess.run(
        [sys.executable, str(script), "--dry-run-cpu", "--layers", "2", "--hidden", "64", "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "dry run ok" in done.stdout


# ---------------------------------------------------------------------- on GPUs
@pytest.mark.gpu
@needs_cuda
def test_auto_on_one_roomy_gpu_is_the_single_device_load(deep):
    whole = quantcore.from_pretrained(deep, nf4(), device_map={"": 0})
    auto = quantcore.from_pretrained(deep, nf4(), device_map="auto", max_memory={0: "1GiB"})
    assert auto.hf_device_map == {"": 0}
    assert torch.equal(logits(auto, "cuda:0"), logits(whole, "cuda:0"))


@pytest.mark.gpu
@needs_cuda
def test_one_gpu_with_fp32_cpu_offload(deep):
    from bitsandbytes.nn import Linear4bit

    budgets = {0: "4MiB", "cpu": "1GiB"}
    with pytest.raises(ConfigError, match="llm_int8_enable_fp32_cpu_offload=True"):
        quantcore.from_pretrained(deep, nf4(), device_map="auto", max_memory=budgets)
    config = nf4(llm_int8_enable_fp32_cpu_offload=True)
    model = quantcore.from_pretrained(deep, config, device_map="auto", max_memory=budgets)
    assert set(model.hf_device_map.values()) == {0, "cpu"}
    report = model.quantcore_report
    kept = [r.name for r in report.modules if r.rule == "device map: cpu (fp32 offload)"]
    assert kept and all(type(model.get_submodule(name)) is nn.Linear for name in kept)
    first = model.model.layers[0].mlp.down_proj
    assert isinstance(first, Linear4bit) and first.weight.device.type == "cuda"
    out = logits(model, "cuda:0")
    assert torch.isfinite(out).all()
    # the same quantization on one GPU, the kept modules in bf16 instead of float32: close
    reference = logits(quantcore.from_pretrained(deep, nf4(), device_map={"": 0}, skip_modules=kept), "cuda:0")
    assert (out - reference).abs().max() <= 0.05 * reference.abs().max()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[2]])
def test_one_gpu_and_disk_give_the_one_gpu_logits(deep, tmp_path, config):
    one = quantcore.from_pretrained(deep, config(), device_map={"": 0})
    device_map = {"": 0, "model.layers.14": "disk", "model.layers.15": "disk", "lm_head": "cpu"}
    offloaded = quantcore.from_pretrained(deep, config(), device_map=device_map, offload_folder=tmp_path / "offload")
    assert set(offloaded.hf_device_map.values()) == {0, "disk", "cpu"}
    torch.testing.assert_close(logits(offloaded, "cuda:0"), logits(one, "cuda:0"), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@needs_two_gpus
@pytest.mark.parametrize("config, budgets", TWO_GPUS)
def test_two_gpus_give_the_one_gpu_logits(deep, config, budgets):
    one = quantcore.from_pretrained(deep, config(), device_map={"": 0})
    two = quantcore.from_pretrained(deep, config(), device_map="balanced", max_memory=budgets)
    assert set(two.hf_device_map.values()) == {0, 1}
    torch.testing.assert_close(logits(two, "cuda:0"), logits(one, "cuda:0"), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@needs_two_gpus
def test_two_gpus_load_a_saved_nf4_checkpoint(deep, tmp_path):
    quantcore.save_quantized(quantcore.from_pretrained(deep, nf4()), tmp_path / "q")
    one = quantcore.from_pretrained(tmp_path / "q", device_map={"": 0})
    two = quantcore.from_pretrained(tmp_path / "q", device_map="balanced", max_memory={0: "4MiB", 1: "4MiB"})
    assert set(two.hf_device_map.values()) == {0, 1}
    torch.testing.assert_close(logits(two, "cuda:0"), logits(one, "cuda:0"), rtol=1e-2, atol=1e-2)
