"""A batch of training windows, as every training function takes it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def _tensor(values: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values
    array = np.ascontiguousarray(values)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


@dataclass(frozen=True)
class Batch:
    """B windows of T frames: `stimuli` uint8 `[B, T, H, W]` (any frame size; 144 x 256 in the public data),
    `perspectives` float `[B, T, P]`, `modulations` float `[B, T, M]`, `units` float `[B, T, U]` (responses).

    numpy arrays are accepted and wrapped (no copy unless read-only); `check` raises `ValueError` on a mismatch.
    """

    stimuli: torch.Tensor
    perspectives: torch.Tensor
    modulations: torch.Tensor
    units: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("stimuli", "perspectives", "modulations", "units"):
            object.__setattr__(self, name, _tensor(getattr(self, name)))
        self.check()

    @property
    def size(self) -> int:
        return self.stimuli.shape[0]

    @property
    def frames(self) -> int:
        return self.stimuli.shape[1]

    def check(self, perspectives: int | None = None, modulations: int | None = None, units: int | None = None
              ) -> None:
        """Shapes agree (`[B, T, ...]` everywhere), stimuli are uint8; optionally the feature sizes."""
        if self.stimuli.dtype != torch.uint8 or self.stimuli.dim() != 4:
            raise ValueError(f"Batch: stimuli must be uint8 [B, T, H, W], got {self.stimuli.dtype} "
                             f"{list(self.stimuli.shape)}")
        lead = tuple(self.stimuli.shape[:2])
        for name, size in (("perspectives", perspectives), ("modulations", modulations), ("units", units)):
            value = getattr(self, name)
            if value.dim() != 3 or tuple(value.shape[:2]) != lead or (size is not None and value.shape[2] != size):
                expected = f"[{lead[0]}, {lead[1]}, {size if size is not None else '*'}]"
                raise ValueError(f"Batch: {name} must be {expected}, got {list(value.shape)}")
