"""A trainable twin: the frozen foundation core (and a foundation scan's frozen modulation LSTM) with a fresh,
trainable perspective, modulation MLP and readout for a new scan of `units` units (TRAINING.md)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections import OrderedDict

import torch
from torch import nn

from fnn_model.network import Core, Network, ScanHead
from fnn_model.modulation import Modulation
from fnn_model.release import Release
from fnn_model.training.streams import stream_view

#: State-dict key prefixes of the frozen tensors: the core and the copied modulation LSTM.
FROZEN_PREFIXES = ("core.", "modulation.lstm.")


class Twin(Network):
    """A `Network` whose core and `modulation.lstm` are frozen (no gradient, evaluation mode).

    Its `state_dict()` has the release's keys; `predict` is the evaluation mode. The training mode runs one stream
    at a time through `stream(s)`, single-stream views sharing stream `s`'s parameters (`fnn_model.training.
    streams`).
    """

    def __init__(self, core: Core, head: ScanHead) -> None:
        super().__init__(core.config, head.units, core=core, head=head)
        for name, p in self.named_parameters():
            p.requires_grad_(not name.startswith(FROZEN_PREFIXES))
        self._views: dict[int, tuple[Core, Modulation]] = {}

    def train(self, mode: bool = True) -> Twin:
        """Set the training flag of the trained modules; the frozen ones stay in evaluation mode."""
        super().train(mode)
        self.core.eval()
        self.modulation.lstm.eval()
        return self

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(state-dict key, parameter) of every trained tensor, in registration order."""
        return [(name, p) for name, p in self.named_parameters() if p.requires_grad]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every trained tensor: perspective, modulation MLP, readout."""
        return [p for _, p in self.named_trainable_parameters()]

    def frozen_state(self) -> dict[str, torch.Tensor]:
        """Every frozen tensor (parameters and buffers of the core and `modulation.lstm`) by state-dict key."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(FROZEN_PREFIXES)}

    def frozen_state_hash(self) -> str:
        """SHA-256 over the key, dtype, shape and bytes of every frozen tensor, in key order."""
        digest = hashlib.sha256()
        for key, value in sorted(self.frozen_state().items()):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"{key}|{tensor.dtype}|{list(tensor.shape)}|".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def head_state_dict(self) -> OrderedDict[str, torch.Tensor]:
        """Exactly the keys, shapes and dtypes of a public `params_<session>_<scan_idx>.pt` (CPU copies)."""
        return OrderedDict((k, v.detach().cpu().clone()) for k, v in self.head.state_dict().items())

    def load_head_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a head state (as `head_state_dict` returns it; strict keys) into the head."""
        self.head.load_state_dict(state, strict=True)

    def stream(self, stream: int) -> tuple[Core, Modulation]:
        """Single-stream views `(core, modulation)` of stream `stream` (built once, sharing its parameters)."""
        if not 0 <= stream < self.config.streams:
            raise ValueError(f"Twin.stream: stream must be in 0..{self.config.streams - 1}, got {stream}")
        if stream not in self._views:
            single = dataclasses.replace(self.config, streams=1)
            with torch.random.fork_rng(devices=[]):  # building a module draws initial values: leave the RNG be
                core = stream_view(self.core, lambda: Core(single), stream)
                modulation = stream_view(self.modulation,
                                         lambda: Modulation(single.modulation, single.modulations, 1), stream)
            self._views[stream] = (core.eval(), modulation)
        return self._views[stream]

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        self._views = {}  # buffers move to new tensors: rebuild the views on next use
        return super()._apply(fn, recurse)


def fresh_head(release: Release, foundation_scan: tuple[int, int], units: int, seed: int = 0) -> ScanHead:
    """A new scan head of `units` units as a fresh network initialises it (spec 5: readout feature weights and
    `mu` zero, identity eye rotation, behaviour ignored at first), with the foundation scan's `modulation.lstm`
    and perspective buffers copied. Raises `ReleaseError` for a scan the release does not hold."""
    foundation = release.load_head(*foundation_scan)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = ScanHead(release.config, units)
    head.modulation.lstm.load_state_dict(foundation.modulation.lstm.state_dict())
    buffers = dict(foundation.perspective.named_buffers())
    with torch.no_grad():
        for name, buffer in head.perspective.named_buffers():
            buffer.copy_(buffers[name])
    return head


def build_twin(release: Release, foundation_scan: tuple[int, int], units: int, seed: int = 0) -> Twin:
    """A trainable twin on `release`'s core (a private copy, frozen) with `modulation.lstm` copied from
    `foundation_scan` (frozen) and a fresh head of `units` units (`fresh_head`). CPU, float32."""
    if units < 1:
        raise ValueError(f"build_twin: units must be >= 1, got {units}")
    head = fresh_head(release, foundation_scan, units, seed)
    return Twin(copy.deepcopy(release.load_core()), head)
