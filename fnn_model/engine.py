"""Multi-scan inference engine: one core and many scan heads on one device, all scans x clips in one batch.

Per frame, every head turns the frame (and its clip's eye position and behaviour) into core inputs, the core
runs ONCE on the concatenated batch `[K*N, ...]` (K scans, N clips), and every head reads its slice out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch

from fnn_model.network import Core, ScanHead

ScanKey = tuple[int, int]


def _as_tensor(values: torch.Tensor | np.ndarray | None) -> torch.Tensor | None:
    if values is None or isinstance(values, torch.Tensor):
        return values
    array = np.ascontiguousarray(values)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


class Engine:
    """Predict many scans for a batch of clips on `device`, in float32 (default) or bfloat16 autocast."""

    def __init__(self, core: Core, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"Engine: dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        self.device, self.dtype = torch.device(device), dtype
        self.config = core.config
        self.core = core.to(self.device).eval()
        self.heads: dict[ScanKey, ScanHead] = {}

    def add_head(self, key: ScanKey, head: ScanHead) -> None:
        """Hold a scan head on the device (replacing any head of the same scan)."""
        if head.config != self.config:
            raise ValueError(f"Engine: head {key} was built for another network config than the core")
        self.heads[key] = head.to(self.device).eval()

    def remove_head(self, key: ScanKey) -> None:
        """Drop a scan head (frees its device memory)."""
        self.heads.pop(key, None)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def predict(
        self,
        clips: torch.Tensor | np.ndarray,
        scans: Sequence[ScanKey],
        perspectives: torch.Tensor | np.ndarray | None = None,
        modulations: torch.Tensor | np.ndarray | None = None,
        lengths: Sequence[int] | None = None,
    ) -> dict[ScanKey, np.ndarray]:
        """Responses of `scans` to `clips` uint8 `[N, T, H, W]`, each clip from a reset state.

        `perspectives` / `modulations`: float `[N, T, 2]` (zeros when None). `lengths[n]`: clip n is valid for
        `t < lengths[n]` (clips of a call may differ in length; padded frames never influence valid ones, since
        the model is causal and clips do not interact). Returns per scan float32 `[N, T, U_scan]`; entries at
        `t >= lengths[n]` are unspecified.
        """
        frames = _as_tensor(clips)
        if frames.dtype != torch.uint8 or frames.dim() != 4:
            raise ValueError(f"Engine.predict: clips must be uint8 [N, T, H, W], got {frames.dtype} {list(frames.shape)}")
        missing = [key for key in scans if key not in self.heads]
        if missing:
            raise KeyError(f"Engine.predict: no head loaded for scan(s) {missing}; loaded: {sorted(self.heads)}")
        n, t = frames.shape[:2]
        eye = self._vectors(perspectives, n, t, self.config.perspectives, "perspectives")
        behaviour = self._vectors(modulations, n, t, self.config.modulations, "modulations")
        steps = t if lengths is None else int(max(lengths, default=0))
        heads = [self.heads[key] for key in scans]
        out = [torch.zeros(n, t, head.units, device=self.device) for head in heads]
        frames = frames.to(self.device, non_blocking=True)
        self.core.reset_state()
        for head in heads:
            head.reset_state()
        with torch.inference_mode(), self._autocast():
            # the eye often stays put (no perspective data: zeros): then each head's sampling grid is made once
            still = t > 0 and (perspectives is None or bool((eye == eye[:, :1]).all()))
            grids = ([head.perspective.sampling_grid(eye[:, 0], *frames.shape[2:]) for head in heads] if still
                     else [None] * len(heads))
            for step in range(steps):
                stimulus = frames[:, step, None].float() / 255  # [N, 1, H, W]
                encoded = [head.encode(stimulus, eye[:, step], behaviour[:, step], grid)
                           for head, grid in zip(heads, grids)]
                images = torch.cat([image for image, _ in encoded])  # [K*N, C, Hr, Wr]
                features = torch.cat([feature for _, feature in encoded])  # [K*N, S*F]
                core_out = self.core(images, features).chunk(len(heads))
                for k, head in enumerate(heads):
                    out[k][:, step] = head.rates(core_out[k]).float()
        self.core.reset_state()
        return {key: o.cpu().numpy() for key, o in zip(scans, out)}

    def _vectors(self, values: torch.Tensor | np.ndarray | None, n: int, t: int, size: int, name: str
                 ) -> torch.Tensor:
        if values is None:
            return torch.zeros(n, t, size, device=self.device)
        tensor = _as_tensor(values).to(self.device, torch.float32)
        if tuple(tensor.shape) != (n, t, size):
            raise ValueError(f"Engine.predict: {name} must be [N, T, {size}] = {[n, t, size]}, got {list(tensor.shape)}")
        return tensor
