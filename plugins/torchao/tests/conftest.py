"""Fixtures for the torchao backend's tests: small real models and a clean plugin state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quantcore

CUDA = torch.cuda.is_available()


def pytest_configure(config):
    # Registered here too, so the plugin's tests also run outside the quantcore repository.
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_plugins():
    quantcore.reset_plugins()
    yield
    quantcore.reset_plugins()


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
def make_stack() -> type[Stack]:
    """The Stack class, for tests that need other sizes."""
    return Stack


@pytest.fixture
def stack() -> Stack:
    torch.manual_seed(0)
    return Stack().eval()


def _tiny_llama_config(**overrides):
    """A tiny LlamaConfig whose linear dimensions suit every torchao format (multiples of 128)."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    values = dict(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
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
    return transformers.LlamaForCausalLM(_tiny_llama_config()).eval()


@pytest.fixture
def tiny_llama_config():
    """``tiny_llama_config(**overrides)``: the LlamaConfig of ``tiny_llama``."""
    return _tiny_llama_config
