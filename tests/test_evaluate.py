"""Scoring through the decode path (``quantcore.evaluate.decode_scores``), on tiny real Llamas."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quantcore.evaluate import EvaluationError, decode_perplexity, decode_scores, perplexity  # noqa: E402


def tiny_llama(dtype=torch.float32, seed=0):
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def window_scores(model, ids):
    with torch.inference_mode():
        logits = model(ids.view(1, -1)).logits[0, :-1].float()
    return torch.logsumexp(logits, -1) - logits.gather(1, ids[1:, None])[:, 0], logits.argmax(-1)


class WordTokenizer:
    """Token ids from the words of a text (what the scoring functions need of a tokenizer)."""

    def __call__(self, text, return_tensors="pt"):
        ids = [sum(map(ord, word)) % 96 for word in text.split()]
        return type("Encoding", (), {"input_ids": torch.tensor([ids])})()


def test_the_decode_path_scores_each_token_as_one_window_does():
    # In fp32 the cached one-token steps give the window's log-likelihoods to float rounding, and
    # the same greedy token at every step: the scores differ only where the layers' kernels do.
    model = tiny_llama()
    ids = torch.randint(0, 96, (48,), generator=torch.Generator().manual_seed(1))
    nll, predicted = window_scores(model, ids)
    scores = decode_scores(model, ids)
    assert scores["nll"].shape == (47,) and scores["fullgraph"] is None
    torch.testing.assert_close(scores["nll"], nll, rtol=0, atol=1e-4)
    assert torch.equal(scores["predicted"], predicted)
    # not a constant: another model scores the same tokens otherwise
    assert (decode_scores(tiny_llama(seed=1), ids)["nll"] - nll).abs().mean() > 0.01


def test_a_long_decode_shows_its_progress_where_asked(capsys):
    model = tiny_llama()
    ids = torch.randint(0, 96, (12,), generator=torch.Generator().manual_seed(4))
    decode_scores(model, ids, progress=True)
    err = capsys.readouterr().err
    assert "decoding" in err and "/11 " in err  # a bar over the 11 predicted tokens, on stderr
    decode_scores(model, ids, progress=False)
    assert capsys.readouterr().err == ""


def test_the_compiled_decode_path_scores_as_the_eager_one():
    model = tiny_llama()
    ids = torch.randint(0, 96, (24,), generator=torch.Generator().manual_seed(2))
    eager = decode_scores(model, ids)
    compiled = decode_scores(model, ids, compiled=True)
    torch._dynamo.reset()
    assert compiled["fullgraph"] is True  # the whole step traced, with the cache's tensors static
    torch.testing.assert_close(compiled["nll"], eager["nll"], rtol=0, atol=1e-4)
    assert torch.equal(compiled["predicted"], eager["predicted"])


def test_decode_perplexity_is_the_window_perplexity_in_fp32_and_refuses_one_token():
    model, tokenizer = tiny_llama(), WordTokenizer()
    text = "to be or not to be that is the question whether tis nobler in the mind to suffer " * 3
    window = perplexity(model, tokenizer, text, max_tokens=40)
    decoded = decode_perplexity(model, tokenizer, text, max_tokens=40)
    assert decoded["tokens"] == window["tokens"] == 39
    assert decoded["perplexity"] == pytest.approx(window["perplexity"], rel=1e-4)
    with pytest.raises(EvaluationError, match="at least two tokens"):
        decode_perplexity(model, tokenizer, "alone")


@pytest.mark.parametrize("bits", [8, 4])
def test_torch_wo_decodes_through_its_one_row_kernels_as_its_window_scores(bits, monkeypatch):
    # The decode path's one-row steps run torch_wo's fused kernels (the window, 40 rows, dequantizes):
    # counted here, and their log-likelihoods are the dequantize path's within bf16 rounding.
    pytest.importorskip("quantcore_torch")
    from quantcore_torch import kernels

    import quantcore

    model = tiny_llama(torch.bfloat16)
    quantcore.quantize(model, {"quant_method": "torch_wo", "bits": bits, "group_size": 32}, progress=False)
    ids = torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(3))
    nll, predicted = window_scores(model, ids)
    name = "int8_weight_only_linear" if bits == 8 else "int4_weight_only_linear"
    rows, real = [], getattr(kernels, name)
    monkeypatch.setattr(kernels, name, lambda x, *a, **k: rows.append(x.shape[:-1].numel()) or real(x, *a, **k))
    scores = decode_scores(model, ids)
    assert rows and set(rows) == {1}  # every linear of every step: one row
    assert (scores["nll"] - nll).abs().mean() < 0.02
    assert (scores["predicted"] == predicted).double().mean() > 0.9
