"""Building bitsandbytes layers without running their ``__init__``.

``bnb.nn.Linear4bit(...)`` runs ``nn.Linear.__init__``: it allocates a float weight, draws a random
initialisation, then wraps it. We already hold the weights (or want a meta skeleton), so we make
the module with ``cls.__new__`` + ``nn.Module.__init__`` and set exactly the attributes bitsandbytes'
own constructor (and its ``.to(device)`` quantization) leaves behind: the result is the module a
normal build + load + ``.to(device)`` gives, at a fraction of the cost. The attribute lists below
follow bitsandbytes 0.50 (``bitsandbytes/nn/modules.py``); ``tests/test_layers.py`` compares them
with normally built layers, so a bitsandbytes release that adds one fails loudly.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import QuantState
from bitsandbytes.nn import Int8Params, Linear4bit, Linear8bitLt, Params4bit
from bitsandbytes.nn.modules import maybe_rearrange_weight
from torch import nn

from .sizes import BLOCKSIZE

__all__ = ["make_linear4bit", "make_linear8bit", "packed_weight_shape"]

_make_subclass = torch.Tensor._make_subclass  # detaches its input: no ``.detach()`` needed


def _module_state_factory():
    """A function giving a fresh copy of the attributes ``nn.Module.__init__`` sets.

    Read off a real ``nn.Module()`` once, so it follows the installed torch: each empty container
    (the parameter, buffer, module and hook dicts) is made anew per module, immutable values are
    shared. Building that dict is several times cheaper than running ``nn.Module.__init__``.
    """
    fresh: list[tuple[str, type]] = []
    shared: dict[str, object] = {}
    for key, value in vars(nn.Module()).items():
        if type(value) in (dict, set, list, OrderedDict) and not value:
            fresh.append((key, type(value)))
        elif value is None or type(value) in (bool, int, str):
            shared[key] = value
        else:  # something new in torch we don't know how to copy: fall back to __init__
            return None

    def state() -> dict[str, object]:
        out = dict(shared)
        for key, factory in fresh:
            out[key] = factory()
        return out

    return state


_module_state = _module_state_factory()


def _new_module(cls: type[nn.Module]) -> nn.Module:
    module = cls.__new__(cls)
    if _module_state is None:
        nn.Module.__init__(module)
    else:
        object.__setattr__(module, "__dict__", _module_state())
    return module


@functools.cache
def _has_avx512bf16() -> bool | int | None:
    # Linear4bit.__init__ asks the native library every time; the answer never changes (and we
    # keep its exact value). bitsandbytes before 0.49 has no such probe and no such attribute:
    # None says there is nothing to set.
    probe = getattr(bnb.functional, "has_avx512bf16", None)
    return probe() if probe is not None else None


def packed_weight_shape(out_features: int, in_features: int, quant_storage: torch.dtype) -> tuple[int, int]:
    """Shape of the packed 4-bit weight ``quantize_4bit`` returns for an ``(out, in)`` weight."""
    return ((out_features * in_features + 1) // (quant_storage.itemsize * 2), 1)


def _bias_parameter(bias: torch.Tensor | None) -> nn.Parameter | None:
    # A new Parameter on the same storage: no copy, and Linear4bit.forward's ``bias.data = ...``
    # then rebinds our Parameter, never the float module's.
    if bias is None:
        return None
    return _make_subclass(nn.Parameter, bias, bias.requires_grad)


def make_linear4bit(
    in_features: int,
    out_features: int,
    weight: torch.Tensor,
    quant_state: QuantState | None,
    bias: torch.Tensor | None,
    *,
    compute_dtype: torch.dtype | None,
    quant_type: str,
    compress_statistics: bool,
    quant_storage: torch.dtype,
    blocksize: int = BLOCKSIZE,
) -> Linear4bit:
    """A ``Linear4bit`` holding the packed ``weight`` and its ``quant_state`` (``None``: a skeleton)."""
    module = _new_module(Linear4bit)
    param = _make_subclass(Params4bit, weight, False)
    param.__dict__.update(
        blocksize=blocksize,
        compress_statistics=compress_statistics,
        quant_type=quant_type,
        quant_state=quant_state,
        quant_storage=quant_storage,
        bnb_quantized=True,
        module=module,
    )
    module._parameters["weight"] = param
    module._parameters["bias"] = _bias_parameter(bias)
    module.__dict__.update(
        in_features=in_features,
        out_features=out_features,
        compute_dtype=compute_dtype,
        compute_type_is_set=compute_dtype is not None,
        quant_state=quant_state,
        quant_storage=quant_storage,
    )
    if _has_avx512bf16() is not None:  # bitsandbytes >= 0.49 sets (and reads) this attribute
        module.__dict__["support_avx512bf16_for_cpu"] = _has_avx512bf16()
    return module


def make_linear8bit(
    in_features: int,
    out_features: int,
    weight: torch.Tensor,
    scb: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    threshold: float,
    has_fp16_weights: bool,
) -> Linear8bitLt:
    """A ``Linear8bitLt`` holding the int8 ``weight`` and its row scales ``scb``.

    With ``has_fp16_weights`` the weight is the float weight and ``scb`` is ``None``.
    """
    module = _new_module(Linear8bitLt)
    state = bnb.MatmulLtState()
    state.threshold = threshold
    state.has_fp16_weights = has_fp16_weights
    if threshold > 0.0 and not has_fp16_weights:
        state.use_pool = True
    param = _make_subclass(Int8Params, weight, has_fp16_weights)
    param.__dict__.update(CB=None if has_fp16_weights else weight, SCB=scb, has_fp16_weights=has_fp16_weights)
    module._parameters["weight"] = param
    module._parameters["bias"] = _bias_parameter(bias)
    module.__dict__.update(in_features=in_features, out_features=out_features, state=state, index=None)
    module._register_load_state_dict_pre_hook(maybe_rearrange_weight)
    return module
