"""Values derived from a module's parameters (normalised weights, sampling tables), computed once and reused.

A cached value is recomputed when any parameter of the module is modified in place (tensor version counter,
which `load_state_dict` and optimiser steps bump), replaced or moved (`.to(...)`), when the extra key changes,
or always while autograd is on (so gradients flow to the parameters). Parameters are checked once per sequence:
after `recheck()` (called by the owning module's `reset_state`), not on every frame.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import torch
from torch import nn

T = TypeVar("T")


class Derived(Generic[T]):
    """One cached value derived from `module`'s parameters."""

    def __init__(self) -> None:
        self._stamp: tuple | None = None
        self._value: T | None = None
        self._checked = False

    def recheck(self) -> None:
        """Compare the parameters with the cached value's again on the next `get` (start of a sequence)."""
        self._checked = False

    def get(self, module: nn.Module, compute: Callable[[], T], key: Hashable = None) -> T:
        """The value, recomputed by `compute()` unless it is still current."""
        if torch.is_grad_enabled():
            return compute()
        if self._checked and self._stamp[0] == key:
            return self._value
        stamp = (key, *((p.data_ptr(), p._version, p.dtype) for p in module.parameters()))
        if stamp != self._stamp:
            self._value, self._stamp = compute(), stamp
        self._checked = True
        return self._value


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast runs matmuls and convs in on `device` right now, or None when autocast is off there.

    Weights derived once per sequence are cached in this dtype, so autocast does not recast them every frame.
    """
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None
