"""fnn_model: the FNN network (MICrONS digital twin) in PyTorch, state-dict compatible with the public release.

Modules, bottom-up: `config` (dataclasses), `ops`, `cache`, `state`, `wconv`, `intergroup` and `mlp` (building
blocks), `feedforward` and `recurrent` (the shared core), `perspective`, `modulation` and `readout` (the per-scan
head), `inputs` and `network` (assembly and `predict`), `release` (the on-disk release format on any fsspec URL),
`synthetic` (random releases and clips), `microns` (the original package's convenience API), `engine` (many
scans x clips on one device in one batch) and the `training` package (fitting a new scan's head on the frozen
core).
"""

from fnn_model.config import NetworkConfig
from fnn_model.network import Core, Network, ScanHead

__all__ = ["Core", "Network", "NetworkConfig", "ScanHead"]
