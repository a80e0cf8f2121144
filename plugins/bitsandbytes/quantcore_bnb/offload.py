"""``llm_int8_enable_fp32_cpu_offload``: which modules a device map keeps unquantized in float32.

Meaning, as in transformers: a model split by a device map between an accelerator and the CPU (or
disk) may only be loaded when ``llm_int8_enable_fp32_cpu_offload`` is true; the modules mapped to
``"cpu"`` or ``"disk"`` are then not quantized and are kept in float32, the others are quantized.
A map that puts everything on the CPU is not an offload: the whole model is quantized there.

The device-map loading code calls :func:`fp32_offload_modules` before quantizing, passes the
names it returns as ``skip_modules`` to ``quantize`` and loads those modules in float32
(:func:`keep_in_fp32` casts them in an already built model).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from quantcore import ConfigError

from .config import BitsAndBytesConfig

__all__ = ["OFFLOAD_DEVICES", "fp32_offload_modules", "keep_in_fp32"]

OFFLOAD_DEVICES = ("cpu", "disk")
"""Device-map values that mean "offloaded"."""


def _is_offload(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cpu"
    return str(device) in OFFLOAD_DEVICES


def fp32_offload_modules(config: BitsAndBytesConfig, device_map: Mapping[str, Any] | None) -> list[str]:
    """Module names of ``device_map`` to keep unquantized in float32 (``""`` is the whole model).

    :raises ConfigError: the map mixes an accelerator with the CPU or disk but the config does not
        enable ``llm_int8_enable_fp32_cpu_offload``.
    """
    if not device_map:
        return []
    offloaded = [name for name, device in device_map.items() if _is_offload(device)]
    if not offloaded or len(offloaded) == len(device_map):
        return []
    if not config.llm_int8_enable_fp32_cpu_offload:
        shown = ", ".join(repr(n) for n in offloaded[:3]) + (", ..." if len(offloaded) > 3 else "")
        raise ConfigError(
            [("llm_int8_enable_fp32_cpu_offload",
              f"the device map puts {shown} on the CPU or disk next to modules on an accelerator; set "
              "llm_int8_enable_fp32_cpu_offload=true to keep those in float32, or fit the model on the accelerator")],
            title="invalid BitsAndBytesConfig for this device map",
        )
    return offloaded


def keep_in_fp32(model: nn.Module, names: Iterable[str]) -> None:
    """Cast the named modules' floating-point parameters and buffers to float32, in place."""
    for name in names:
        module = model.get_submodule(name)
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.is_floating_point() and tensor.dtype != torch.float32:
                tensor.data = tensor.data.float()
