"""``QuantizedLinear``: the base class that makes a backend's quantized linear layer look like ``nn.Linear``.

Libraries that adapt linear layers (PEFT's LoRA, transformers' helpers) recognise them with
``isinstance(module, nn.Linear)`` and read ``in_features``, ``out_features``, ``weight`` and
``bias``. A quantized layer that subclasses :class:`QuantizedLinear` passes that test without
holding a float weight:

- ``weight`` is a *view*: reading it dequantizes (:meth:`QuantizedLinear.dequantize`) into a new
  tensor, so its shape, dtype and device are right and ``F.linear(x, layer.weight)`` matches the
  layer; nothing is kept, so memory stays quantized.
- writing through the view's ``.data`` (``layer.weight.data = w``, ``layer.weight.data += delta``,
  ``layer.weight.data.copy_(w)``: how PEFT merges an adapter, the last since PEFT 0.22's safe
  merge) re-quantizes the written weight into the layer (:meth:`QuantizedLinear.requantize_`); a
  backend that cannot do that raises a clear error.
- :func:`linear_recomputing_weight` is the matmul to use when gradients flow (training adapters
  on a frozen quantized base): its backward dequantizes the weight again instead of keeping the
  float weight of every layer alive until the backward pass.

The core's :class:`~quantcore.Quantizer` never replaces a ``QuantizedLinear`` (it is already
quantized), whatever backend asks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["QuantizedLinear", "QuantizedWeightView", "linear_recomputing_weight"]


class QuantizedWeightView(torch.Tensor):
    """The float weight a :class:`QuantizedLinear` stands for, computed when read.

    A plain tensor for every operation (results are ordinary tensors); only ``.data`` differs:
    assigning it re-quantizes the layer, and reading it gives a :class:`QuantizedWeightData`,
    whose in-place methods (``layer.weight.data.copy_(w)``) re-quantize the layer too. Writes
    that bypass ``.data`` (``layer.weight.add_(x)``) change this copy only, as with any computed
    tensor.
    """

    _layer: QuantizedLinear

    # Operations on the view give plain tensors and skip the subclass machinery (speed).
    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    @classmethod
    def of(cls, layer: QuantizedLinear, weight: torch.Tensor) -> QuantizedWeightView:
        """Wrap ``weight`` (a freshly dequantized tensor, or a view's) as ``cls`` of ``layer``."""
        view = torch.Tensor._make_subclass(cls, weight.detach(), False)
        view._layer = layer
        return view

    @property
    def data(self) -> torch.Tensor:
        return QuantizedWeightData.of(self._layer, self)

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        self._layer.requantize_(value)


def _writing_through(name: str):
    """``Tensor.<name>`` on a :class:`QuantizedWeightData`, then the layer re-quantized from it."""
    method = getattr(torch.Tensor, name)

    def write(self: QuantizedWeightData, *args, **kwargs):
        method(self, *args, **kwargs)
        self._layer.requantize_(torch.Tensor._make_subclass(torch.Tensor, self, False))
        return self

    write.__name__ = write.__qualname__ = name
    return write


class QuantizedWeightData(QuantizedWeightView):
    """A :class:`QuantizedWeightView`'s ``.data``: its in-place methods (``copy_``, ``add_``,
    ``sub_``, ``mul_``, ``div_``, ``zero_``, ``fill_``) change the tensor and re-quantize the layer
    from it, as assigning ``.data`` does. Augmented assignment through the attribute
    (``layer.weight.data += delta``) re-quantizes once, through the view's setter."""

    copy_ = _writing_through("copy_")
    add_ = _writing_through("add_")
    sub_ = _writing_through("sub_")
    mul_ = _writing_through("mul_")
    div_ = _writing_through("div_")
    zero_ = _writing_through("zero_")
    fill_ = _writing_through("fill_")


class QuantizedLinear(nn.Linear):
    """Base class of quantized linear layers: an ``nn.Linear`` to other libraries, without a float weight.

    A subclass stores its weight as it likes (buffers, parameters) and implements
    :meth:`dequantize`; it implements :meth:`requantize_` if its format can be rebuilt from a float
    weight (what merging a LoRA adapter needs). It sets ``in_features``, ``out_features`` and a
    ``bias`` parameter (or ``None``) as ``nn.Linear`` does. ``nn.Linear.__init__`` is not run: no
    float weight is ever allocated or initialised.
    """

    def __init__(self) -> None:
        nn.Module.__init__(self)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The ``[out_features, in_features]`` float weight, in ``dtype`` (default: the original dtype)."""
        raise NotImplementedError(f"{type(self).__name__} must implement dequantize()")

    def requantize_(self, weight: torch.Tensor) -> None:
        """Replace the stored weight by ``weight`` (``[out_features, in_features]``, float), quantized.

        The default refuses: a backend whose format cannot be rebuilt from a float weight (one
        that needs calibration data) keeps it, so merging an adapter into it fails loudly.
        """
        raise NotImplementedError(
            f"{type(self).__name__} cannot re-quantize a new weight, so an adapter cannot be merged into it: "
            "keep the adapter unmerged, or dequantize the model first (quantcore.dequantize(model)), "
            "merge, and quantize again"
        )

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the dequantized weight (in its original dtype) and this layer's bias.

        Built on the meta device, then given its tensors: no random initialisation runs.
        """
        weight = self.dequantize()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(weight.dtype), requires_grad=self.bias.requires_grad)
        return linear

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, as a :class:`QuantizedWeightView` (computed at each read)."""
        return QuantizedWeightView.of(self, self.dequantize())

    @weight.setter
    def weight(self, value: Any) -> None:
        raise AttributeError(
            f"{type(self).__name__}.weight is computed from the quantized weight and cannot be replaced; "
            "assign layer.weight.data = tensor to re-quantize a new weight"
        )

    def _check_weight(self, weight: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``weight`` is a float ``[out_features, in_features]`` tensor."""
        if tuple(weight.shape) != (self.out_features, self.in_features) or not weight.is_floating_point():
            raise ValueError(
                f"{type(self).__name__} needs a float weight of shape ({self.out_features}, {self.in_features}), "
                f"got {weight.dtype} {tuple(weight.shape)}"
            )


class _RecomputedWeightLinear(torch.autograd.Function):
    """``F.linear`` whose backward dequantizes the weight again instead of saving it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, layer: QuantizedLinear, dtype: Any) -> Any:
        ctx.layer, ctx.dtype = layer, dtype
        ctx.bias_shape = None if bias is None else bias.shape
        return F.linear(x, layer.dequantize(dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ ctx.layer.dequantize(ctx.dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_bias, None, None


def linear_recomputing_weight(
    x: torch.Tensor, layer: QuantizedLinear, dtype: torch.dtype, bias: torch.Tensor | None
) -> torch.Tensor:
    """``F.linear(x, layer.dequantize(dtype), bias)``, keeping only the quantized weight for the backward.

    Without it, autograd would keep every layer's dequantized float weight alive from the forward
    to the backward pass: the memory of the float model, which training adapters on a quantized
    base is meant to avoid. ``x`` and ``bias`` must already be in ``dtype``.
    """
    return _RecomputedWeightLinear.apply(x, bias, layer, dtype)
