"""What the endpoint exposes, as plain data: options, and one shard's counts and capture health per scrape.

Kept apart from ``collector`` so that the recording side can build these without importing prometheus_client.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from .counts import DEFAULT_WINDOW_STEPS, CountsSnapshot

DEFAULT_TOP_N = 3
DEFAULT_EP_SIZE = 8


@dataclass(frozen=True)
class Health:
    """Capture health of one shard, as its manifest counters (or the live writer) state it."""

    steps: int
    dropped: Mapping[str, int] = field(default_factory=dict)  # reason -> routing decisions lost
    anomalies: int = 0
    queue_bytes: int | None = None  # None: not known here (a trace read from disk)
    heartbeat_age_s: float | None = None  # seconds since the writer last wrote the manifest (running writers)
    read_errors: int | None = None  # segments that could not be read (a trace read from disk only)


@dataclass(frozen=True)
class ShardView:
    model: str
    rank: int
    counts: CountsSnapshot
    health: Health


@dataclass(frozen=True)
class MetricsOptions:
    """``top_n`` hottest experts per layer as slots; ``per_expert`` adds one series per expert (opt-in: 14,848 for
    DeepSeek-V3); balancedness over ``ep_size`` ranks of a contiguous placement; window of ``window_steps``."""

    top_n: int = DEFAULT_TOP_N
    per_expert: bool = False
    ep_size: int = DEFAULT_EP_SIZE
    window_steps: int = DEFAULT_WINDOW_STEPS

    def __post_init__(self) -> None:
        if self.top_n < 0:
            raise ValueError("top_n must be 0 or more")
        if self.ep_size < 1:
            raise ValueError("ep_size must be at least 1")
        if self.window_steps < 1:
            raise ValueError("window_steps must be at least 1")


def heartbeat_age(heartbeat_at: float | None) -> float | None:
    """Seconds since a writer's heartbeat (unix seconds), never negative; None when unknown."""
    return None if heartbeat_at is None else max(0.0, time.time() - float(heartbeat_at))
