"""The entry point quantcore loads (``[project.entry-points.quantcore] gptq``): registers ``gptq``."""

from __future__ import annotations

from quantcore import Backend, hookimpl

from .config import GPTQConfig


@hookimpl
def register_backends(register):
    """Register the ``gptq`` backend; its quantizer is imported only when it is used."""
    register(
        Backend(
            quant_method="gptq",
            config_class=GPTQConfig,
            quantizer="quantcore_gptq.quantizer:GPTQQuantizer",
            requires=("torch>=2.4",),
            install_hint="pip install 'torch>=2.4' (any build: CPU or CUDA)",
            description="GPTQ: calibrated 2/3/4/8-bit weights in plain PyTorch, GPTQ checkpoint format",
            # AutoGPTQ checkpoints carry their config only in this file (no quantization_config in config.json)
            config_files=("quantize_config.json",),
        )
    )
