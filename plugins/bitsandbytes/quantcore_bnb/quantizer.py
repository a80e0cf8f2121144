"""``BitsAndBytesQuantizer``: ``nn.Linear`` -> bitsandbytes ``Linear4bit`` (FP4/NF4) or ``Linear8bitLt``.

Weights are quantized on the device they are on (CPU or CUDA), with the very calls bitsandbytes'
own ``.to(device)`` makes, so the quantized tensors equal those of transformers' bitsandbytes path.
A float module on the meta device gives a meta skeleton with the quantized shapes, which
:meth:`BitsAndBytesQuantizer.load_quantized_state` fills from a saved state dict without
quantizing again.

Accuracy, measured by ``tests/test_quantizer.py`` as the relative error ``|y - y_float| / |y_float|``
of an ``nn.Linear(256, 512)`` (its default init) on Gaussian inputs, float32 or bfloat16: int8
about 0.008, NF4 about 0.092, FP4 about 0.110; double quant changes these by under 0.1 %. The
documented bounds, which the tests check: int8 < 0.02, NF4 < 0.12, FP4 < 0.14, NF4 < FP4.

On the CPU, bitsandbytes runs 4-bit and int8 layers, but not the forward of
``llm_int8_has_fp16_weight=True`` layers (no CPU kernel for ``int8_double_quant``): those need CUDA.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import QuantState
from bitsandbytes.nn import Linear4bit, Linear8bitLt
from torch import nn

from quantcore import ConfigError, Quantizer

from .layers import make_linear4bit, make_linear8bit, packed_weight_shape
from .sizes import BLOCKSIZE, linear4bit_nbytes, linear8bit_nbytes

if TYPE_CHECKING:
    from .config import BitsAndBytesConfig

__all__ = ["BitsAndBytesQuantizer"]

_META = torch.device("meta")


class BitsAndBytesQuantizer(Quantizer):
    """Quantizes exactly-``nn.Linear`` modules as a :class:`~quantcore_bnb.BitsAndBytesConfig` says.

    Subclasses of ``nn.Linear`` are left alone: some (``nn.MultiheadAttention``'s ``out_proj``)
    are read by their parent as plain weights, which a packed 4-bit weight would break.
    """

    replaces: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear,)
    produces: ClassVar[tuple[type[nn.Module], ...]] = (Linear4bit, Linear8bitLt)

    config: BitsAndBytesConfig

    def __init__(self, config: BitsAndBytesConfig):
        if not config.is_quantizable():
            raise ConfigError(
                [("load_in_4bit", "the config quantizes nothing: set load_in_4bit or load_in_8bit to true")],
                title="invalid BitsAndBytesConfig",
            )
        super().__init__(config)
        self._four_bit = config.load_in_4bit
        if self._four_bit:
            label = config.bnb_4bit_quant_type + (" dq" if config.bnb_4bit_use_double_quant else "")
        else:
            label = "int8"
        self._label = f"bitsandbytes {label}"

    def offload_policy(self) -> str:
        """``"float"`` with ``llm_int8_enable_fp32_cpu_offload`` (offloaded modules stay float32), else ``"refuse"``."""
        return "float" if self.config.llm_int8_enable_fp32_cpu_offload else "refuse"

    def describe(self) -> str:
        """``"bitsandbytes nf4"``, ``"bitsandbytes fp4"`` or ``"bitsandbytes int8"`` (+ ``" dq"``)."""
        return self._label

    def can_replace(self, module: nn.Module) -> bool:
        """Only modules whose type is exactly ``nn.Linear``."""
        return type(module) is nn.Linear

    def quantized_nbytes(self, module: nn.Module) -> int:
        """Exact bytes of the quantized layer, from shapes (see :mod:`quantcore_bnb.sizes`)."""
        bias = module.bias
        bias_nbytes = bias.numel() * bias.element_size() if bias is not None else 0
        c = self.config
        if self._four_bit:
            return linear4bit_nbytes(
                module.out_features,
                module.in_features,
                double_quant=c.bnb_4bit_use_double_quant,
                quant_storage=c.bnb_4bit_quant_storage,
                bias_nbytes=bias_nbytes,
            )
        return linear8bit_nbytes(
            module.out_features,
            module.in_features,
            has_fp16_weights=c.llm_int8_has_fp16_weight,
            weight_itemsize=module.weight.element_size(),
            bias_nbytes=bias_nbytes,
        )

    # ------------------------------------------------------------------ building
    def create_quantized_module(self, module: nn.Module, name: str) -> nn.Module:
        """The bitsandbytes layer for ``module``: quantized where its weight is, or a meta skeleton."""
        weight = module.weight
        if self._four_bit:
            return self._linear4bit(module, weight)
        return self._linear8bit(module, weight)

    def _linear4bit(self, module: nn.Module, weight: torch.Tensor) -> Linear4bit:
        c = self.config
        if weight.device == _META:
            packed, state = (
                _meta_tensor(
                    packed_weight_shape(module.out_features, module.in_features, c.bnb_4bit_quant_storage),
                    c.bnb_4bit_quant_storage,
                ),
                None,
            )
        else:
            packed, state = bnb.functional.quantize_4bit(
                weight.detach().contiguous(),
                blocksize=BLOCKSIZE,
                compress_statistics=c.bnb_4bit_use_double_quant,
                quant_type=c.bnb_4bit_quant_type,
                quant_storage=c.bnb_4bit_quant_storage,
            )
        return make_linear4bit(
            module.in_features,
            module.out_features,
            packed,
            state,
            module.bias,
            compute_dtype=c.bnb_4bit_compute_dtype,
            quant_type=c.bnb_4bit_quant_type,
            compress_statistics=c.bnb_4bit_use_double_quant,
            quant_storage=c.bnb_4bit_quant_storage,
        )

    def _linear8bit(self, module: nn.Module, weight: torch.Tensor) -> Linear8bitLt:
        c = self.config
        fp16_weights = c.llm_int8_has_fp16_weight
        if fp16_weights:
            data, scb = weight, None
        elif weight.device == _META:
            data = _meta_tensor(tuple(weight.shape), torch.int8)
            scb = _meta_tensor((weight.shape[0],), torch.float32)
        else:
            # What Int8Params._quantize does: row-wise absmax int8 of the float16 weight.
            data, scb, _ = bnb.functional.int8_vectorwise_quant(weight.detach().contiguous().to(torch.float16))
        return make_linear8bit(
            module.in_features,
            module.out_features,
            data,
            scb,
            module.bias,
            threshold=c.llm_int8_threshold,
            has_fp16_weights=fp16_weights,
        )

    # ------------------------------------------------------------------ loading
    def load_quantized_state(
        self, module: nn.Module, state: Mapping[str, torch.Tensor], device: torch.device | str | None = None
    ) -> nn.Module:
        """A loaded layer from ``state`` (a ``state_dict()`` of a layer this backend made), no re-quantizing.

        ``module`` is the skeleton :meth:`create_quantized_module` made from a meta module; the
        result is a new module on ``device`` (default: where ``state``'s weight is). A missing,
        unexpected or mis-shaped tensor, or a checkpoint of another format, raises ``ValueError``.
        """
        if "weight" not in state:
            raise ValueError("missing tensor 'weight'")
        if device is None:
            device = state["weight"].device
        device = torch.device(device)
        bias = _load_bias(module, state, device)
        if isinstance(module, Linear4bit):
            return _load_linear4bit(module, state, bias, device)
        if isinstance(module, Linear8bitLt):
            return _load_linear8bit(module, state, bias, device)
        raise ValueError(f"expected a Linear4bit or Linear8bitLt skeleton, got {type(module).__name__}")

    # ------------------------------------------------------------------ dequantizing
    @classmethod
    def dequantize_module(cls, module: nn.Module) -> nn.Linear:
        """An ``nn.Linear`` with the dequantized weight (and the bias): :func:`dequantize_layer`."""
        return dequantize_layer(module)


def dequantize_layer(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` with the dequantized weight (and the bias), on the module's device.

    A 4-bit layer gives back its original float dtype; an 8-bit layer the bias dtype, or
    float32 without a bias (LLM.int8() does not record the original dtype).
    """
    bias = module.bias
    if isinstance(module, Linear4bit):
        data, state = module.weight.data, module.weight.quant_state
        if state is None:
            raise ValueError("the 4-bit layer holds no quantization state (a skeleton never loaded?)")
        if getattr(state, "packing_format_for_cpu", False):
            # A CPU forward on an AVX512-BF16 machine repacks the weight in place; undo it on
            # copies, as Linear4bit's own state_dict() does on the module itself.
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            data, state = _convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
            _repair_absmax_layout(state)
        weight = bnb.functional.dequantize_4bit(data, state)
    elif isinstance(module, Linear8bitLt):
        if module.state.has_fp16_weights:
            weight = module.weight.data
        else:
            scb = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
            weight = bnb.functional.int8_vectorwise_dequant(module.weight.data, scb)
            weight = weight.to(bias.dtype if bias is not None else torch.float32)
    else:
        raise TypeError(f"BitsAndBytesQuantizer cannot dequantize a {type(module).__name__}")
    linear = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(linear)
    linear.in_features, linear.out_features = module.in_features, module.out_features
    linear.weight = nn.Parameter(weight.reshape(module.out_features, module.in_features).clone())
    # Linear4bit.forward casts its bias to the compute dtype in place: give it back in the weight's.
    linear.bias = nn.Parameter(bias.detach().to(weight.dtype, copy=True)) if bias is not None else None
    return linear


def _load_linear4bit(
    module: Linear4bit, state: Mapping[str, torch.Tensor], bias: torch.Tensor | None, device: torch.device
) -> Linear4bit:
    stats = {k[len("weight.") :]: v for k, v in state.items() if k.startswith("weight.")}
    unexpected = sorted(set(state) - {"weight", "bias"} - {f"weight.{k}" for k in stats})
    if unexpected:
        raise ValueError(f"unexpected tensor(s) {', '.join(map(repr, unexpected))}")
    weight = state["weight"]
    _check_tensor("weight", weight, module.weight)
    try:
        quant_state = QuantState.from_dict(stats, device=device)
    except (ValueError, KeyError, AssertionError) as exc:
        raise ValueError(f"the quantization statistics 'weight.*' are incomplete or invalid: {exc}") from None
    _repair_absmax_layout(quant_state)
    expected = (module.weight.quant_type, module.weight.compress_statistics)
    found = (quant_state.quant_type, quant_state.nested)
    if found != expected:
        raise ValueError(f"tensor 'weight' was saved as {_format4(*found)} but the config says {_format4(*expected)}")
    if quant_state.shape != (module.out_features, module.in_features):
        raise ValueError(
            f"tensor 'weight' was saved for shape {tuple(quant_state.shape)}, "
            f"expected {(module.out_features, module.in_features)}"
        )
    return make_linear4bit(
        module.in_features,
        module.out_features,
        weight.to(device),
        quant_state,
        bias,
        compute_dtype=module.compute_dtype,
        quant_type=quant_state.quant_type,
        compress_statistics=quant_state.nested,
        quant_storage=module.quant_storage,
        blocksize=quant_state.blocksize,
    )


def _load_linear8bit(
    module: Linear8bitLt, state: Mapping[str, torch.Tensor], bias: torch.Tensor | None, device: torch.device
) -> Linear8bitLt:
    fp16_weights = module.state.has_fp16_weights
    allowed = {"weight", "bias"} if fp16_weights else {"weight", "bias", "SCB", "weight_format"}
    unexpected = sorted(set(state) - allowed)
    if unexpected:
        raise ValueError(f"unexpected tensor(s) {', '.join(map(repr, unexpected))}")
    weight = state["weight"]
    _check_tensor("weight", weight, module.weight)
    scb = None
    if not fp16_weights:
        if "SCB" not in state:
            raise ValueError("missing tensor 'SCB' (the int8 weight's row scales)")
        scb = state["SCB"]
        if not isinstance(scb, torch.Tensor) or scb.shape != (module.out_features,):
            raise ValueError(
                f"tensor 'SCB' has shape {tuple(getattr(scb, 'shape', ()))}, expected {(module.out_features,)}"
            )
        scb = scb.to(device)
        fmt = state.get("weight_format")
        if fmt is not None and int(fmt) != 0:
            raise ValueError(f"tensor 'weight_format' is {int(fmt)}: only the row-major format (0) loads")
    return make_linear8bit(
        module.in_features,
        module.out_features,
        weight.to(device),
        scb,
        bias,
        threshold=module.state.threshold,
        has_fp16_weights=fp16_weights,
    )


@functools.lru_cache(maxsize=1024)
def _meta_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    # Meta tensors hold no data: skeletons of one shape can start from the same one, since each
    # module wraps it in its own Parameter (``_make_subclass`` makes a new tensor object).
    return torch.empty(shape, dtype=dtype, device=_META)


def _repair_absmax_layout(state: QuantState) -> None:
    """Put back the scales of a layer saved after a CPU forward into bitsandbytes' own layout.

    On an AVX512-BF16 CPU, ``Linear4bit.forward`` repacks the layer for its CPU kernel: the
    per-block scales become a bfloat16 ``(in / 64, out)`` matrix. ``state_dict()`` undoes the
    repacking, but (bitsandbytes 0.50.2) leaves that matrix as it is when there is no double
    quant, so every later use reads the scales in the wrong order. The flat, row-major float32
    vector is that matrix transposed (the bfloat16 rounding cannot be undone).
    """
    absmax = state.absmax
    if not state.nested and absmax.dim() == 2:
        state.absmax = absmax.T.reshape(-1).float()


def _format4(quant_type: str, nested: bool) -> str:
    return quant_type + (" with double quant" if nested else " without double quant")


def _check_tensor(name: str, tensor: torch.Tensor, expected: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"tensor {name!r} is a {type(tensor).__name__}, not a tensor")
    if tensor.shape != expected.shape or tensor.dtype != expected.dtype:
        raise ValueError(
            f"tensor {name!r} has shape {tuple(tensor.shape)} and dtype {tensor.dtype}, "
            f"expected {tuple(expected.shape)} and {expected.dtype}"
        )


def _load_bias(module: nn.Module, state: Mapping[str, torch.Tensor], device: torch.device) -> torch.Tensor | None:
    expected = module.bias
    if expected is None:
        if "bias" in state:
            raise ValueError("unexpected tensor 'bias' (the layer has no bias)")
        return None
    if "bias" not in state:
        raise ValueError("missing tensor 'bias'")
    bias = state["bias"]
    if not isinstance(bias, torch.Tensor) or bias.shape != expected.shape:
        raise ValueError(
            f"tensor 'bias' has shape {tuple(getattr(bias, 'shape', ()))}, expected {tuple(expected.shape)}"
        )
    return nn.Parameter(bias.to(device), requires_grad=expected.requires_grad)
