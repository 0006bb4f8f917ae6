"""The recording side of the endpoint: counts fed by the capture pipeline's writer thread, health read from it.

Nothing here runs on the model's thread. The pipeline calls ``LiveCounts.add`` from its writer thread with the
tables it is about to write; a scrape reads a snapshot of those counts and the writer's counters on the HTTP
server's thread.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .counts import LiveCounts
from .endpoint import MetricsEndpointError, acquire, release
from .options import Health, MetricsOptions, ShardView, heartbeat_age


class MetricsLink:
    """One probe's place on this process's metrics endpoint."""

    def __init__(self, port: int, options: MetricsOptions, layers: Sequence[Any]) -> None:
        try:
            self.counts = LiveCounts([layer.manifest_entry() for layer in layers], window_steps=options.window_steps)
        except ValueError as exc:
            raise MetricsEndpointError(f"cannot count this model's metrics: {exc}") from exc
        self._endpoint = acquire(port, options)
        self._key: int | None = None
        self._pipeline: Any = None
        self._anomalies: Callable[[], dict[str, int]] = dict
        self.url = self._endpoint.url

    def connect(self, pipeline: Any, anomalies: Callable[[], dict[str, int]]) -> None:
        """Start exposing this probe's shard: its counts and the health of ``pipeline``'s writer."""
        self._pipeline = pipeline
        self._anomalies = anomalies
        self._key = self._endpoint.add(self._views)

    def _views(self) -> list[ShardView]:
        pipeline = self._pipeline
        writer = pipeline.writer
        counters = writer.counters
        # The manifest's anomaly counts are the writer's own plus the hooks' (synced at each flush); the hooks'
        # current counts are newer than the last sync.
        anomalies = {**dict(counters["anomalies"]), **self._anomalies()}
        health = Health(
            steps=int(counters["steps"]),
            dropped=dict(counters["dropped"]),
            anomalies=int(sum(anomalies.values())),
            queue_bytes=int(pipeline.held_bytes),  # every stage max_queue_mb bounds
            heartbeat_age_s=heartbeat_age(writer._shard.get("heartbeat_at")),
        )
        model = str(writer._header["model"].get("name") or "?")
        return [ShardView(model, int(writer.rank), self.counts.snapshot(), health)]

    def close(self) -> None:
        if self._key is not None:
            self._endpoint.remove(self._key)
            self._key = None
        if self._endpoint is not None:
            release(self._endpoint)
            self._endpoint = None  # type: ignore[assignment]
