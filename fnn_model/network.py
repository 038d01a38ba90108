"""Assembly: the shared `Core`, the per-scan `ScanHead`, and the single-scan `Network` with `predict`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fnn_model.config import NetworkConfig
from fnn_model.feedforward import Feedforward
from fnn_model.inputs import FrameInputs, parse_inputs
from fnn_model.modulation import Modulation
from fnn_model.perspective import Perspective
from fnn_model.readout import Readout
from fnn_model.recurrent import Recurrent


def reset_state(module: nn.Module) -> None:
    """Start a new sequence: clear every temporal history, recurrent state and weight cache below `module`."""
    for child in module.modules():
        if child is not module and hasattr(child, "reset_state"):
            child.reset_state()


class Core(nn.Module):
    """Shared core: retina image `[N, C, Hr, Wr]` and modulation features `[N, S*F]` -> `[N, S*out, h, w]`.

    State-dict keys are `feedforward.*` and `recurrent.*` (`core.*` inside a `Network`).
    """

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        self.config = config
        self.feedforward = Feedforward(config.feedforward, config.streams, config.stimuli)
        self.recurrent = Recurrent(
            config.recurrent, config.feedforward.out_channels, config.modulation.lstm_features, config.streams
        )

    def reset_state(self) -> None:
        """Start a new sequence."""
        reset_state(self)

    def forward(self, image: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        """`[N, C, Hr, Wr]`, `[N, S*F]` -> `[N, S*out, h, w]`."""
        x = image.repeat(1, self.config.streams, 1, 1)
        return self.recurrent(self.feedforward(x), modulation)


class ScanHead(nn.Module):
    """Everything that is per scan: `perspective`, `modulation` and `readout` of `units` units."""

    def __init__(self, config: NetworkConfig, units: int) -> None:
        super().__init__()
        self.config, self.units = config, units
        self.perspective = Perspective(config.perspective, config.perspectives)
        self.modulation = Modulation(config.modulation, config.modulations, config.streams)
        self.readout = Readout(units, config.recurrent.out_channels, config.streams)

    def reset_state(self) -> None:
        """Start a new sequence."""
        reset_state(self)

    def encode(self, stimulus: torch.Tensor, eye: torch.Tensor, behaviour: torch.Tensor,
               grid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs of one frame -> core inputs: retina image `[N, C, Hr, Wr]`, modulation features `[N, S*F]`.

        `stimulus` `[N, C, H, W]` in [0, 1]; `eye` `[N, P]`; `behaviour` `[N, M]`; `grid` the perspective's
        sampling grid for `eye` when already computed (`[N, Hr, Wr, 2]`).
        """
        return self.perspective(stimulus, eye, grid=grid), self.modulation(behaviour)

    def rates(self, core_output: torch.Tensor) -> torch.Tensor:
        """Core output `[N, S*out, h, w]` -> firing rates `[N, U]` (exp of the stream-mean log-rate)."""
        return torch.exp(self.readout(core_output).mean(dim=1))


class Network(nn.Module):
    """One scan's complete network; `state_dict()` has exactly the release's keys (`core.*`, `perspective.*`,
    `modulation.*`, `readout.*`).
    """

    def __init__(self, config: NetworkConfig, units: int, core: Core | None = None, head: ScanHead | None = None):
        super().__init__()
        head = head if head is not None else ScanHead(config, units)
        self.config, self.units = config, head.units
        self.core = core if core is not None else Core(config)
        self.perspective, self.modulation, self.readout = head.perspective, head.modulation, head.readout
        self._head = [head]  # a plain list: the head's modules are already registered under their own names

    @property
    def head(self) -> ScanHead:
        return self._head[0]

    def reset(self) -> None:
        """Start a new sequence (clears all recurrent and temporal state)."""
        reset_state(self)

    def forward(self, stimulus: torch.Tensor, eye: torch.Tensor, behaviour: torch.Tensor) -> torch.Tensor:
        """One frame: stimulus `[N, C, H, W]` in [0, 1], eye `[N, P]`, behaviour `[N, M]` -> rates `[N, U]`."""
        image, features = self.head.encode(stimulus, eye, behaviour)
        return self.head.rates(self.core(image, features))

    def predict(
        self,
        stimuli: Sequence[np.ndarray] | np.ndarray,
        perspectives: Sequence[np.ndarray] | np.ndarray | None = None,
        modulations: Sequence[np.ndarray] | np.ndarray | None = None,
    ) -> np.ndarray:
        """Responses to a clip, starting from a reset state (the original package's `predict`).

        `stimuli`: T frames, each uint8 `[H, W]`, `[H, W, C]` or `[N, H, W, C]`; `perspectives` / `modulations`:
        T vectors `[P]` or `[N, P]` (zeros when omitted). Returns float32 `[T, U]`, or `[T, N, U]` as soon as
        any input is batched.
        """
        inputs = parse_inputs(stimuli, perspectives, modulations, self.config)
        return self.run(inputs)

    def run(self, inputs: FrameInputs) -> np.ndarray:
        """Run parsed inputs frame by frame from a reset state -> float32 `[T, U]` or `[T, N, U]`."""
        device = next(self.parameters()).device
        frames, eye, behaviour = inputs.to(device)
        self.reset()
        out = torch.empty(len(frames), frames.shape[1], self.units, device=device)
        with torch.inference_mode():
            for t in range(len(frames)):
                out[t] = self(frames[t].float() / 255, eye[t], behaviour[t])
        self.reset()
        result = out.cpu().numpy()
        return result if inputs.batched else result[:, 0]
