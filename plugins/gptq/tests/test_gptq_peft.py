"""LoRA (PEFT, a plain ``LoraConfig``) on GPTQ layers: QLoRA's recipe on a GPTQ base."""

from __future__ import annotations

import pytest
import torch
from quantcore_gptq import GPTQConfig, GPTQLinear

import quantcore

peft = pytest.importorskip("peft", reason="peft is not installed")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def gptq_llama(tiny_llama, calibration):
    quantcore.quantize(tiny_llama, GPTQConfig(bits=4, group_size=32), calibration=calibration)
    return tiny_llama


def test_lora_trains_adapters_on_a_frozen_gptq_base(gptq_llama, prompt):
    frozen = {k: v.clone() for k, v in gptq_llama.state_dict().items()}
    model = peft.get_peft_model(gptq_llama, peft.LoraConfig(r=8, target_modules=TARGETS))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, peft.tuners.lora.Linear) and isinstance(layer.base_layer, GPTQLinear)
    trainable = [p for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(input_ids=prompt, labels=prompt).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    after = {k.replace(".base_layer", ""): v for k, v in model.base_model.model.state_dict().items()}
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # the GPTQ tensors are untouched


def test_merging_into_gptq_is_refused_clearly(gptq_llama):
    model = peft.get_peft_model(gptq_llama, peft.LoraConfig(r=8, target_modules=["q_proj"], init_lora_weights=False))
    with pytest.raises(NotImplementedError, match="cannot re-quantize a new weight"):
        model.merge_and_unload()


def test_dequantize_gives_plain_linears_with_the_same_outputs(gptq_llama, prompt):
    with torch.no_grad():
        before = gptq_llama(input_ids=prompt).logits
    quantcore.dequantize(gptq_llama)
    assert not any(isinstance(m, GPTQLinear) for m in gptq_llama.modules())
    assert type(gptq_llama.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(gptq_llama(input_ids=prompt).logits, before, rtol=1e-3, atol=1e-3)
