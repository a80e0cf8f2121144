"""``TorchAoQuantizer``: torchao's ``quantize_`` applied one module at a time under quantcore's rules.

quantcore chooses the modules (skip lists, overrides, default skips) and swaps them all or none;
for each one this quantizer copies the layer onto a throwaway float layer that shares its tensors,
runs ``torchao.quantization.quantize_`` on that, and wraps the resulting tensor-subclass weight in
a :class:`~quantcore_torchao.modules.TorchAoLinear` (or ``TorchAoEmbedding``). The original layer
is never touched, so a failure half-way leaves the model as it was.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from quantcore import BackendUnavailableError, Quantizer
from quantcore.quantizer import tensor_nbytes

from .config import TorchAoConfig
from .modules import TorchAoEmbedding, TorchAoLinear, _TorchAoLayer, rebuild_weight, weight_metadata

__all__ = ["TorchAoQuantizer", "config_for_module"]

# torchao configs whose kernels exist only on CUDA devices (torchao 0.17 / 0.18): refused up front on
# a machine without one, with what to use instead, rather than failing inside the first module.
_CUDA_ONLY = {
    "Int4WeightOnlyConfig": "int4 weight-only has CUDA kernels only; on the CPU use "
    "IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)) or Int8WeightOnlyConfig()",
    "Float8DynamicActivationFloat8WeightConfig": "float8 dynamic activation needs a CUDA GPU of compute "
    "capability 8.9 or more (H100, L4, ...); on the CPU use Float8WeightOnlyConfig()",
}


def config_for_module(quant_type: Any, name: str) -> Any:
    """The torchao config ``quant_type`` gives the module ``name`` (``None``: keep it in float).

    For ``FqnToConfig`` (and ``ModuleFqnToConfig``) the rules are torchao's: the exact module name,
    then the first ``"re:<regex>"`` key that matches the whole name, then ``"_default"``.
    """
    table = getattr(quant_type, "fqn_to_config", None)
    if table is None:
        return quant_type
    if name in table:
        return table[name]
    for key, value in table.items():
        if key.startswith("re:") and re.fullmatch(key[3:], name):
            return value
    return table.get("_default")


def _cuda_only_reason(config: Any) -> str | None:
    name = type(config).__name__
    if name == "Int4WeightOnlyConfig" and str(getattr(config, "int4_packing_format", "")).endswith("plain_int32"):
        return None  # XPU / NPU format: torchao names the device it needs itself
    return _CUDA_ONLY.get(name)


class TorchAoQuantizer(Quantizer):
    """Quantizes ``nn.Linear`` (and ``nn.Embedding`` when asked) with torchao, as :class:`TorchAoConfig` says."""

    config: TorchAoConfig
    replaces: tuple[type[nn.Module], ...] = (nn.Linear,)
    produces = (TorchAoLinear, TorchAoEmbedding)

    def __init__(self, config: TorchAoConfig):
        super().__init__(config)
        if config.include_input_output_embeddings:
            self.replaces = (nn.Linear, nn.Embedding)
        self._sizes: dict[tuple, tuple[int, str | None]] = {}

    # ------------------------------------------------------------------ environment and labels
    def check_environment(self) -> None:
        try:
            import torchao  # noqa: F401
        except ImportError as exc:
            hint = "pip install 'quantcore[torchao]'"
            raise BackendUnavailableError(f"torchao cannot be imported: {exc}; {hint}") from None
        if torch.cuda.is_available():
            return
        for config in self._configs():
            reason = _cuda_only_reason(config)
            if reason:
                raise BackendUnavailableError(f"{type(config).__name__} cannot run without CUDA: {reason}")

    def _configs(self) -> list[Any]:
        table = getattr(self.config.quant_type, "fqn_to_config", None)
        if table is None:
            return [self.config.quant_type]
        return [c for c in table.values() if c is not None]

    def describe(self) -> str:
        return self.config.describe()

    def can_replace(self, module: nn.Module) -> bool:
        return self.unsupported_reason(module) is None

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if self.is_quantized_module(module):
            return f"already a {type(module).__name__}"
        if not isinstance(module, self.replaces):
            return f"{type(module).__name__} not supported by {self.describe()}"
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            return f"{type(module).__name__} has no weight tensor"
        # Only a float weight: integer weights, or a torchao subclass that transformers' own torchao
        # path left on a plain nn.Linear, are quantized already.
        if type(weight.data) is not torch.Tensor:
            return f"weight is already a {type(weight.data).__name__}"
        if not weight.is_floating_point():
            return f"weight dtype {weight.dtype} is not floating point"
        return self._sized(module)[1]

    # ------------------------------------------------------------------ sizes
    def quantized_nbytes(self, module: nn.Module) -> int:
        size, reason = self._sized(module)
        if reason is not None:
            raise ValueError(reason)
        bias = getattr(module, "bias", None)
        return size + (bias.numel() * bias.element_size() if isinstance(bias, torch.Tensor) else 0)

    def _sized(self, module: nn.Module) -> tuple[int, str | None]:
        """``(bytes of the quantized weight, None)``, or ``(0, why torchao cannot take this weight)``.

        Exact: torchao quantizes a meta copy (no data, no time) and its inner tensors are counted.
        One trial per weight shape and dtype.
        """
        weight = module.weight
        key = (type(module), tuple(weight.shape), weight.dtype)
        found = self._sizes.get(key)
        if found is None:
            found = self._sizes[key] = self._try_size(module)
        return found

    def _try_size(self, module: nn.Module) -> tuple[int, str | None]:
        config = self._configs()[0] if self._configs() else None
        if config is None:
            return module.weight.numel() * module.weight.element_size(), None
        try:
            return tensor_nbytes(_probe(module, config, "meta")), None
        except Exception as exc:
            error = exc
        if _cuda_only_reason(config):
            if not torch.cuda.is_available():
                # its packing runs on CUDA only: size it from the format (check_environment refuses
                # to run it here)
                return _formula_nbytes(module.weight, config), None
            try:  # some CUDA packings have no meta kernel: quantize a zero weight of the same shape
                return tensor_nbytes(_probe(module, config, "cuda")), None
            except Exception as exc:
                error = exc
        return 0, f"torchao {type(config).__name__} cannot take a {tuple(module.weight.shape)} weight: {error}"

    # ------------------------------------------------------------------ building and loading
    def create_quantized_module(self, module: nn.Module, name: str) -> nn.Module:
        config = config_for_module(self.config.quant_type, name)
        if config is None:
            raise ValueError(f"{type(self.config.quant_type).__name__} gives module {name!r} no config")
        layer = _float_copy(module, on_meta=module.weight.is_meta)
        _apply(layer, config)
        weight = layer.weight.detach()
        if isinstance(module, nn.Embedding):
            return TorchAoEmbedding(module, weight)
        bias = module.bias
        if bias is not None:
            bias = nn.Parameter(bias.detach(), requires_grad=bias.requires_grad)
        return TorchAoLinear(module.in_features, module.out_features, weight, bias)

    def load_quantized_state(
        self, module: nn.Module, state: Mapping[str, torch.Tensor], device: torch.device | str | None = None
    ) -> nn.Module:
        assert isinstance(module, _TorchAoLayer)
        inner = {k.removeprefix("_weight_"): v for k, v in state.items() if k.startswith("_weight_")}
        rest = {k: v for k, v in state.items() if not k.startswith("_weight_")}
        expected = {n for n, p in module._parameters.items() if n != "weight" and p is not None}
        problems = [f"missing tensor {k!r}" for k in sorted(expected - set(rest))]
        problems += [f"unexpected tensor {k!r}" for k in sorted(set(rest) - expected)]
        try:
            weight = rebuild_weight(module.weight, {k: v.to(device) if device else v for k, v in inner.items()})
        except ValueError as exc:
            problems.append(str(exc))
        if problems:
            raise ValueError("; ".join(problems))
        module.weight = nn.Parameter(weight, requires_grad=False)
        for key, value in rest.items():
            like = module._parameters[key]
            assert like is not None
            module._parameters[key] = nn.Parameter(value.to(device=device, dtype=like.dtype), requires_grad=False)
        return module

    @classmethod
    def checkpoint_metadata(cls, modules: Mapping[str, nn.Module]) -> dict[str, str]:
        """torchao's safetensors metadata (what transformers reads to rebuild the weights):
        ``"<module>.weight"`` -> the weight's subclass and attributes, and ``"tensor_names"``."""
        metadata = {f"{name}.weight": weight_metadata(m.weight) for name, m in modules.items()}
        metadata["tensor_names"] = json.dumps(sorted(metadata))
        return metadata

    @classmethod
    def dequantize_module(cls, module: nn.Module) -> nn.Module:
        assert isinstance(module, _TorchAoLayer)
        return module.to_float()


