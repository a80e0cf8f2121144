"""Fixtures for the GPTQ backend: a tiny real Llama (transformers), calibration batches, clean plugins."""

from __future__ import annotations

import pytest
import torch

import quantcore

CUDA = torch.cuda.is_available()


def pytest_configure(config):
    # Registered here too, so the plugin's tests also run outside the quantcore repository.
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: real models or big tensors (deselect with -m 'not slow')")


@pytest.fixture(autouse=True)
def _fresh_plugins():
    quantcore.reset_plugins()
    yield
    quantcore.reset_plugins()


VOCAB = 128


@pytest.fixture
def tiny_llama():
    """A 2-layer LlamaForCausalLM (hidden 64, MLP 128, GQA 4/2 heads) with seeded random weights."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture
def calibration() -> list[torch.Tensor]:
    """8 batches of 32 random token ids."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (1, 32), generator=gen) for _ in range(8)]


@pytest.fixture
def prompt() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
