"""The entry point quantcore loads (``[project.entry-points.quantcore] torch``): registers ``torch_wo``."""

from __future__ import annotations

from quantcore import Backend, hookimpl

from .config import TorchWeightOnlyConfig


@hookimpl
def register_backends(register):
    """Register the ``torch_wo`` backend; its quantizer is imported only when it is used."""
    register(
        Backend(
            quant_method="torch_wo",
            config_class=TorchWeightOnlyConfig,
            quantizer="quantcore_torch.quantizer:TorchWeightOnlyQuantizer",
            requires=("torch>=2.4",),
            install_hint="pip install 'torch>=2.4' (any build: CPU or CUDA)",
            description="Weight-only int8 / int4 linear layers in plain PyTorch (CPU and CUDA)",
        )
    )
