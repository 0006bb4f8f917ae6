"""Writes imported routing as a moeprobe trace, through the same ``ShardWriter`` the capture pipeline uses.

Same directory, manifest, segments and status as a capture: rank directories, Parquet segments renamed when
complete, a manifest whose status ends ``complete`` (or ``aborted`` with the error). The manifest adds
``source`` (engine, version, files) and ``options.mode``: ``tokens`` when per-token routing fills ``routing``,
``counts`` when only per-step expert loads fill ``loads``.

Layer shapes are often known only from the first payload (vLLM's array shape), so shards are created on first
use; every later payload must agree with them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..traces.schema import PHASES, TABLES
from ..traces.storage import location
from ..traces.writer import ShardWriter, prepare_trace_dir
from .errors import ImportInputError

log = logging.getLogger(__name__)

_PHASE_INDEX = {name: i for i, name in enumerate(PHASES)}


def layer_entries(num_layers: int, num_experts: int, top_k: int, names: list[str] | None = None) -> list[dict[str, Any]]:
    names = names or [f"layer {i}" for i in range(num_layers)]
    return [
        {"index": i, "name": names[i], "num_experts": int(num_experts), "top_k": int(top_k)}
        for i in range(num_layers)
    ]


class TraceSink:
    """One imported trace: shards per source rank, created lazily with the layer shapes."""

    def __init__(
        self,
        path: Path | str,
        *,
        engine: str,
        version: str | None,
        files: list[str],
        model_name: str | None,
        mode: str,
        force: bool = False,
        world_size: int = 1,
        tags: dict[str, str] | None = None,
        kind: str = "import",
        flush_rows: int = 1_000_000,
    ) -> None:
        if mode not in ("tokens", "counts"):
            raise ValueError(f"mode {mode!r}")
        self.path: Any = location(path)  # a directory, or an s3:// URL (a str)
        self.engine = engine
        self.mode = mode
        self.world_size = world_size
        self.tags = dict(tags or {})
        self.flush_rows = flush_rows
        self.source = {"engine": engine, "version": version, "kind": kind, "files": list(files)}
        self.model = {"name": model_name or "unknown", "engine": engine}
        self.layers: list[dict[str, Any]] | None = None
        self.writers: dict[int, ShardWriter] = {}
        self._steps: dict[int, set[int]] = {}
        self._early_anomalies: list[tuple[int, str]] = []  # counted before their shard existed
        prepare_trace_dir(self.path, force=force)

    # -- shape ----------------------------------------------------------------------------------------
    def set_layers(self, layers: list[dict[str, Any]], where: str) -> None:
        """Fix the layer shapes on first use; a payload that disagrees later is an error naming it."""
        from ..traces.manifest import MAX_EXPERTS

        for m in layers:
            if not 0 < m["num_experts"] <= MAX_EXPERTS:
                raise ImportInputError(f"{where}: {m['num_experts']} experts is outside 1..{MAX_EXPERTS}")
            if not 0 < m["top_k"] <= m["num_experts"]:
                raise ImportInputError(f"{where}: top-k {m['top_k']} is outside 1..{m['num_experts']} (the layer's experts)")
        if self.layers is None:
            self.layers = layers
            return
        if [(m["num_experts"], m["top_k"]) for m in layers] != [(m["num_experts"], m["top_k"]) for m in self.layers]:
            have = f"{len(self.layers)} layers x top-{self.layers[0]['top_k']}" if self.layers else "no layers"
            got = f"{len(layers)} layers x top-{layers[0]['top_k']}" if layers else "no layers"
            raise ImportInputError(f"{where}: routing shape ({got}) differs from the earlier input ({have})")

    def writer(self, rank: int) -> ShardWriter:
        if self.layers is None:
            raise RuntimeError("set_layers() before writing")
        found = self.writers.get(rank)
        if found is None:
            options = {"mode": self.mode, "import": {"engine": self.engine}}
            found = ShardWriter(
                self.path,
                model=self.model,
                layers=self.layers,
                options=options,
                rank=rank,
                world_size=self.world_size,
                on_warning=log.warning,
                source=self.source,
            )
            self.writers[rank] = found
            self._steps[rank] = set()
            for _, kind in [a for a in self._early_anomalies if a[0] == rank]:
                found.count_anomaly(kind)
            self._early_anomalies = [a for a in self._early_anomalies if a[0] != rank]
        return found

    # -- rows -----------------------------------------------------------------------------------------
    def add_tokens(
        self,
        *,
        rank: int,
        step: int | np.ndarray,
        sequence: int | np.ndarray,
        position: np.ndarray,
        token_id: np.ndarray,
        phase: np.ndarray,
        experts: np.ndarray,
        where: str,
        weights: np.ndarray | None = None,
        count_tokens: bool = True,
    ) -> int:
        """Routing rows for T tokens: ``experts`` (T, L, k) logical ids, -1 where a choice is missing (padding).

        ``phase`` is (T,) of 0 = prefill / 1 = decode; ``weights`` (T, L, k) or None when the engine gives ids only
        (stored as null). Returns the number of routing decisions written.
        """
        assert self.layers is not None
        experts = np.asarray(experts)
        tokens, layers, k = experts.shape
        if layers != len(self.layers):
            raise ImportInputError(f"{where}: {layers} layers, the trace has {len(self.layers)}")
        limit = np.array([m["num_experts"] for m in self.layers])
        ids = experts.astype(np.int64)
        valid = ids >= 0
        over = valid & (ids >= limit[None, :, None])
        if over.any():
            t, layer, _ = np.argwhere(over)[0]
            raise ImportInputError(
                f"{where}: expert id {int(ids[t, layer, _])} at token {int(t)}, layer {int(layer)} is past the "
                f"{int(limit[layer])} experts of that layer (--num-experts)"
            )
        if (ids < -1).any():
            raise ImportInputError(f"{where}: negative expert id {int(ids.min())} (only -1 marks padding)")
        t_idx, l_idx, k_idx = np.nonzero(valid)

        def per_token(values: Any) -> np.ndarray:
            return np.broadcast_to(np.asarray(values), (tokens,))[t_idx]

        weight_col = pa.nulls(len(t_idx), pa.float32()) if weights is None else pa.array(
            np.asarray(weights, np.float32)[t_idx, l_idx, k_idx], pa.float32()
        )
        table = pa.table(
            {
                "step": pa.array(per_token(step).astype(np.int32)),
                "sequence": pa.array(per_token(sequence).astype(np.int64)),
                "position": pa.array(np.asarray(position)[t_idx].astype(np.int32)),
                "token_id": pa.array(np.asarray(token_id)[t_idx].astype(np.int32)),
                "phase": pa.DictionaryArray.from_arrays(
                    pa.array(np.asarray(phase)[t_idx].astype(np.int32)), pa.array(list(PHASES))
                ).cast(pa.string()),
                "layer": pa.array(l_idx.astype(np.int16)),
                "k": pa.array(k_idx.astype(np.int8)),
                "expert": pa.array(ids[t_idx, l_idx, k_idx].astype(np.int16)),
                "weight": weight_col,
                "dropped": pa.array(np.zeros(len(t_idx), dtype=bool)),
            },
            schema=TABLES["routing"],
        )
        writer = self.writer(rank)
        writer.append("routing", table)
        steps = np.unique(np.broadcast_to(np.asarray(step), (tokens,)))
        self._count(rank, steps, tokens if count_tokens else 0, len(t_idx))
        return len(t_idx)

    def add_loads(self, *, rank: int, step: int, phase: str, counts: np.ndarray, where: str) -> int:
        """Per-expert counts of one step: ``counts`` (L, E) logical; rows only where a count is non-zero."""
        assert self.layers is not None
        counts = np.asarray(counts)
        if counts.ndim != 2 or counts.shape[0] != len(self.layers):
            raise ImportInputError(f"{where}: counts of shape {counts.shape} do not fit {len(self.layers)} layers")
        if (counts < 0).any():
            raise ImportInputError(f"{where}: negative expert count {int(counts.min())}")
        layer, expert = np.nonzero(counts)
        table = pa.table(
            {
                "step": pa.array(np.full(len(layer), step, np.int32)),
                "phase": pa.array([phase] * len(layer), pa.string()),
                "layer": pa.array(layer.astype(np.int16)),
                "expert": pa.array(expert.astype(np.int16)),
                "tokens": pa.array(counts[layer, expert].astype(np.int64)),
            },
            schema=TABLES["loads"],
        )
        self.writer(rank).append("loads", table)
        total = int(counts.sum())
        top_k = int(self.layers[0]["top_k"]) if self.layers else 1
        # A step's tokens: choices of one layer over its top-k (every MoE layer routes every token).
        self._count(rank, np.array([step]), total // max(1, top_k) // max(1, len(self.layers)), total)
        return total

    def add_scores(self, *, rank: int, step: int, sequence: int, position: np.ndarray, layer: int, scores: np.ndarray) -> None:
        scores = np.asarray(scores, np.float32)
        flat = pa.FixedSizeListArray.from_arrays(pa.array(scores.reshape(-1)), scores.shape[1]).cast(pa.list_(pa.float32()))
        table = pa.table(
            {
                "step": pa.array(np.full(len(scores), step, np.int32)),
                "sequence": pa.array(np.full(len(scores), sequence, np.int64)),
                "position": pa.array(np.asarray(position, np.int32)),
                "layer": pa.array(np.full(len(scores), layer, np.int16)),
                "scores": flat,
            },
            schema=TABLES["scores"],
        )
        self.writer(rank).append("scores", table)

    def add_tags(self, *, rank: int, sequence: int, tags: dict[str, str]) -> None:
        merged = {**self.tags, **tags}
        if not merged:
            return
        table = pa.table(
            {
                "sequence": pa.array([sequence] * len(merged), pa.int64()),
                "key": pa.array(list(merged), pa.string()),
                "value": pa.array([str(v) for v in merged.values()], pa.string()),
            },
            schema=TABLES["tags"],
        )
        self.writer(rank).append("tags", table)

    def count_anomaly(self, kind: str, rank: int = 0) -> None:
        """Count something the user should see in the manifest; kept until the shard exists if it does not yet."""
        if rank in self.writers:
            self.writers[rank].count_anomaly(kind)
        else:
            self._early_anomalies.append((rank, kind))

    def _count(self, rank: int, steps: np.ndarray, tokens: int, decisions: int) -> None:
        counters = self.writers[rank].counters
        seen = self._steps[rank]
        new = [int(s) for s in steps if int(s) not in seen]
        seen.update(new)
        counters["steps"] += len(new)
        counters["tokens"] += int(tokens)
        counters["decisions"] += int(decisions)
        if self.writers[rank].pending_rows() >= self.flush_rows:
            self.writers[rank].flush()

    # -- end ------------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write what is pending as complete segments: a reader (the TUI) sees it from now on."""
        for writer in self.writers.values():
            writer.flush()

    def close(self, status: str = "complete", error: str | None = None) -> None:
        if not self.writers and self.layers is not None:
            self.writer(0)  # an import with no rows still leaves a readable (empty) trace
        for writer in self.writers.values():
            writer.close(status, error)

    @property
    def empty(self) -> bool:
        return not self.writers


def phase_codes(positions: np.ndarray, prompt_tokens: int) -> np.ndarray:
    """0 (prefill) for prompt positions, 1 (decode) for generated ones."""
    return np.where(np.asarray(positions) < prompt_tokens, _PHASE_INDEX["prefill"], _PHASE_INDEX["decode"]).astype(np.int8)
