"""Vectorised analysis of in-silico experiments and model performance (``shared/IN_SILICO.md`` §3-4).

* :mod:`~fnn_ray.analysis.tuning` -- gOSI/gDSI, the bimodal von Mises fit, OSI/DSI and preferences.
* :mod:`~fnn_ray.analysis.receptive_fields` -- RF centres and SSI from flashing-dot STAs.
* :mod:`~fnn_ray.analysis.performance` -- CC_abs, CC_max, CC_norm from statistics accumulated over work items.

Numpy and pandas only (no Ray, no torch); figures are in :mod:`fnn_ray.plots`.
"""

from fnn_ray.analysis.performance import cc_from_stats, cc_stats, merge_stats
from fnn_ray.analysis.receptive_fields import rf_table
from fnn_ray.analysis.tuning import fit_von_mises, global_indices, tuning_table

__all__ = [
    "cc_from_stats",
    "cc_stats",
    "fit_von_mises",
    "global_indices",
    "merge_stats",
    "rf_table",
    "tuning_table",
]
