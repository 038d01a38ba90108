"""A fault-injecting TCP proxy for tests: put it in front of the moto S3 server and cut, reset or slow the store.

``FaultProxy(upstream_url)`` listens on ``127.0.0.1:<port>`` and forwards every connection to the upstream
(the moto server). Other processes (Ray workers, a subprocess driver) reach the store through it with
``AWS_ENDPOINT_URL=proxy.endpoint_url``. Faults:

* ``proxy.down(mode="refuse")``: the listening socket is closed, new connections get ECONNREFUSED;
  ``mode="reset"``: connections are accepted and reset at once (ECONNRESET). Either way, open connections are
  reset. ``proxy.up()`` ends it; ``proxy.outage(seconds, mode)`` is ``down`` now and ``up`` after ``seconds``
  (it returns at once).
* ``proxy.delay_per_chunk_s``: each chunk read from a socket (at most 64 KiB) is held that long before it is
  forwarded, in both directions, so a transfer of B bytes takes at least ``ceil(B / 64 KiB)`` delays.
* ``proxy.bytes_to_server`` / ``proxy.bytes_to_client``: bytes forwarded each way; ``proxy.reset_counts()``.

It is bounded: at most ``max_connections`` open connections (more are reset), and it stops by itself after
``lifetime_s``. Use it as a context manager (``with FaultProxy(url) as proxy: ...``) or through the
``store_proxy`` fixture below, which fronts the ``s3`` fixture's server and points ``AWS_ENDPOINT_URL`` of
this process (and of processes it starts afterwards) at the proxy for the duration of one test. A test
module gets the fixture with ``pytest_plugins = ["faultproxy"]`` (or conftest.py lists it once for all).
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from urllib.parse import urlsplit

import pytest

__all__ = ["CHUNK", "FaultProxy", "store_proxy"]

#: Largest chunk read from a socket at once (bytes); the unit of ``delay_per_chunk_s``.
CHUNK = 64 * 1024

_POLL_S = 0.05


def _hard_close(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP RST (SO_LINGER 0), so the peer sees 'connection reset'."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class FaultProxy:
    """A TCP proxy from ``127.0.0.1:port`` to ``upstream`` (``"http://host:port"`` or ``(host, port)``).

    ``port=0`` picks a free port; ``endpoint_url`` is ``http://127.0.0.1:<port>``. Each socket is closed only
    by the thread that serves it (closing a socket another thread polls would delay the reset), so
    :meth:`down` and :meth:`close` signal those threads and wait (at most a second) until they are done.
    """

    def __init__(
        self,
        upstream: str | tuple[str, int],
        *,
        port: int = 0,
        delay_per_chunk_s: float = 0.0,
        lifetime_s: float = 300.0,
        max_connections: int = 256,
    ) -> None:
        if isinstance(upstream, str):
            parts = urlsplit(upstream)
            if not parts.hostname or not parts.port:
                raise ValueError(f"upstream {upstream!r}: expected http://host:port")
            upstream = (parts.hostname, parts.port)
        self.upstream = upstream
        self.delay_per_chunk_s = delay_per_chunk_s
        self.lifetime_s = lifetime_s
        self.max_connections = max_connections
        self._cond = threading.Condition()
        self._stopped = threading.Event()
        self._mode = "up"
        self._generation = 0  # bumped by down(): connections of an older generation reset themselves
        self._active = 0
        self._to_server = 0
        self._to_client = 0
        self._timers: list[threading.Timer] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._listener: socket.socket | None = self._listen(port)
        self.port = self._listener.getsockname()[1]
        #: storage options that reach the store through the proxy (the fixture adds the credentials)
        self.storage_options: dict = {"endpoint_url": self.endpoint_url}
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"faultproxy-{self.port}", daemon=True)
        self._acceptor.start()
        self._later(lifetime_s, self.close)

    # ------------------------------------------------------------------------------------------ public
    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def bytes_to_server(self) -> int:
        with self._cond:
            return self._to_server

    @property
    def bytes_to_client(self) -> int:
        with self._cond:
            return self._to_client

    def reset_counts(self) -> None:
        with self._cond:
            self._to_server = self._to_client = 0

    def down(self, mode: str = "refuse") -> None:
        """Cut the store: ``"refuse"`` new connections (ECONNREFUSED) or ``"reset"`` them (ECONNRESET).

        Open connections are reset. Returns once that is done and the listener is closed (``"refuse"``).
        """
        if mode not in ("refuse", "reset"):
            raise ValueError(f"mode {mode!r}: expected 'refuse' or 'reset'")
        with self._cond:
            self._mode = mode
            self._generation += 1
            self._wake()
            self._cond.wait_for(lambda: self._active == 0 and (mode == "reset" or self._listener is None),
                                timeout=1.0)

    def up(self) -> None:
        """End an outage: accept and forward connections again (on the same port)."""
        with self._cond:
            if self._stopped.is_set() or self._mode == "up":
                return
            if self._listener is None:
                self._listener = self._listen(self.port)
            self._mode = "up"
            self._wake()

    def outage(self, seconds: float, mode: str = "refuse") -> None:
        """``down(mode)`` now and ``up()`` after ``seconds``; returns at once."""
        self.down(mode)
        self._later(seconds, self.up)

    def close(self) -> None:
        """Stop: close the listener and reset every open connection (idempotent)."""
        with self._cond:
            self._stopped.set()
            timers, self._timers = self._timers, []
            self._wake()
        for t in timers:
            t.cancel()
        if threading.current_thread() is not self._acceptor:
            self._acceptor.join(timeout=1.0)
        with self._cond:
            self._cond.wait_for(lambda: self._active == 0, timeout=1.0)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------- internals
    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _later(self, seconds: float, fn) -> None:
        t = threading.Timer(seconds, fn)
        t.daemon = True
        with self._cond:
            self._timers.append(t)
        t.start()

    @staticmethod
    def _listen(port: int) -> socket.socket:
        deadline = time.monotonic() + 5.0
        while True:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
                continue
            sock.listen(128)
            sock.setblocking(False)
            return sock

    def _accept_loop(self) -> None:
        try:
            while not self._stopped.is_set():
                with self._cond:
                    listener = self._listener
                    if listener is not None and self._mode == "refuse":
                        listener.close()
                        self._listener = listener = None
                        self._cond.notify_all()
                ready, _, _ = select.select([self._wake_r] + ([listener] if listener else []), [], [], _POLL_S)
                if self._wake_r in ready:
                    self._wake_r.recv(4096)
                if listener is not None and listener in ready:
                    with contextlib.suppress(BlockingIOError):
                        self._admit(listener.accept()[0])
        finally:
            with self._cond:
                if self._listener is not None:
                    self._listener.close()
                    self._listener = None
                self._cond.notify_all()
            self._wake_r.close()
            self._wake_w.close()

    def _admit(self, client: socket.socket) -> None:
        client.setblocking(True)
        with self._cond:
            admit = self._mode == "up" and self._active < self.max_connections
            generation = self._generation
        if not admit:
            _hard_close(client)
            return
        try:
            server = socket.create_connection(self.upstream, timeout=5.0)
        except OSError:
            _hard_close(client)
            return
        with self._cond:
            self._active += 1
        threading.Thread(target=self._serve, args=(client, server, generation), daemon=True).start()

    def _cut(self, generation: int) -> bool:
        return self._stopped.is_set() or self._generation != generation

    def _serve(self, client: socket.socket, server: socket.socket, generation: int) -> None:
        """Forward both directions of one connection until both ends have closed, a fault or a stop."""
        route = {client: (server, True), server: (client, False)}
        sending = [client, server]
        clean = False
        try:
            while sending and not self._cut(generation):
                readable, _, _ = select.select(sending, [], [], _POLL_S)
                for src in readable:
                    dst, to_server = route[src]
                    data = src.recv(CHUNK)
                    if not data:
                        sending.remove(src)
                        dst.shutdown(socket.SHUT_WR)
                        continue
                    if self.delay_per_chunk_s > 0:
                        time.sleep(self.delay_per_chunk_s)
                    if self._cut(generation):
                        break
                    dst.sendall(data)
                    with self._cond:
                        if to_server:
                            self._to_server += len(data)
                        else:
                            self._to_client += len(data)
            clean = not sending
        except OSError:  # reset by a peer
            pass
        finally:
            for sock in (client, server):
                if clean:
                    sock.close()
                else:
                    _hard_close(sock)
            with self._cond:
                self._active -= 1
                self._cond.notify_all()


@pytest.fixture
def store_proxy(s3, monkeypatch):
    """A :class:`FaultProxy` in front of the ``s3`` fixture's moto server, for one test.

    ``AWS_ENDPOINT_URL`` points at the proxy while the test runs (so ``fnn_ray.storage.filesystem`` and any
    process started by the test go through it); ``proxy.storage_options`` holds explicit options for it.
    A Ray cluster started before the test keeps the endpoint it inherited: pass ``proxy.storage_options``
    (or ``runtime_env={"env_vars": {"AWS_ENDPOINT_URL": proxy.endpoint_url}}``) to reach the store through it.
    """
    with FaultProxy(s3.endpoint_url) as proxy:
        proxy.storage_options = {**s3.storage_options, **proxy.storage_options}
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        yield proxy
