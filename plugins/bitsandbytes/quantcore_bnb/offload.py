"""``llm_int8_enable_fp32_cpu_offload``: offloaded modules stay unquantized, in float32.

Meaning, as in transformers: a model split by a device map between an accelerator and the CPU (or
disk) may only be loaded when ``llm_int8_enable_fp32_cpu_offload`` is true; the modules mapped to
``"cpu"`` or ``"disk"`` are then not quantized and are kept in float32, the others are quantized.
The rule itself is :meth:`BitsAndBytesQuantizer.offload_policy`, which quantcore's device-map
planning (``quantcore.placement``) applies; :func:`keep_in_fp32` casts the modules it keeps.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["keep_in_fp32"]


def keep_in_fp32(model: nn.Module, names: Iterable[str]) -> None:
    """Cast the named modules' floating-point parameters and buffers to float32, in place."""
    for name in names:
        module = model.get_submodule(name)
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.is_floating_point() and tensor.dtype != torch.float32:
                tensor.data = tensor.data.float()
