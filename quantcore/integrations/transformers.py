"""quantcore backends in transformers' ``from_pretrained`` and ``save_pretrained``.

``import quantcore.integrations.transformers`` registers every usable quantcore backend whose
``quant_method`` transformers does not know (``torch_wo``, any third-party plugin) with
``transformers.quantizers.register_quantization_config`` and ``register_quantizer``. Every method
goes through the same two classes, built on quantcore's generic API (the backend's
:class:`~quantcore.Quantizer`), so a plugin needs no transformers code of its own:

- :class:`QuantcoreConfigAdapter`: how transformers turns a ``config.json``'s
  ``quantization_config`` into a config (the backend's own quantcore config class);
- :class:`QuantcoreHfQuantizer`: transformers' ``HfQuantizer``. On a float checkpoint it plans with
  quantcore's rules (the config's skip list, the output head and tied linears kept in float) and
  quantizes each linear layer as soon as transformers has read its weight, on the device the
  device map gives it; on a quantized checkpoint (written by ``save_pretrained`` or
  :func:`quantcore.save_quantized`) it builds the quantized skeleton the checkpoint describes and
  transformers fills it, assigning each saved tensor (the default
  :meth:`~quantcore.Quantizer.load_quantized_state`; a backend's own override of it is not
  called on this path).

Methods transformers has itself (``bitsandbytes``, ``torchao``, ``gptq``, ...) stay
transformers' own: quantcore's configs for those already write the dicts transformers reads.
Call :func:`register` again after registering a plugin at run time.

Needs transformers 5 (its loading runs the ``HfQuantizer`` conversion ops used here); with
transformers 4.x importing this module raises ``ImportError`` saying so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from packaging.version import Version
from torch import nn

from ..auto import AutoQuantizationConfig, AutoQuantizer, dequantize
from ..checkpoint import STATE_NAME, read_quantization_state
from ..config import QuantizationConfigMixin
from ..errors import CheckpointError
from ..quantizer import Quantizer
from ..registry import available_backends
from ..shards import _TRIM_EVERY, _release_freed_host_memory
from ..state import STATE_ATTRIBUTE, QuantizationState

MIN_TRANSFORMERS = "5.0"

if Version(transformers.__version__).release < Version(MIN_TRANSFORMERS).release:
    raise ImportError(
        f"quantcore.integrations.transformers needs transformers>={MIN_TRANSFORMERS}, found "
        f"{transformers.__version__}: it quantizes through the weight-conversion ops of transformers 5's "
        "loader. With transformers 4.x use quantcore.from_pretrained and quantcore.save_quantized."
    )

from transformers.core_model_loading import ConversionOps  # noqa: E402
from transformers.quantizers import auto as _auto  # noqa: E402
from transformers.quantizers.base import HfQuantizer  # noqa: E402
from transformers.utils.quantization_config import QuantizationConfigMixin as HfQuantizationConfigMixin  # noqa: E402
from transformers.utils.quantization_config import QuantizationMethod  # noqa: E402

__all__ = ["QuantcoreConfigAdapter", "QuantcoreHfQuantizer", "register", "registered_methods"]


class QuantcoreConfigAdapter(HfQuantizationConfigMixin):
    """Registered with transformers for every quantcore method; never instantiated.

    transformers builds a saved ``quantization_config`` dict through ``from_dict``, which returns
    the backend's quantcore config: transformers then handles it like its own (``quant_method``,
    ``to_dict``, ``to_json_string``), as it does a quantcore config passed to ``from_pretrained``.
    """

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        return AutoQuantizationConfig.from_dict(config_dict, return_unused_kwargs=return_unused_kwargs, **kwargs)


class _QuantizeOnLoad(ConversionOps):
    """The op transformers runs on each float weight the quantizer claimed: it replaces the module."""

    def __init__(self, hf_quantizer: QuantcoreHfQuantizer):
        self.hf_quantizer = hf_quantizer

    def convert(
        self,
        input_dict: dict[str, Any],
        source_patterns: list[str] | None = None,
        target_patterns: list[str] | None = None,
        *,
        model: nn.Module | None = None,
        missing_keys: set[str] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        assert model is not None  # transformers passes the model being loaded
        left: dict[str, Any] = {}
        for key, value in input_dict.items():
            tensor = value[0] if isinstance(value, list) else value
            module_name, _, tensor_name = key.rpartition(".")
            if tensor_name != "weight" or module_name not in self.hf_quantizer.targets:
                left[key] = value
                continue
            self.hf_quantizer.quantize_module(model, module_name, tensor)
            if missing_keys is not None:
                missing_keys.discard(key)  # the float weight now lives in the quantized module
        return left


class QuantcoreHfQuantizer(HfQuantizer):
    """transformers' ``HfQuantizer`` for any quantcore backend, through its :class:`~quantcore.Quantizer`."""

    requires_calibration = False

    def __init__(self, quantization_config: Any, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        if not isinstance(quantization_config, QuantizationConfigMixin):
            raise TypeError(
                f"expected a quantcore config for quant_method {getattr(quantization_config, 'quant_method', None)!r}, "
                f"got {type(quantization_config).__name__}"
            )
        self.config: QuantizationConfigMixin = quantization_config
        """The quantcore config (transformers' ``quantization_config``, typed as what it is)."""
        self._quantizers: dict[int, Quantizer] = {}
        self.targets: dict[str, Quantizer] = {}
        """Module name -> the quantizer that makes (or made) it."""
        self.state: QuantizationState | None = None
        self._weight_sizes: dict[str, float] = {}
        self._freed_since_trim = 0

    def quantizer_for(self, config: QuantizationConfigMixin) -> Quantizer:
        """The quantcore quantizer of ``config`` (one per config object)."""
        quantizer = self._quantizers.get(id(config))
        if quantizer is None:
            quantizer = self._quantizers[id(config)] = AutoQuantizer.from_config(config)
        return quantizer

    # ------------------------------------------------------------------ checks
    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        self.quantizer_for(self.config).check_environment()

    # ------------------------------------------------------------------ before the weights
    def _process_model_before_weight_loading(
        self, model: Any, checkpoint_files: list[str] | None = None, **kwargs: Any
    ) -> Any:
        if self.pre_quantized:
            self._build_quantized_skeleton(model, checkpoint_files)
        else:
            self._plan(model)
        return model

    def _plan(self, model: nn.Module) -> None:
        """A float checkpoint: quantcore's rules choose the modules, quantized as their weights arrive."""
        quantizer = self.quantizer_for(self.config)
        keep = [str(k) for k in (getattr(model, "_keep_in_fp32_modules", None) or [])]
        report = quantizer.plan(model, skip_modules=keep)
        for record in report.quantized:
            module = model.get_submodule(record.name)
            self.targets[record.name] = quantizer
            weight = module._parameters.get("weight")
            if weight is not None and weight.numel():
                self._weight_sizes[f"{record.name}.weight"] = quantizer.quantized_nbytes(module) / weight.numel()
        self.state = QuantizationState(
            self.config, skip_modules=keep, modules={r.name: "config" for r in report.quantized}
        )

    def _build_quantized_skeleton(self, model: nn.Module, checkpoint_files: list[str] | None) -> None:
        """A quantized checkpoint: its quantized modules, on the meta device, for transformers to fill.

        Which modules: those quantcore's ``quantization_config.json`` lists when
        :func:`quantcore.save_quantized` wrote the checkpoint; otherwise (``save_pretrained``) those
        the same rules pick as when the model was quantized while loading.
        """
        folder = Path(checkpoint_files[0]).parent if checkpoint_files else None
        if folder is not None and (folder / STATE_NAME).is_file():
            found = read_quantization_state(folder)
            assert found is not None  # a quantization_config.json is a state, or read_quantization_state raises
            self.state = found[0]
            for name in self.state.modules:
                config = self.state.config_for(name)
                assert config is not None  # every module the state lists was quantized with a config
                self.targets[name] = self.quantizer_for(config)
        else:
            self._plan(model)
        for name, quantizer in self.targets.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            float_module = parent._modules[child]
            assert float_module is not None  # the planner names existing modules only
            parent._modules[child] = quantizer.create_quantized_module(float_module, name)

    # ------------------------------------------------------------------ while loading
    def param_needs_quantization(self, model: Any, param_name: str, **kwargs: Any) -> bool:
        module_name, _, tensor_name = param_name.rpartition(".")
        return not self.pre_quantized and tensor_name == "weight" and module_name in self.targets

    def param_element_size(self, model: Any, param_name: str, param: torch.Tensor) -> float:
        # What transformers sizes a device_map="auto" with: the weights as they will be, quantized.
        return self._weight_sizes.get(param_name, param.element_size())

    def get_quantize_ops(self) -> ConversionOps:
        return _QuantizeOnLoad(self)

    def quantize_module(self, model: nn.Module, name: str, weight: torch.Tensor) -> None:
        """Replace the float module ``name`` (weights not loaded yet) by its quantized form, built from ``weight``."""
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        skeleton = parent._modules[child]
        assert skeleton is not None
        float_module = skeleton.__class__.__new__(skeleton.__class__)
        float_module.__dict__ = dict(skeleton.__dict__)
        float_module._parameters = {**skeleton._parameters, "weight": nn.Parameter(weight, requires_grad=False)}
        quantized = self.targets[name].create_quantized_module(float_module, name)
        for tensor in (*quantized.parameters(), *quantized.buffers()):
            if not tensor.is_meta:
                # transformers re-initialises every tensor without this flag once loading ends
                tensor._is_hf_initialized = True  # type: ignore[attr-defined]
        parent._modules[child] = quantized
        if weight.device.type == "cpu":
            # Each float weight is freed once quantized; glibc keeps those chunks, and without a
            # trim the process's peak grows by the float model's size (as in quantcore's loader).
            self._freed_since_trim += weight.numel() * weight.element_size()
            if self._freed_since_trim >= _TRIM_EVERY:
                _release_freed_host_memory()
                self._freed_since_trim = 0

    # ------------------------------------------------------------------ after the weights
    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        still_float = [n for n in self.targets if not self.targets[n].is_quantized_module(model.get_submodule(n))]
        if still_float and not self.pre_quantized:
            raise CheckpointError(
                f"the checkpoint has no float weight for {len(still_float)} module(s) quantcore planned to "
                f"quantize ({', '.join(still_float[:5])}{', ...' if len(still_float) > 5 else ''})"
            )
        if self._freed_since_trim:
            _release_freed_host_memory()  # the last float weights, freed after their quantize op returned
        # quantcore's own tools (save_quantized, get_quantization_state) see what was done
        model.__dict__[STATE_ATTRIBUTE] = self.state
        return model

    def _dequantize(self, model: Any, dtype: torch.dtype | None = None) -> Any:
        dequantize(model)
        model.__dict__.pop(STATE_ATTRIBUTE, None)
        if dtype is not None:
            model.to(dtype)
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        """Adapters (PEFT) train on top of the frozen quantized layers."""
        return True


def _native_methods() -> set[str]:
    return {m.value for m in QuantizationMethod}


def registered_methods() -> list[str]:
    """The quant_methods transformers currently builds through quantcore."""
    return sorted(m for m, cls in _auto.AUTO_QUANTIZER_MAPPING.items() if cls is QuantcoreHfQuantizer)


def register() -> list[str]:
    """Register every usable quantcore backend transformers does not have; returns the methods added now.

    Idempotent: a method already registered through quantcore is left as it is, and a method
    transformers has natively (or that something else registered) is never taken over.
    """
    native = _native_methods()
    added = []
    for info in available_backends():
        method = info.quant_method
        if not info.usable or method in native:
            continue
        if _auto.AUTO_QUANTIZER_MAPPING.get(method) is QuantcoreHfQuantizer:
            continue  # already ours
        if method in _auto.AUTO_QUANTIZER_MAPPING or method in _auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
            continue  # someone else's
        _auto.register_quantization_config(method)(QuantcoreConfigAdapter)
        _auto.register_quantizer(method)(QuantcoreHfQuantizer)
        added.append(method)
    return added


register()
