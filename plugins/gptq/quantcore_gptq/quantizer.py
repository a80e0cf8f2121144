"""``GPTQQuantizer``: GPTQ on quantcore's calibration engine, block by block.

For each block the engine hands over, the layers are grouped by the input they share, in the
order the forward calls them (for a Llama layer: q/k/v, o, gate/up, down; found by comparing their
inputs on the first batch, so no architecture table is needed). Layers sharing an input share a
Hessian and are quantized in one GPTQ run (their weights stacked). With ``true_sequential`` each
group's Hessian comes from a forward through the groups already quantized.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from quantcore import Quantizer

from .config import DATASET_NAMES, GPTQConfig
from .gptq import Hessian, gptq_quantize
from .modules import SCALE_DTYPE, GPTQLinear
from .packing import packing_multiple

if TYPE_CHECKING:
    from quantcore.calibrate import CalibrationBlock

__all__ = ["GPTQQuantizer", "gptq_nbytes"]

DEFAULT_SEQLEN = 2048


def gptq_nbytes(out_features: int, in_features: int, *, bits: int, group_size: int) -> int:
    """Bytes of a :class:`GPTQLinear`'s weight tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx``)."""
    groups = 1 if group_size == -1 else -(-in_features // group_size)
    packed = in_features * out_features * bits // 8
    return packed + groups * out_features * bits // 8 + groups * out_features * SCALE_DTYPE.itemsize + 4 * in_features


class GPTQQuantizer(Quantizer):
    """Quantizes the linear layers of a model's repeated blocks with GPTQ."""

    config: GPTQConfig
    replaces = (nn.Linear,)
    produces = (GPTQLinear,)
    requires_calibration = True

    def describe(self) -> str:
        return self.config.describe()

    def can_replace(self, module: nn.Module) -> bool:
        if not super().can_replace(module) or not module.weight.is_floating_point():
            return False
        multiple = packing_multiple(self.config.bits)
        return module.in_features % multiple == 0 and module.out_features % multiple == 0

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if self.can_replace(module):
            return None
        if isinstance(module, nn.Linear) and module.weight.is_floating_point():
            multiple = packing_multiple(self.config.bits)
            return (
                f"{module.in_features}x{module.out_features} does not pack at {self.config.bits} bits "
                f"(both sizes must be multiples of {multiple})"
            )
        return super().unsupported_reason(module)

    def offload_policy(self) -> str:
        """Offloaded modules stay quantized: the packed tensors run (slowly) anywhere."""
        return "quantized"

    def quantized_nbytes(self, module: nn.Module) -> int:
        bias = module.bias.numel() * module.bias.element_size() if module.bias is not None else 0
        sizes = gptq_nbytes(
            module.out_features, module.in_features, bits=self.config.bits, group_size=self.config.group_size
        )
        return sizes + bias

    def blocks_name(self) -> str | None:
        return self.config.block_name_to_quantize

    # ------------------------------------------------------------------ skeletons and checkpoints
    def create_quantized_module(self, module: nn.Module, name: str) -> GPTQLinear:
        """The skeleton a checkpoint loads into (``module`` on the meta device); GPTQ itself needs
        calibration, so a float module with real weights is refused."""
        if not module.weight.is_meta:
            raise ValueError(
                "GPTQ quantizes from calibration data: call quantcore.quantize(model, config, calibration=...) "
                "on a model with its float weights"
            )
        return GPTQLinear(
            module.in_features,
            module.out_features,
            bits=self.config.bits,
            group_size=self.config.group_size,
            bias=module.bias is not None,
            checkpoint_format=self.config.format,
            dtype=module.weight.dtype,
            device="meta",
        )

    def load_quantized_state(
        self, module: nn.Module, state: Mapping[str, torch.Tensor], device: torch.device | str | None = None
    ) -> nn.Module:
        """Fill a skeleton with a checkpoint's tensors; float tensors take the skeleton's dtypes
        (Hub checkpoints store fp16 biases for bf16 models), packed ones must be int32."""
        expected = module.state_dict(keep_vars=True)
        problems = [f"{key}: missing" for key in expected if key not in state]
        problems += [f"{key}: unexpected" for key in state if key not in expected]
        converted: dict[str, torch.Tensor] = {}
        for key, want in expected.items():
            got = state.get(key)
            if got is None:
                continue
            if tuple(got.shape) != tuple(want.shape):
                problems.append(f"{key}: expected shape {tuple(want.shape)}, got {tuple(got.shape)}")
            elif got.is_floating_point() != want.is_floating_point() or (
                not want.is_floating_point() and got.dtype != want.dtype
            ):
                problems.append(f"{key}: expected {want.dtype}, got {got.dtype}")
            else:
                converted[key] = got.to(want.dtype)
        if problems:
            raise ValueError(f"state does not fit GPTQLinear({module.extra_repr()}): " + "; ".join(problems))
        return super().load_quantized_state(module, converted, device)

    @classmethod
    def dequantize_module(cls, module: nn.Module) -> nn.Linear:
        linear = nn.Linear(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            device="meta",
            dtype=module.weight_dtype,
        )
        linear.weight = nn.Parameter(module.dequantized_weight())
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().to(module.weight_dtype))
        return linear

    # ------------------------------------------------------------------ calibration
    def calibration_data(self, model: nn.Module) -> Iterable[Any] | None:
        """Token ids of ``config.dataset`` (a list of texts) through ``config.tokenizer``, one text per batch."""
        config = self.config
        if config.dataset is None:
            return None
        if isinstance(config.dataset, str):
            raise ValueError(
                f"dataset={config.dataset!r} names a dataset transformers downloads; quantcore does not "
                f"download ({', '.join(DATASET_NAMES)}): pass the texts as dataset=[...] or calibration="
            )
        if config.tokenizer is None:
            raise ValueError("dataset is a list of texts but tokenizer is not set: give tokenizer= to tokenize them")
        tokenizer = config.tokenizer
        if isinstance(tokenizer, (str, Path)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        seqlen = config.model_seqlen or DEFAULT_SEQLEN
        batches = []
        for text in config.dataset:
            ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :seqlen]
            if ids.numel():
                batches.append(ids)
        return batches

    def quantize_block(self, block: CalibrationBlock) -> None:
        """GPTQ every target of ``block``, group by group (see the module docstring)."""
        if self.config.modules_in_block_to_quantize is not None:
            raise ValueError("modules_in_block_to_quantize is not supported for quantizing yet: use skip_modules")
        hessians: dict[str, Hessian] = {}
        first: dict[str, torch.Tensor] = {}  # each target's first input, to tell which share one
        leader: dict[str, str] = {}  # target -> the first target of its group, whose Hessian it shares

        sequential = self.config.true_sequential

        def add(name: str, x: torch.Tensor) -> None:
            if name not in leader:
                previous = next(reversed(first), None)
                leader[name] = leader[previous] if previous is not None and _same(first[previous], x) else name
                first[name] = x
            # true_sequential: only the first group quantizes from this run; the others re-run later
            if leader[name] == name and (not sequential or name == next(iter(leader))):
                if name not in hessians:
                    hessians[name] = Hessian.zeros(x.shape[-1], block.device)
                hessians[name].add(x)

        names = list(block.targets)
        with block.observe(names, add):
            block.run()
        groups = _groups(names, leader)
        first.clear()
        for k, group in enumerate(groups):
            hessian = hessians.pop(group[0], None)
            if k and sequential:
                hessian = self._rerun(block, group)
            self._quantize_group(block, group, hessian)

    @staticmethod
    def _rerun(block: CalibrationBlock, group: list[str]) -> Hessian:
        """The Hessian of ``group``'s shared input, through the layers already quantized."""
        lead = group[0]
        hessian = Hessian.zeros(block.targets[lead].in_features, block.device)

        def add(name: str, x: torch.Tensor) -> None:
            if name == lead:  # the others see the same input; observed only for their token counts
                hessian.add(x)

        with block.observe(group, add):
            block.run(stop_after=group)
        return hessian

    def _quantize_group(self, block: CalibrationBlock, group: list[str], hessian: Hessian | None) -> None:
        """One GPTQ run over the stacked weights of layers that share an input."""
        config = self.config
        modules = [block.targets[name] for name in group]
        weight = torch.cat([m.weight.detach() for m in modules]).to(block.device)
        result = gptq_quantize(
            weight,
            hessian,
            bits=config.bits,
            group_size=config.group_size,
            sym=config.sym,
            damp_percent=config.damp_percent,
            desc_act=config.desc_act,
        )
        start = 0
        for name, module in zip(group, modules, strict=True):
            rows = slice(start, start + module.out_features)
            start = rows.stop
            part = type(result)(result.codes[rows], result.scales[:, rows], result.zeros[:, rows], result.g_idx)
            new = GPTQLinear.from_result(
                module, part, bits=config.bits, group_size=config.group_size, checkpoint_format=config.format
            )
            block.replace(name, new)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two inputs are one: the same storage, or equal values."""
    return a.shape == b.shape and (a.data_ptr() == b.data_ptr() or torch.equal(a, b))


def _groups(names: list[str], leader: dict[str, str]) -> list[list[str]]:
    """Targets in the order of their first call, grouped by the leader whose input they share;
    targets the calibration never reached (unrouted experts) come last, each alone."""
    groups: dict[str, list[str]] = {}
    for name in leader:  # insertion order: the order of first calls
        groups.setdefault(leader[name], []).append(name)
    return [*groups.values(), *([n] for n in names if n not in leader)]
