"""Helpers for tests: write hand-made traces with known contents through the real ShardWriter."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from moeprobe.traces import ShardWriter, prepare_trace_dir
from moeprobe.traces.schema import TABLES


def layer_meta(n_layers: int, num_experts: int, top_k: int, **extra: Any) -> list[dict[str, Any]]:
    return [
        {
            "index": i,
            "name": f"model.layers.{i}.mlp",
            "router": f"model.layers.{i}.mlp.gate",
            "num_experts": num_experts,
            "top_k": top_k,
            "num_shared_experts": 0,
            "scoring": "softmax",
            **extra,
        }
        for i in range(n_layers)
    ]


def routing_table(
    experts: np.ndarray,
    *,
    weights: np.ndarray | None = None,
    step: np.ndarray | None = None,
    sequence: np.ndarray | None = None,
    position: np.ndarray | None = None,
    token_id: np.ndarray | None = None,
    phase: Sequence[str] | str = "prefill",
    layer: int | np.ndarray = 0,
) -> pa.Table:
    """Routing rows for tokens x top_k choices: ``experts`` has shape (tokens, k).

    Token-level columns (step, sequence, position, token_id, phase) have one value per token and are
    repeated over the k choices; defaults are one prefill step, one sequence, positions 0..T-1.
    """
    experts = np.asarray(experts)
    if experts.ndim == 1:
        experts = experts[:, None]
    tokens, k = experts.shape
    if weights is None:
        weights = np.full((tokens, k), 1.0 / k, dtype=np.float32)

    def per_token(values: Any, default: np.ndarray) -> np.ndarray:
        arr = default if values is None else np.asarray(values)
        if arr.ndim == 0:
            arr = np.full(tokens, arr)
        return np.repeat(arr, k)

    phases = np.asarray([phase] * tokens if isinstance(phase, str) else list(phase))
    return pa.table(
        {
            "step": per_token(step, np.zeros(tokens, np.int32)).astype(np.int32),
            "sequence": per_token(sequence, np.zeros(tokens, np.int64)).astype(np.int64),
            "position": per_token(position, np.arange(tokens)).astype(np.int32),
            "token_id": per_token(token_id, np.arange(tokens)).astype(np.int32),
            "phase": np.repeat(phases, k),
            "layer": per_token(layer, np.zeros(tokens, np.int16)).astype(np.int16),
            "k": np.tile(np.arange(k), tokens).astype(np.int8),
            "expert": experts.reshape(-1).astype(np.int16),
            "weight": np.asarray(weights, dtype=np.float32).reshape(-1),
            "dropped": np.zeros(tokens * k, dtype=bool),
        },
        schema=TABLES["routing"],
    )


def write_trace(
    path: Path,
    tables: Mapping[str, pa.Table | Sequence[pa.Table]],
    *,
    layers: list[dict[str, Any]],
    model: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    rank: int = 0,
    world_size: int = 1,
    status: str | None = "complete",
    force: bool = False,
) -> Path:
    """Write a trace (one segment per table given, or one per element of a list) and close it."""
    if rank == 0:
        prepare_trace_dir(path, force=force)
    writer = ShardWriter(
        path,
        model=model or {"name": "hand-made", "family": "test"},
        layers=layers,
        options=options or {},
        rank=rank,
        world_size=world_size,
    )
    for name, data in tables.items():
        parts = [data] if isinstance(data, pa.Table) else list(data)
        for part in parts:
            writer.append(name, part)
            writer.flush()
    if status is not None:
        writer.close(status)
    return path
