"""`cache.Derived` under the three autograd modes: when a derived value is reused and when it is computed again."""

from __future__ import annotations

import torch
from torch import nn

from fnn_model.cache import Derived


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))
        self.cache: Derived[torch.Tensor] = Derived()
        self.computed = 0

    def value(self) -> torch.Tensor:
        def compute() -> torch.Tensor:
            self.computed += 1
            return self.weight * 2
        return self.cache.get(self, compute)


def test_a_trained_module_computes_once_per_sequence_under_autograd() -> None:
    module = Scaled()
    first = module.value()
    assert module.value() is first and module.computed == 1  # reused within the sequence
    first.sum().backward()
    module.cache.recheck()  # next sequence: the old value belongs to a spent graph
    second = module.value()
    assert second is not first and module.computed == 2 and second.grad_fn is not None
    (second * 3).sum().backward()  # a fresh graph: no "backward through the graph a second time"
    assert module.weight.grad.tolist() == [8.0, 8.0, 8.0]


def test_a_frozen_module_caches_across_sequences_and_modes_stay_apart() -> None:
    module = Scaled().requires_grad_(False)
    with torch.inference_mode():
        inference = module.value()
    module.cache.recheck()
    under_grad = module.value()  # an inference tensor is never handed to autograd
    assert under_grad is not inference and not under_grad.is_inference() and module.computed == 2
    module.cache.recheck()
    assert module.value() is under_grad and module.computed == 2  # frozen: reused across sequences
    with torch.no_grad():
        module.weight.add_(1)  # a changed parameter is seen at the next sequence
    module.cache.recheck()
    assert module.value().tolist() == [4.0, 4.0, 4.0] and module.computed == 3