def _float_copy(module: nn.Module, *, on_meta: bool) -> nn.Module:
    """A layer of ``module``'s type that shares its tensors (or has meta ones): what ``quantize_`` changes."""
    weight = module.weight
    if isinstance(module, nn.Embedding):
        copy: nn.Module = nn.Embedding(module.num_embeddings, module.embedding_dim, device="meta", dtype=weight.dtype)
    else:
        copy = nn.Linear(module.in_features, module.out_features, bias=False, device="meta", dtype=weight.dtype)
    if not on_meta:
        copy.weight = nn.Parameter(weight.detach(), requires_grad=False)
    return copy


def _probe(module: nn.Module, config: Any, device: str) -> torch.Tensor:
    """The weight torchao makes of a weight shaped like ``module``'s, on ``device`` (zeros unless meta)."""
    layer = _float_copy(module, on_meta=True)
    if device != "meta":
        zeros = torch.zeros(module.weight.shape, dtype=module.weight.dtype, device=device)
        layer.weight = nn.Parameter(zeros, requires_grad=False)
    _apply(layer, config)
    return layer.weight


def _apply(layer: nn.Module, config: Any) -> None:
    from torchao.quantization import quantize_

    quantize_(layer, config, filter_fn=lambda m, fqn: m is layer)


def _formula_nbytes(weight: torch.Tensor, config: Any) -> int:
    """Bytes of a weight in a format that cannot be built here (its packing runs on CUDA only).

    int4: two codes per byte, and one scale and one zero point per group in the weight's dtype.
    float8: one byte per value, and a float32 scale per row (``PerRow``) or for the whole tensor.
    """
    out_features, in_features = weight.shape
    name = type(config).__name__
    if name == "Int4WeightOnlyConfig":
        groups = -(-in_features // config.group_size)
        return out_features * in_features // 2 + 2 * out_features * groups * weight.element_size()
    if name == "Float8DynamicActivationFloat8WeightConfig":
        granularity = config.granularity
        if isinstance(granularity, (list, tuple)):
            granularity = granularity[-1]
        scales = out_features if type(granularity).__name__ == "PerRow" else 1
        return out_features * in_features + 4 * scales
    raise ValueError(f"cannot size {name} for a {tuple(weight.shape)} weight on this machine")
