"""Fixtures shared by the whole test suite.

* ``s3`` (session): a moto S3 server on 127.0.0.1 with one bucket; AWS env vars point at it, so code in
  this process and in processes started later (Ray workers) reaches it without storage options.
* ``s3_url`` : a fresh, empty ``s3://`` prefix for one test.
* ``tmp_url`` : factory ``tmp_url(kind)`` -> a fresh URL of kind ``"local"``, ``"memory"`` or ``"s3"``.
* ``ray_cluster`` (module) on ``ray_session`` (session): one private local Ray for the whole session with
  ``RAY_CPUS`` logical CPUs and ``RAY_GPUS`` fake GPUs (jobs place one actor per GPU; the model still runs on the
  CPU since torch sees no CUDA device), started after the moto server so workers inherit the AWS_* variables.
* ``golden_dir`` (session): the golden release directory ($FNN_GOLDEN or ../shared/golden); skips when it is
  missing, fails instead when FNN_REQUIRE_GOLDEN=1.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# before torch loads (its OpenMP reads this once): threads that sleep instead of spinning, as the jobs set it, so
# the test process, its Ray workers and its job subprocesses do not starve each other on a small machine
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

pytest_plugins = ["faultproxy"]

REPO_ROOT = Path(__file__).resolve().parent.parent

#: The session's Ray: logical CPUs and fake GPUs.
RAY_CPUS, RAY_GPUS = 4, 4

#: Dummy credentials used against the moto server; distinctive so tests can check they never leak.
S3_KEY = "fnn-test-access-key"
S3_SECRET = "fnn-test-secret-do-not-leak"
S3_REGION = "us-east-1"


@dataclass
class S3Server:
    """A running moto S3 server: ``endpoint_url``, ``bucket`` and the ``storage_options`` to reach it."""

    endpoint_url: str
    bucket: str
    storage_options: dict = field(default_factory=dict)

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *(p.strip("/") for p in parts)])


_ENV = {
    "AWS_ACCESS_KEY_ID": S3_KEY,
    "AWS_SECRET_ACCESS_KEY": S3_SECRET,
    "AWS_REGION": S3_REGION,
    "AWS_DEFAULT_REGION": S3_REGION,
}
_UNSET = ["AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3"]


@pytest.fixture(scope="session")
def s3():
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in [*_ENV, *_UNSET, "AWS_ENDPOINT_URL"]}
    os.environ.update(_ENV, AWS_ENDPOINT_URL=endpoint)
    for k in _UNSET:
        os.environ.pop(k, None)
    try:
        import s3fs

        bucket = "fnn-test"
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, key=S3_KEY, secret=S3_SECRET, skip_instance_cache=True)
        fs.mkdir(bucket)
        yield S3Server(
            endpoint_url=endpoint,
            bucket=bucket,
            storage_options={"endpoint_url": endpoint, "key": S3_KEY, "secret": S3_SECRET},
        )
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture
def s3_url(s3: S3Server, request) -> str:
    """A fresh, empty prefix in the test bucket (distinct per test, so no listing is shared)."""
    name = re.sub(r"[^A-Za-z0-9-]+", "-", request.node.name)[:60].strip("-")
    return s3.url(f"{name}-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def tmp_url(tmp_path, request):
    """Factory: ``tmp_url(kind="local", name="data")`` -> a fresh URL on the local disk, memory:// or s3://."""
    created_memory = []

    def make(kind: str = "local", name: str = "data") -> str:
        if kind == "local":
            return str(tmp_path / f"{name}-{uuid.uuid4().hex[:8]}")
        if kind == "memory":
            url = f"memory://fnn-test-{uuid.uuid4().hex[:12]}/{name}"
            created_memory.append(url)
            return url
        if kind == "s3":
            return request.getfixturevalue("s3").url(f"{name}-{uuid.uuid4().hex[:12]}")
        raise ValueError(f"unknown kind {kind!r}")

    yield make
    if created_memory:
        import fsspec

        mem = fsspec.filesystem("memory")
        for url in created_memory:
            root = url[len("memory://") :].split("/")[0]
            if mem.exists(f"/{root}"):
                mem.rm(f"/{root}", recursive=True)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """The golden release directory (holds ``release/`` and ``cases/``)."""
    env = os.environ.get("FNN_GOLDEN")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "golden"
    if not (path / "release").is_dir() or not (path / "cases").is_dir():
        reason = (
            f"golden release not found at {path} (expected release/ and cases/; "
            f"set FNN_GOLDEN to its directory)"
        )
        if os.environ.get("FNN_REQUIRE_GOLDEN") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return path.resolve()


@pytest.fixture(scope="session")
def ray_session(s3):
    """One local Ray for the whole session (see the module docstring), started on first use.

    The test process itself computes references with one torch thread: on a loaded 2-core machine, spinning
    OpenMP threads next to the Ray workers slow the tiny model down by orders of magnitude.
    """
    import ray
    import torch

    if ray.is_initialized():
        ray.shutdown()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), saved]))
    ray.init(num_cpus=RAY_CPUS, num_gpus=RAY_GPUS, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    torch.set_num_threads(threads)
    if saved is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = saved


@pytest.fixture(scope="module")
def ray_cluster(ray_session):
    """The session's Ray for one test module; the workers a module kept for reuse are stopped at its end (they
    hold CPUs and GPUs the next module may need)."""
    from fnn_ray.pool import RayPool

    yield ray_session
    RayPool.shutdown()


@pytest.fixture
def s3_gets(monkeypatch) -> list[int]:
    """The body sizes of every S3 GetObject this process makes from now on (counted at the s3fs client)."""
    import s3fs

    fetched: list[int] = []
    call = s3fs.S3FileSystem._call_s3

    async def counting(self, method, *args, **kwargs):
        out = await call(self, method, *args, **kwargs)
        if method == "get_object":
            fetched.append(int(out["ContentLength"]))
        return out

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counting)
    return fetched


def pytest_collection_modifyitems(config, items):
    """Every test that needs Ray (its start alone takes seconds on a loaded machine) or rides out a store outage
    (the fault proxy's outages last seconds) is ``slow``."""
    for item in items:
        if {"ray_cluster", "ray_session", "store_proxy"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
