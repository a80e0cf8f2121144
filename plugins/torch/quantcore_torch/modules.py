"""``WeightOnlyLinear``: a linear layer that stores int8 or int4 weights and computes in float.

The forward runs the fused kernels of :mod:`quantcore_torch.kernels` (int8 / int4 weights read as
they are stored, activations in float); the storage below is what checkpoints hold on every device.

Storage (see :mod:`quantcore_torch.packing` for the formulas), with ``s`` the byte size of the
original weight's float dtype (2 for fp16/bf16, 4 for fp32) and ``groups = ceil(in / group_size)``:

=====  ============================  =================================  =================================
bits   ``qweight``                   ``scale``                          ``zero``
=====  ============================  =================================  =================================
8      int8 ``[out, in]``            ``[out]``, weight's dtype          (none)
4      uint8 ``[out, ceil(in/2)]``   ``[out, groups]``, weight's dtype  ``[out, groups]``, weight's dtype
=====  ============================  =================================  =================================

so a weight costs ``8 + 8 s / in`` bits per parameter in int8 and ``4 + 2 * 8 s / group_size`` in
int4 (``in`` even and a multiple of ``group_size``; otherwise the last byte and group are partly
unused). ``bias`` is kept as it was, in its own dtype.

Accuracy (the bounds the tests assert): relative L2 error of the layer's outputs against the
float layer, on N(0, 0.02) weights with 512 inputs and N(0, 1) activations, in fp32, fp16 or bf16:

=========  ========  ========
format     measured  bound
=========  ========  ========
int8       0.75%     < 1%
int4 g128  9.9%      < 11%
int4 g64   8.9%      < 10%
int4 g32   7.8%      < 9%
=========  ========  ========

The error shrinks with ``group_size``. int8's grows slowly with ``in_features`` (a row's absmax
grows with its length): these are figures for this shape, not a guarantee for every layer.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from quantcore.layers import QuantizedLinear, linear_recomputing_weight

from . import kernels
from .packing import dequantize_int4, dequantize_int8, int4_shapes, quantize_int4, quantize_int8

__all__ = ["KernelLayoutMixin", "WeightOnlyEpilogues", "WeightOnlyLinear", "WeightOnlyStorage"]


class KernelLayoutMixin(nn.Module):
    """The life cycle of an int4 layer's kernel layout (``kernel_layout``), kept beside its storage.

    The layout is derived from the stored ``qweight`` / ``scale`` / ``zero`` buffers and follows
    them: rebuilt when the module is built, loaded (``load_state_dict``) or moved (``_apply``), and
    when a loader swapped the buffers in by other means (checked in eager forwards).
    """

    bits: int
    group_size: int
    #: ``(group, index)`` while fused with siblings by :func:`quantcore_torch.fusion.fuse_projections`.
    _fused: tuple | None = None
    in_features: int
    compute_dtype: torch.dtype | None
    qweight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor

    def _init_kernel_layout(self) -> None:
        # A plain attribute, not a buffer: it is derived from the buffers, so state dicts, sizes
        # and checkpoints never see it. Built by refresh_kernel_layout() (uninitialised storage here).
        self.kernel_layout: kernels.Int4Layout | None = None
        # The stored tensors the layout was built from: a loader that swaps buffers in without
        # load_state_dict (transformers' own, accelerate's offload hooks) makes the layout stale.
        self._layout_of: tuple[torch.Tensor, ...] = ()
        self.register_load_state_dict_post_hook(_refresh_after_load)

    @property
    def weight_dtype(self) -> torch.dtype:
        """The float dtype of the original weight (the dtype scales are stored in)."""
        return self.scale.dtype

    def refresh_kernel_layout(self) -> None:
        """Rebuild :attr:`kernel_layout` from the stored weight (after changing the buffers by hand).

        Only int4 needs one: on the CPU for ``torch._weight_int4pack_mm_for_cpu``, on CUDA for
        tinygemm or the interleaved Triton kernel (``kernels.INT4_CUDA_KERNEL``, set by
        ``QUANTCORE_INT4_CUDA_KERNEL``); the int8 kernels and the other Triton kernels read the
        stored tensors. Nothing is built on the meta device or for shapes no
        kernel takes.
        """
        self.kernel_layout = None
        self._layout_of = ()
        fused = self._fused
        if fused is not None:
            # Fused with its siblings (quantcore_torch.fusion): the stack they share has the layout.
            fused[0].refresh()
            return
        if self.bits != 4 or self.qweight.is_meta:
            return
        self._layout_of = (self.qweight, self.scale, self.zero)
        dtype = self.compute_dtype or self.weight_dtype
        if self.qweight.device.type == "cpu":
            self.kernel_layout = kernels.int4_cpu_layout(
                self.qweight, self.scale, self.zero, self.in_features, self.group_size, dtype
            )
        elif self.qweight.is_cuda:
            self.kernel_layout = kernels.int4_cuda_layout(
                self.qweight, self.scale, self.zero, self.in_features, self.group_size, dtype
            )
            if self.kernel_layout is not None:
                # CUDA graphs would copy a plain tensor input at every replay; this one never changes.
                torch._dynamo.mark_static_address(self.kernel_layout.weight)
                torch._dynamo.mark_static_address(self.kernel_layout.scales_and_zeros)

    def _current_kernel_layout(self) -> kernels.Int4Layout | None:
        """:attr:`kernel_layout`, rebuilt first if a loader swapped the buffers in since. Checked in
        eager mode only: a compiled graph guards on the layout it was traced with."""
        if not torch.compiler.is_compiling() and self._layout_is_stale():
            self.refresh_kernel_layout()
        return self.kernel_layout

    def _layout_is_stale(self) -> bool:
        source = self._layout_of
        if not source:
            return True
        buffers = self._buffers  # not getattr: this runs in every eager int4 forward
        return (
            source[0] is not buffers["qweight"] or source[1] is not buffers["scale"] or source[2] is not buffers["zero"]
        )

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), .half(): the buffers move or change, so the layout derived from them must follow.
        result = super()._apply(fn, recurse)
        self.refresh_kernel_layout()
        return result


_S = TypeVar("_S", bound="WeightOnlyStorage")


class WeightOnlyStorage(KernelLayoutMixin, QuantizedLinear):
    """What a :class:`WeightOnlyLinear` stores and how it converts: the int8 / int4 buffers (see the
    module's table), quantizing a float weight into them and dequantizing them back. The forward
    through the kernels is :class:`WeightOnlyLinear`'s."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int = 8,
        group_size: int = 128,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        compute_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits!r}")
        if group_size < 1:
            raise ValueError(f"group_size must be positive, got {group_size!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.compute_dtype = compute_dtype
        if bits == 8:
            shape = (out_features, in_features)
            self.register_buffer("qweight", torch.empty(shape, dtype=torch.int8, device=device))
            self.register_buffer("scale", torch.empty(out_features, dtype=dtype, device=device))
        else:
            packed, grouped = int4_shapes(out_features, in_features, group_size)
            self.register_buffer("qweight", torch.empty(packed, dtype=torch.uint8, device=device))
            self.register_buffer("scale", torch.empty(grouped, dtype=dtype, device=device))
            self.register_buffer("zero", torch.empty(grouped, dtype=dtype, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self._init_kernel_layout()

    @classmethod
    def from_linear(
        cls: type[_S], linear: nn.Linear, *, bits: int, group_size: int = 128, compute_dtype: torch.dtype | None = None
    ) -> _S:
        """Quantize ``linear``'s weight; its bias is shared, not copied. ``linear`` is not changed.

        A ``linear`` on the meta device gives a meta skeleton with the right shapes and dtypes.
        """
        weight = linear.weight
        module = cls(
            linear.in_features,
            linear.out_features,
            bits=bits,
            group_size=group_size,
            bias=linear.bias is not None,
            dtype=weight.dtype,
            device="meta",
            compute_dtype=compute_dtype,
        )
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach(), requires_grad=linear.bias.requires_grad)
        if weight.is_meta:
            return module
        if bits == 8:
            module.qweight, module.scale = quantize_int8(weight)
        else:
            module.qweight, module.scale, module.zero = quantize_int4(weight, group_size)
        module.refresh_kernel_layout()
        return module

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The ``[out_features, in_features]`` float weight, in ``dtype`` (default: the original dtype)."""
        dtype = dtype or self.weight_dtype
        if self.bits == 8:
            return kernels.dequantized_int8(self.qweight, self.scale, dtype)
        return kernels.dequantized_int4(self.qweight, self.scale, self.zero, self.in_features, self.group_size, dtype)

    def _reference_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The float weight by :mod:`~quantcore_torch.packing`'s PyTorch ops alone (no kernel)."""
        if self.bits == 8:
            return dequantize_int8(self.qweight, self.scale, dtype)
        return dequantize_int4(self.qweight, self.scale, self.zero, self.in_features, self.group_size, dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Same as :meth:`dequantized_weight` (the :class:`~quantcore.layers.QuantizedLinear` API)."""
        return self.dequantized_weight(dtype)

    def requantize_(self, weight: torch.Tensor) -> None:
        """Quantize ``weight`` (float ``[out_features, in_features]``) into this layer, in its format."""
        self._check_weight(weight)
        weight = weight.detach().to(device=self.qweight.device, dtype=self.weight_dtype)
        if self.bits == 8:
            self.qweight, self.scale = quantize_int8(weight)
        else:
            self.qweight, self.scale, self.zero = quantize_int4(weight, self.group_size)
        self.refresh_kernel_layout()

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}", f"bits={self.bits}"]
        if self.bits == 4:
            parts.append(f"group_size={self.group_size}")
        parts.append(f"bias={self.bias is not None}")
        if self.compute_dtype is not None:
            parts.append(f"compute_dtype={self.compute_dtype}")
        return ", ".join(parts)


class WeightOnlyEpilogues(WeightOnlyStorage):
    """The forwards that fuse a neighbour's work into a :class:`WeightOnlyLinear`'s kernel: the
    gated MLP's activation, the attention's rotary embedding and cache writes, a decoder layer's
    RMS norm and residual add. :mod:`quantcore_torch.fusion` calls them; each falls back to the
    plain forward, or says it cannot run, where its kernel does not take the input."""

    def gated_forward(self, h: torch.Tensor) -> torch.Tensor:
        """This layer as a gated MLP's down projection fed ``h [..., 2 * in_features]``, the gate and
        up halves of a fused gate/up projection: ``self(silu(gate) * up)``. An int8 layer whose
        compute dtype is the input's runs the activation inside its kernel when it can
        (:func:`~quantcore_torch.kernels.int8_gated_linear`); anything else (int4, training, another
        compute dtype) computes ``silu(gate) * up`` first, as the MLP does, then this forward."""
        bias = self._parameters["bias"]
        trains = torch.is_grad_enabled() and (h.requires_grad or (bias is not None and bias.requires_grad))
        if self.bits == 8 and not trains and (self.compute_dtype is None or self.compute_dtype == h.dtype):
            buffers = self._buffers
            return kernels.int8_gated_linear(h, buffers["qweight"], buffers["scale"], bias)
        return self(kernels.gated_input(h))

    def gate_up_forward(self, x: torch.Tensor) -> torch.Tensor:
        """This layer as a gated MLP's gate and up projections stacked (its first ``out_features //
        2`` outputs the gate's): ``silu(gate) * up``, ``[..., out_features // 2]``. Where the
        layer's kernel can (one row on CUDA: int8, or int4 on the interleaved layout; not while
        training or with another compute dtype), the activation runs in its epilogue
        (:func:`~quantcore_torch.kernels.int8_gate_up_linear`,
        :func:`~quantcore_torch.kernels.int4_gate_up_linear`); anything else runs this forward,
        then the activation, as the MLP does."""
        bias = self._parameters["bias"]
        trains = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
        if trains or self._fused is not None or (self.compute_dtype is not None and self.compute_dtype != x.dtype):
            return kernels.gated_input(self(x))
        buffers = self._buffers
        if self.bits == 8:
            return kernels.int8_gate_up_linear(x, buffers["qweight"], buffers["scale"], bias)
        return kernels.int4_gate_up_linear(
            x,
            buffers["qweight"],
            buffers["scale"],
            buffers["zero"],
            self.group_size,
            bias,
            self._current_kernel_layout(),
        )

    def qkv_rope_forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        position: torch.Tensor,
        q_features: int,
        sq: torch.Tensor | None = None,
        eps: float = 0.0,
    ) -> torch.Tensor | None:
        """This layer as an attention's q, k and v projections stacked, at one decode token: q with
        the rotary embedding applied, k rotated and v written into a static cache's ``keys`` and
        ``values`` at ``position`` (:func:`~quantcore_torch.kernels.int4_qkv_rope_linear`). Where
        the kernel cannot (int4 off the interleaved layout, training, another compute dtype, shapes
        it does not take) returns ``None`` and writes nothing. An int8 layer runs
        :func:`~quantcore_torch.kernels.int8_qkv_rope_linear`. ``sq`` and ``eps``: the attention's
        RMS norm folded in (:meth:`norm_forward`)."""
        if not self._epilogue_serves(x):
            return None
        bias = self._parameters["bias"]
        if self.bits == 8:
            qweight, scale = self._buffers["qweight"], self._buffers["scale"]
            return kernels.int8_qkv_rope_linear(
                x, qweight, scale, bias, cos, sin, keys, values, position, q_features, sq, eps
            )
        layout = self._current_kernel_layout()
        return kernels.int4_qkv_rope_linear(x, layout, bias, cos, sin, keys, values, position, q_features, sq, eps)

    def _epilogue_serves(self, x: torch.Tensor) -> bool:
        """Not training, and the compute dtype ``x``'s: what every fused epilogue needs."""
        bias = self._parameters["bias"]
        trains = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
        return not trains and (self.compute_dtype is None or self.compute_dtype == x.dtype)

    def _kernel_serves(self, x: torch.Tensor) -> bool:
        """Int4, not training, and the compute dtype ``x``'s: what the int4 epilogues need."""
        return self.bits == 4 and self._epilogue_serves(x)

    def norm_fold_takes(self, x: torch.Tensor) -> bool:
        """Whether :meth:`norm_forward` and :meth:`residual_forward` run for ``x`` (one fp16 / bf16
        row on CUDA, int8 or int4 on the interleaved layout, not training): a decoder layer whose
        norms are folded (``fuse_projections(norms=True)``) checks every projection before it starts."""
        if self.bits == 8:
            return self._epilogue_serves(x) and kernels.int8_norm_fold_takes(x)
        return self._kernel_serves(x) and kernels.norm_fold_takes(x, self._current_kernel_layout())

    def norm_forward(self, x: torch.Tensor, sq: torch.Tensor, eps: float, gate_up: bool = False) -> torch.Tensor:
        """This layer after an RMS norm, folded in: ``x`` is the norm's weight times the hidden
        state, ``sq`` its sum of squares in a counter (:func:`~quantcore_torch.kernels.int4_norm_linear`;
        ``gate_up``: a gated MLP's stacked gate and up, ``silu(gate) * up``). Only where
        :meth:`norm_fold_takes`; raises ``ValueError`` elsewhere."""
        bias = self._parameters["bias"]
        if self.bits == 8:
            return kernels.int8_norm_linear(x, self._buffers["qweight"], self._buffers["scale"], bias, sq, eps, gate_up)
        return kernels.int4_norm_linear(x, self._current_kernel_layout(), bias, sq, eps, gate_up)

    def residual_forward(
        self, x: torch.Tensor, h: torch.Tensor, gain: torch.Tensor, sq: torch.Tensor, clear: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, gain * y)`` with ``y = h + self(x)``, the residual add and the next norm's input
        in this layer's epilogue, ``sum(y**2)`` added to the counter ``sq``, ``clear`` zeroed
        (:func:`~quantcore_torch.kernels.int4_residual_linear`). Only where :meth:`norm_fold_takes`;
        raises ``ValueError`` elsewhere."""
        bias = self._parameters["bias"]
        if self.bits == 8:
            qweight, scale = self._buffers["qweight"], self._buffers["scale"]
            return kernels.int8_residual_linear(x, qweight, scale, bias, h, gain, sq, clear)
        return kernels.int4_residual_linear(x, self._current_kernel_layout(), bias, h, gain, sq, clear)


class WeightOnlyLinear(WeightOnlyEpilogues):
    """``y = x @ W.T + b`` with ``W`` stored in int8 or int4, read by a fused weight-only kernel.

    The matmul runs in ``compute_dtype`` when set, else in the input's dtype; the output has the
    input's dtype. Buffers: ``qweight``, ``scale`` and (int4) ``zero``; ``bias`` is a parameter.
    :mod:`quantcore_torch.kernels` picks the kernel where the tensors live (and dequantize +
    ``F.linear`` where no kernel fits); an int4 layer also keeps its weight in the layout of the
    kernel for its device (``kernel_layout``: the CPU kernel's, or on CUDA tinygemm's or the
    interleaved Triton kernel's, per ``kernels.INT4_CUDA_KERNEL``; about the size of ``qweight``;
    not saved, not counted in the module's size), rebuilt whenever the module is built, loaded or
    moved.

    The constructor allocates uninitialised storage (pass ``device="meta"`` for a skeleton to load
    a state dict into); :meth:`from_linear` quantizes an existing ``nn.Linear``.

    It is an ``nn.Linear`` to other libraries (:class:`quantcore.layers.QuantizedLinear`): ``weight``
    reads as the dequantized weight, and assigning ``weight.data`` re-quantizes (how PEFT merges
    a LoRA adapter). When gradients flow, the backward dequantizes again rather than keeping the
    float weight alive (training adapters on a frozen quantized base).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        # Tensors read from their dicts: nn.Module.__getattr__ costs about a microsecond a name,
        # and an eager decode step runs this forward some 150 times.
        buffers = self._buffers
        bias = self._parameters["bias"]
        grad = torch.is_grad_enabled()
        trains = grad and (x.requires_grad or (bias is not None and bias.requires_grad))
        fused = self._fused
        if fused is not None and not trains:
            y = fused[0].forward(x, fused[1])
            if y is not None:
                return y
        if grad and x.requires_grad:
            # Gradients flow through this frozen layer (adapters before it): the fused kernels have
            # no backward, so recompute the weight in the backward instead of keeping it.
            return linear_recomputing_weight(x.to(dtype), self, dtype, None if bias is None else bias.to(dtype)).to(
                x.dtype
            )
        # A trainable bias alone takes its gradient through a plain addition after the kernel.
        late_bias = bias if grad and bias is not None and bias.requires_grad else None
        kernel_bias = None if late_bias is not None else bias
        # No-op casts skipped: an eager decode step pays for every dispatch.
        xc = x if x.dtype == dtype else x.to(dtype)
        if self.bits == 8:
            y = kernels.int8_weight_only_linear(xc, buffers["qweight"], buffers["scale"], kernel_bias)
        else:
            y = kernels.int4_weight_only_linear(
                xc,
                buffers["qweight"],
                buffers["scale"],
                buffers["zero"],
                self.group_size,
                kernel_bias,
                self._current_kernel_layout(),
            )
        if late_bias is not None:
            y = y + late_bias.to(y.dtype)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward through dequantize + ``F.linear``: what every kernel is tested against."""
        dtype = self.compute_dtype or x.dtype
        bias = self.bias.to(dtype) if self.bias is not None else None
        return F.linear(x.to(dtype), self._reference_weight(dtype), bias).to(x.dtype)


def _refresh_after_load(module: nn.Module, incompatible_keys) -> None:
    # load_state_dict() (assign=True included) replaced the buffers: rebuild what derives from them.
    module.refresh_kernel_layout()
