"""GPTQ on quantcore's calibration engine, one block at a time.

For each block the engine hands over, the layers are grouped by the input they share, in the
order the forward calls them (for a Llama layer: q/k/v, o, gate/up, down; found by comparing their
inputs on the first batch, so no architecture table is needed). Layers sharing an input share a
Hessian and are quantized in one GPTQ run (their weights stacked). With ``true_sequential`` each
group's Hessian comes from a forward through the groups already quantized.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .config import DATASET_NAMES, GPTQConfig
from .gptq import Hessian, gptq_quantize
from .modules import GPTQLinear

if TYPE_CHECKING:
    from quantcore.calibrate import CalibrationBlock

__all__ = ["DEFAULT_SEQLEN", "calibration_batches", "quantize_block"]

DEFAULT_SEQLEN = 2048
"""Tokens kept of each calibration text when the config sets no ``model_seqlen``."""


def calibration_batches(config: GPTQConfig) -> list[torch.Tensor] | None:
    """Token ids of ``config.dataset`` (a list of texts) through ``config.tokenizer``, one text per batch."""
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


def quantize_block(config: GPTQConfig, block: CalibrationBlock) -> None:
    """GPTQ every target of ``block``, group by group (see the module docstring)."""
    if config.modules_in_block_to_quantize is not None:
        raise ValueError("modules_in_block_to_quantize is not supported for quantizing yet: use skip_modules")
    hessians: dict[str, Hessian] = {}
    first: dict[str, torch.Tensor] = {}  # each target's first input, to tell which share one
    leader: dict[str, str] = {}  # target -> the first target of its group, whose Hessian it shares

    sequential = config.true_sequential

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
            hessian = _rerun(block, group)
        _quantize_group(config, block, group, hessian)


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


def _quantize_group(config: GPTQConfig, block: CalibrationBlock, group: list[str], hessian: Hessian | None) -> None:
    """One GPTQ run over the stacked weights of layers that share an input."""
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
