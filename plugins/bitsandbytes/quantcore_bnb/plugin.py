"""The quantcore plugin: registers the ``bitsandbytes`` backend (entry point ``quantcore``).

Importing this module does not import bitsandbytes: the quantizer is named by its import path and
loaded only when the backend is used.
"""

from __future__ import annotations

from quantcore import Backend, hookimpl

from .config import BitsAndBytesConfig

REQUIRES = ("bitsandbytes>=0.48.0",)
INSTALL_HINT = "pip install 'quantcore[bnb]'"


@hookimpl
def register_backends(register):
    """Register the bitsandbytes backend."""
    register(
        Backend(
            quant_method=BitsAndBytesConfig.quant_method,
            config_class=BitsAndBytesConfig,
            quantizer="quantcore_bnb.quantizer:BitsAndBytesQuantizer",
            requires=REQUIRES,
            install_hint=INSTALL_HINT,
            description="bitsandbytes LLM.int8() and 4-bit FP4/NF4 linear layers (CPU and CUDA)",
        )
    )
