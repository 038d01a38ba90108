"""Command-line jobs of fnn-ray (run with ``python -m jobs.<name>``).

Importing the package (which ``python -m jobs.<name>`` does first, before torch loads) sets ``OMP_WAIT_POLICY``
to ``PASSIVE`` unless it is set: torch's OpenMP threads then sleep between parallel regions instead of spinning,
so CPU workers sharing cores (several actors on a node, a driver beside them) do not starve each other
(docs/performance.md has the measurement). Ray workers get the same setting (:class:`fnn_ray.pool.RayPool`).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
