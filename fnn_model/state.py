"""State a recurrent cell carries from frame to frame, exposed for activation checkpointing."""

from __future__ import annotations

import torch


class CellState:
    """Mixin of a cell whose state `(h, c)` lives in `_state` (None right after a reset)."""

    _state: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def sequence_state(self) -> list[torch.Tensor]:
        """The state carried to the next frame: `[h, c]`, or `[]` right after a reset."""
        return [] if self._state is None else list(self._state)

    @sequence_state.setter
    def sequence_state(self, tensors: list[torch.Tensor]) -> None:
        self._state = tuple(tensors) if tensors else None
