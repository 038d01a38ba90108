"""Ray start-up of a job outside a cluster: a private local instance that advertises only the loopback address."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_private_local_ray_is_on_loopback():
    script = ("import ray; from fnn_ray.pool import init_ray\n"
              "assert init_ray()\n"
              "@ray.remote\n"
              "def where(): return ray.util.get_node_ip_address()\n"
              "print(sorted({n['NodeManagerAddress'] for n in ray.nodes()}), ray.get(where.remote()))\n"
              "ray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "['127.0.0.1'] 127.0.0.1"
    assert "Token authentication is enabled" not in proc.stderr  # our private instance's start is quiet
