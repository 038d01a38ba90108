"""The original package's convenience API: `model, ids = microns.scan(session=8, scan_idx=5)`."""

from __future__ import annotations

import os
from collections.abc import Mapping

import pandas as pd
import torch

from fnn_model.network import Network
from fnn_model.release import Release

#: Where `scan` looks when no directory is given (the unpacked public release).
DEFAULT_DIRECTORY = "~/.cache/fnn/microns"


def scan(
    session: int,
    scan_idx: int,
    directory: str = DEFAULT_DIRECTORY,
    device: str | torch.device = "cpu",
    storage_options: Mapping[str, object] | None = None,
) -> tuple[Network, pd.DataFrame]:
    """Load one scan's network from a release (directory or `.zip`, any fsspec URL).

    Returns the network (eval mode, on `device`) and the scan's unit table indexed by `readout_id`: column `u`
    of `model.predict(...)` is the unit with `readout_id == u`.
    """
    if "://" not in directory:
        directory = os.path.expanduser(directory)
    release = Release.open(directory, storage_options=storage_options)
    model = release.load_network(session, scan_idx).to(device)
    return model, release.units(session, scan_idx)
