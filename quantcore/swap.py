"""Putting a new module in an old one's place: the one way the engine swaps modules."""

from __future__ import annotations

from torch import nn

__all__ = ["swap_module"]


def swap_module(parent: nn.Module, child: str, new: nn.Module) -> None:
    """Put ``new`` in ``parent``'s slot ``child`` in the train/eval mode of the module it replaces.

    Modules are built in training mode (``nn.Module``'s default), whatever the model's mode is;
    some kernels take another path in training (bitsandbytes' int8 matmul does), so a new module
    in an eval-mode model must be in eval mode too.
    """
    old = parent._modules[child]
    if old is not None:
        new.train(old.training)
    parent._modules[child] = new
