"""Runs the per-shard partial aggregates on Dask (a local cluster of worker processes, or a running scheduler).

Dask, not a scheduler of our own: ``distributed`` is pure Python, starts a local cluster in seconds, and a real
cluster is ``dask scheduler`` plus ``dask worker ADDRESS`` on each host (docs/scale.md). Each task opens the
trace where the worker runs (a shared path or an ``s3://`` URL every host can reach) and returns small Arrow
tables; nothing but those crosses the network.
"""

from __future__ import annotations

import os
from typing import Any

from ..analysis.filters import Filters
from ..traces.errors import TraceError
from .partials import ShardPartial, merge, shard_partial, snapshot


class DistributedUnavailableError(TraceError):
    """The distributed engine cannot run: Dask is not installed, or the scheduler cannot be reached."""


def _client(workers: int, scheduler: str | None) -> tuple[Any, Any]:
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise DistributedUnavailableError(
            "--engine dask needs Dask, which is not installed: pip install 'moeprobe[dask]'"
        ) from exc
    if scheduler is not None:
        try:
            return Client(scheduler, timeout="20s"), None
        except (OSError, TimeoutError, ValueError) as exc:  # ValueError: a malformed address
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DistributedUnavailableError(f"--scheduler {scheduler}: cannot connect ({first})") from exc
    # Processes, one thread each: DuckDB and pyarrow release the GIL, but separate processes are what a cluster
    # of hosts is, and what the scaling measurement in BENCHMARKS.md measures. No dashboard: nothing to serve.
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    return Client(cluster), cluster


def prepare(trace: Any, filters: Filters | None = None, *, workers: int = 4, scheduler: str | None = None) -> list[int]:
    """Compute the trace's per-shard partial aggregates on Dask and install their exact merge on ``trace``, so
    that ``trace.summary(filters, ...)`` reads them instead of scanning every shard itself. Returns the ranks."""
    filters = filters or Filters()
    ctx = trace.context(filters)  # the filters are checked here, on the driver, before any worker starts
    ranks = sorted(trace.reader.shards)
    if not ranks:
        return []
    path = str(trace.path)
    client, cluster = _client(workers, scheduler)
    try:
        # DuckDB in each local worker gets its share of this machine's cores (a remote worker keeps its own).
        threads = max(1, (os.cpu_count() or 1) // workers) if cluster is not None else None
        segments = [snapshot(trace.reader, rank) for rank in ranks]
        futures = client.map(shard_partial, [path] * len(ranks), ranks, segments, [filters] * len(ranks),
                             [threads] * len(ranks), pure=False)
        partials: list[ShardPartial] = client.gather(futures)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    merge(ctx, partials)
    return ranks
