"""The HTTP endpoint: ``prometheus_client``'s server on 127.0.0.1, one per port and process.

Every model a job records (``moeprobe record`` offers each one it builds) adds its shard to the same endpoint,
told apart by the ``model`` label: two collectors on one registry would expose each family twice, which no
scraper accepts. The server's threads are daemons that only read snapshots; closing the endpoint stops them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .options import MetricsOptions, ShardView

HOST = "127.0.0.1"

ShardsFn = Callable[[], list[ShardView]]


class MetricsEndpointError(RuntimeError):
    """The endpoint could not start (port in use, no permission, prometheus-client missing)."""


class Endpoint:
    def __init__(self, port: int, options: MetricsOptions, *, host: str = HOST) -> None:
        try:
            from prometheus_client import CollectorRegistry, start_http_server
        except ImportError as exc:
            raise MetricsEndpointError("serving metrics needs prometheus-client: pip install 'moeprobe[metrics]'") from exc
        from .collector import MoeCollector

        if not 0 <= port <= 65535:
            raise MetricsEndpointError(f"metrics port {port} is not a TCP port (0-65535)")
        self.options = options
        self._lock = threading.Lock()
        self._sources: dict[int, ShardsFn] = {}
        self._next = 0
        self.users = 0
        registry = CollectorRegistry(auto_describe=False)  # our families only: no process or GC collectors
        registry.register(MoeCollector(self._shards, options))
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise MetricsEndpointError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from exc
        self.host = host
        self.port = int(self._server.server_port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def add(self, shards: ShardsFn) -> int:
        with self._lock:
            key = self._next
            self._next += 1
            self._sources[key] = shards
            return key

    def remove(self, key: int) -> None:
        with self._lock:
            self._sources.pop(key, None)

    def _shards(self) -> list[ShardView]:
        with self._lock:
            sources = list(self._sources.values())
        views: list[ShardView] = []
        for source in sources:
            views.extend(source())
        return views

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)


_shared: dict[int, Endpoint] = {}
_shared_lock = threading.Lock()


def acquire(port: int, options: MetricsOptions) -> Endpoint:
    """The endpoint of this process on ``port``, started on first use (port 0: a new one on a free port)."""
    with _shared_lock:
        endpoint = _shared.get(port) if port else None
        if endpoint is None:
            endpoint = Endpoint(port, options)
            if port:
                _shared[port] = endpoint
        elif endpoint.options != options:
            raise MetricsEndpointError(f"metrics port {port} already serves other metric options ({endpoint.options})")
        endpoint.users += 1
        return endpoint


def release(endpoint: Endpoint) -> None:
    """Drop one user; the last one stops the server."""
    with _shared_lock:
        endpoint.users -= 1
        if endpoint.users > 0:
            return
        if _shared.get(endpoint.port) is endpoint:
            del _shared[endpoint.port]
    endpoint.close()

