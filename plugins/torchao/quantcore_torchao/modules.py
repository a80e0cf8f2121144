"""``TorchAoLinear`` and ``TorchAoEmbedding``: a layer whose weight is a torchao tensor subclass.

torchao's ``quantize_`` swaps a layer's ``weight`` for a tensor subclass (``Int8Tensor``,
``Int4TilePackedTo4dTensor``, ``Float8Tensor``, ...) whose ``F.linear`` / ``F.embedding`` run
torchao's kernels. These modules hold such a weight under the name ``weight``, as the float layer
did, and are their own types so that quantcore (and other backends) can tell them from float layers.

In a state dict the weight is stored as its plain tensors, named as torchao's safetensors support
(and transformers 5.x) name them: ``_weight_qdata``, ``_weight_scale``, ... (one per inner tensor of
the subclass, from ``__tensor_flatten__``). :func:`rebuild_weight` puts them back together with the
non-tensor attributes (block size, dtype, ...) of a skeleton built from the same config.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TorchAoEmbedding", "TorchAoLinear", "flat_weight", "rebuild_weight", "weight_metadata"]


def flat_weight(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"qdata": ..., "scale": ...}``: the plain tensors a torchao weight is made of."""
    names, _ = weight.__tensor_flatten__()
    out = {}
    for name in names:
        inner = getattr(weight, name)
        if inner is not None:
            out[name] = inner
    return out


def rebuild_weight(skeleton: torch.Tensor, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A torchao weight like ``skeleton`` (same subclass and attributes) made of ``tensors``.

    Raises ``ValueError`` naming every missing, unexpected or mis-shaped tensor.
    """
    want = flat_weight(skeleton)
    problems = [f"missing tensor '_weight_{k}'" for k in want if k not in tensors]
    problems += [f"unexpected tensor '_weight_{k}'" for k in tensors if k not in want]
    for key, tensor in tensors.items():
        like = want.get(key)
        if like is None:
            continue
        if tuple(tensor.shape) != tuple(like.shape):
            problems.append(f"tensor '_weight_{key}' has shape {tuple(tensor.shape)}, expected {tuple(like.shape)}")
        elif tensor.dtype != like.dtype:
            problems.append(f"tensor '_weight_{key}' has dtype {tensor.dtype}, expected {like.dtype}")
    if problems:
        raise ValueError("; ".join(problems))
    _, context = skeleton.__tensor_flatten__()
    return type(skeleton).__tensor_unflatten__(dict(tensors), context, skeleton.shape, skeleton.stride())


def weight_metadata(weight: torch.Tensor) -> str:
    """torchao's safetensors metadata entry of one weight (what transformers reads to rebuild it)."""
    from torchao.prototype.safetensors.safetensors_utils import TensorSubclassAttributeJSONEncoder

    return json.dumps(weight, cls=TensorSubclassAttributeJSONEncoder)


class _TorchAoLayer(nn.Module):
    """Shared by the linear and the embedding: the flattened state dict and dequantization."""

    weight: nn.Parameter

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        # safetensors stores plain tensors only: write the weight's inner tensors, as torchao does.
        for name, tensor in flat_weight(self.weight).items():
            destination[f"{prefix}_weight_{name}"] = tensor if keep_vars else tensor.detach()
        for name, param in self._parameters.items():
            if name != "weight" and param is not None:
                destination[prefix + name] = param if keep_vars else param.detach()

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight this layer stands for, in its original dtype."""
        return self.weight.dequantize()

    def to_float(self) -> nn.Module:
        """The float layer this one stands for (``nn.Linear`` / ``nn.Embedding``), built without an init."""
        raise NotImplementedError


class TorchAoLinear(_TorchAoLayer):
    """``y = x @ W.T + b`` with ``W`` a torchao tensor subclass (its kernel runs in ``F.linear``)."""

    def __init__(self, in_features: int, out_features: int, weight: torch.Tensor, bias: nn.Parameter | None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def to_float(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.dequantized_weight())
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach())
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight={type(self.weight).__name__}"
        )


class TorchAoEmbedding(_TorchAoLayer):
    """A lookup table whose weight is a torchao tensor subclass (``F.embedding`` on it)."""

    def __init__(self, embedding: nn.Embedding, weight: torch.Tensor):
        super().__init__()
        self.num_embeddings = embedding.num_embeddings
        self.embedding_dim = embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.max_norm = embedding.max_norm
        self.norm_type = embedding.norm_type
        self.scale_grad_by_freq = embedding.scale_grad_by_freq
        self.sparse = embedding.sparse
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(
            ids, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )

    def to_float(self) -> nn.Embedding:
        embedding = nn.Embedding(
            self.num_embeddings,
            self.embedding_dim,
            padding_idx=self.padding_idx,
            max_norm=self.max_norm,
            norm_type=self.norm_type,
            scale_grad_by_freq=self.scale_grad_by_freq,
            sparse=self.sparse,
            device="meta",
        )
        embedding.weight = nn.Parameter(self.dequantized_weight())
        return embedding

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, weight={type(self.weight).__name__}"
