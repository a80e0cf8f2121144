"""Fixtures for the torch_wo backend: small real models, devices, and a clean plugin state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quantcore

CUDA = torch.cuda.is_available()


def pytest_configure(config):
    # Registered here too, so the plugin's tests also run outside the quantcore repository.
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


@pytest.fixture(autouse=True)
def _fresh_plugins():
    quantcore.reset_plugins()
    yield
    quantcore.reset_plugins()


@pytest.fixture(
    params=[
        pytest.param("cpu", id="cpu"),
        pytest.param(
            "cuda",
            id="cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not CUDA, reason="needs a CUDA device"),
            ],
        ),
    ]
)
def device(request) -> str:
    """Each test taking ``device`` runs on the CPU, and on CUDA where there is one (marked ``gpu``)."""
    return request.param


@pytest.fixture
def gaussian_linear():
    """A factory of ``nn.Linear`` layers with N(0, 0.02) weights and biases, like a trained transformer's."""

    def make(
        in_features: int, out_features: int, *, bias: bool = True, dtype=torch.float32, device="cpu", seed: int = 0
    ) -> nn.Linear:
        generator = torch.Generator().manual_seed(seed)
        linear = nn.Linear(in_features, out_features, bias=bias)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(out_features, in_features, generator=generator) * 0.02)
            if bias:
                linear.bias.copy_(torch.randn(out_features, generator=generator) * 0.02)
        return linear.to(device=device, dtype=dtype)

    return make


class TinyMLPModel(nn.Module):
    """A small decoder-shaped model: embedding, two blocks of attention-like and MLP linears, a head.

    ``hidden=96`` is not a multiple of 64 or 128, so int4 groups there are padded.
    """

    def __init__(self, vocab: int = 50, dim: int = 64, hidden: int = 96, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            block = nn.Module()
            block.q_proj = nn.Linear(dim, dim, bias=False)
            block.o_proj = nn.Linear(dim, dim)
            block.up_proj = nn.Linear(dim, hidden)
            block.down_proj = nn.Linear(hidden, dim)
            block.norm = nn.LayerNorm(dim)
            self.layers.append(block)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.layers:
            h = h + block.o_proj(torch.tanh(block.q_proj(block.norm(h))))
            h = h + block.down_proj(torch.relu(block.up_proj(block.norm(h))))
        return self.lm_head(h)


@pytest.fixture
def tiny_model() -> TinyMLPModel:
    torch.manual_seed(0)
    return TinyMLPModel().eval()


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
