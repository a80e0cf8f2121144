"""Fixtures for the bitsandbytes backend's tests: small real models, a clean plugin state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quantcore


@pytest.fixture(autouse=True)
def _fresh_plugins():
    quantcore.reset_plugins()
    yield
    quantcore.reset_plugins()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny_llama_config(**overrides):
    """A tiny LlamaConfig: every linear dimension a multiple of 32 (bitsandbytes' CPU 4-bit kernel)."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    values = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return transformers.LlamaConfig(**values)


@pytest.fixture
def tiny_llama():
    """A float32 LlamaForCausalLM with random weights, in eval mode."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(tiny_llama_config()).eval()


class Stack(nn.Module):
    """Two linears around a LayerNorm, and an output head."""

    def __init__(self, dim: int = 64, hidden: int = 128, bias: bool = True):
        super().__init__()
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.norm = nn.LayerNorm(hidden)
        self.down = nn.Linear(hidden, dim, bias=bias)
        self.lm_head = nn.Linear(dim, 32, bias=False)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.down(torch.relu(self.norm(self.up(x)))))


@pytest.fixture
def stack() -> Stack:
    torch.manual_seed(0)
    return Stack().eval()
