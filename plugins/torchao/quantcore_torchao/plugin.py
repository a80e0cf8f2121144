"""The entry point quantcore loads (``[project.entry-points.quantcore] torchao``): registers ``torchao``.

Importing this module does not import torchao: the quantizer is named by its import path and
loaded only when the backend is used.
"""

from __future__ import annotations

from quantcore import Backend, hookimpl

from .config import TorchAoConfig

#: The torchao releases this plugin is tested with (0.17 on torch 2.11 CUDA, 0.18 on torch 2.13 CPU).
REQUIRES = ("torchao>=0.17",)
INSTALL_HINT = "pip install 'quantcore[torchao]'"


@hookimpl
def register_backends(register):
    """Register the torchao backend."""
    register(
        Backend(
            quant_method=TorchAoConfig.quant_method,
            config_class=TorchAoConfig,
            quantizer="quantcore_torchao.quantizer:TorchAoQuantizer",
            requires=REQUIRES,
            install_hint=INSTALL_HINT,
            description="torchao int4 / int8 / float8 tensor-subclass weights on torchao's kernels",
        )
    )
