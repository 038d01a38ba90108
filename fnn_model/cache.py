"""Values derived from a module's parameters (normalised weights, sampling tables), computed once and reused.

A cached value is recomputed when any parameter of the module is modified in place (tensor version counter,
which `load_state_dict` and optimiser steps bump), replaced or moved (`.to(...)`), when the extra key changes or
when the autograd mode changes (inference mode, grad on or off). Parameters are checked once per sequence: after
`recheck()` (called by the owning module's `reset_state`), not on every frame.

Under autograd, a value of a module with a parameter that requires grad is part of that sequence's graph: it is
computed again at the first `get` of every sequence (after `recheck()`) and reused only within it, so one
backward per sequence sees one copy of the derived weights. A module whose parameters are all frozen caches as
in evaluation (the value holds no graph). Inference-mode values are never handed to autograd.
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
        self._mode: tuple | None = None
        self._value: T | None = None
        self._checked = False

    def recheck(self) -> None:
        """Compare the parameters with the cached value's again on the next `get` (start of a sequence); a value
        that is part of a graph is dropped."""
        self._checked = False
        if self._stamp is None:
            self._value = None

    def get(self, module: nn.Module, compute: Callable[[], T], key: Hashable = None) -> T:
        """The value, recomputed by `compute()` unless it is still current."""
        mode = (key, torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        if self._checked and self._mode == mode:
            return self._value
        if mode[1] and any(p.requires_grad for p in module.parameters()):
            self._value, self._stamp = compute(), None  # part of this sequence's graph: never reused after it
        else:
            stamp = (mode, *((p.data_ptr(), p._version, p.dtype) for p in module.parameters()))
            if stamp != self._stamp:
                self._value, self._stamp = compute(), stamp
        self._mode, self._checked = mode, True
        return self._value


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast runs matmuls and convs in on `device` right now, or None when autocast is off there.

    Weights derived once per sequence are cached in this dtype, so autocast does not recast them every frame.
    """
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None
