"""Shared fixtures: small real models, and a clean plugin state around every test."""

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


class TinyLM(nn.Module):
    """A small decoder-shaped model: embeddings, blocks of attention and MLP linears, a tied head."""

    def __init__(self, vocab: int = 64, dim: int = 64, hidden: int = 128, layers: int = 2, tied: bool = True):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            block = nn.Module()
            block.self_attn = nn.Module()
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(block.self_attn, proj, nn.Linear(dim, dim, bias=False))
            block.mlp = nn.Module()
            block.mlp.up_proj = nn.Linear(dim, hidden)
            block.mlp.down_proj = nn.Linear(hidden, dim)
            block.norm = nn.LayerNorm(dim)
            self.layers.append(block)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.layers:
            a = block.self_attn
            h = h + a.o_proj(a.v_proj(h) + a.q_proj(h) * a.k_proj(h).sigmoid())
            h = h + block.mlp.down_proj(torch.relu(block.mlp.up_proj(block.norm(h))))
        return self.lm_head(h)


@pytest.fixture
def tiny_lm() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM()


@pytest.fixture
def untied_lm() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(tied=False)
