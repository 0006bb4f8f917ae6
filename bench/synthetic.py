"""Synthetic traces at scale for the benchmarks, written through the real ``ShardWriter``.

The routing is not uniform on purpose: a skewed per-layer expert popularity, a per-token-id preference and a
per-domain preference, so that every analysis has something to find and no query is faster than it would be on
a real recording. Shape: OLMoE-like (16 layers, 64 experts, top-8), sequences of 480 prefill + 32 decode tokens,
32 sequences a batch (one prefill step, then 32 decode steps of 32 tokens).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from moeprobe.traces import ShardWriter, prepare_trace_dir
from moeprobe.traces.schema import TABLES

DOMAINS = ("code", "math", "prose", "chat")


@dataclass(frozen=True)
class Shape:
    layers: int = 16
    experts: int = 64
    top_k: int = 8
    vocab: int = 32_000
    prefill: int = 480
    decode: int = 32
    batch: int = 32

    @property
    def decisions_per_batch(self) -> int:
        return self.batch * (self.prefill + self.decode) * self.layers * self.top_k


def parse_count(text: str) -> int:
    """A decision count as the bench scripts take it on their command line: 200M, 10k, 1.5G or a plain number."""
    text = text.strip().upper()
    scale = {"K": 1_000, "M": 1_000_000, "G": 1_000_000_000}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * scale)


def _layer_meta(shape: Shape) -> list[dict[str, object]]:
    return [
        {
            "index": i,
            "name": f"model.layers.{i}.mlp",
            "router": f"model.layers.{i}.mlp.gate",
            "num_experts": shape.experts,
            "top_k": shape.top_k,
            "num_shared_experts": 0,
            "scoring": "softmax",
        }
        for i in range(shape.layers)
    ]


def _route(logits: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """k distinct experts per row, sampled without replacement in proportion to softmax(logits) (Gumbel top-k),
    and the perturbed logits they are the top-k of (what a router that chose them would report as its logits)."""
    noisy = logits + rng.gumbel(size=logits.shape).astype(np.float32)
    top = np.argpartition(-noisy, k, axis=1)[:, :k]
    # order the k picks by score so that k=0 is the first choice, as a router reports it
    order = np.argsort(-np.take_along_axis(noisy, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1), noisy


def build_trace(
    path: Path,
    decisions: int,
    *,
    seed: int = 0,
    shape: Shape | None = None,
    rank: int = 0,
    world_size: int = 1,
    scores: bool = False,
) -> dict[str, float]:
    """Write a complete trace of about ``decisions`` routing decisions (whole batches) to ``path``; with
    ``world_size`` > 1, only the shard of ``rank`` (rank 0 prepares the directory: write it first). ``scores``:
    also the router logits of every token and layer (the ``scores`` table, as ``record --logits`` writes it);
    the routing is the same with or without them (same seed, same random draws)."""
    shape = shape or Shape()
    if decisions < shape.decisions_per_batch:  # fewer sequences in the one batch, so that a small trace stays small
        shape = replace(shape, batch=max(1, decisions // (shape.decisions_per_batch // shape.batch)))
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    if rank == 0:
        prepare_trace_dir(path, force=True)
    writer = ShardWriter(
        path,
        model={"name": "synthetic-olmoe-like", "family": "synthetic"},
        layers=_layer_meta(shape),
        options={"bench": True},
        max_pending_rows=4_000_000,
        rank=rank,
        world_size=world_size,
    )
    L, E, k = shape.layers, shape.experts, shape.top_k
    popularity = rng.normal(0.0, 0.6, size=(L, 1, E)).astype(np.float32)
    token_pref = rng.normal(0.0, 1.0, size=(shape.vocab, E)).astype(np.float32)
    layer_perm = np.stack([rng.permutation(E) for _ in range(L)])
    domain_pref = rng.normal(0.0, 0.8, size=(len(DOMAINS), L, E)).astype(np.float32)
    zipf = 1.0 / np.arange(1, shape.vocab + 1) ** 1.1
    zipf /= zipf.sum()
    phases = pa.array(["prefill", "decode"])

    batches = max(1, round(decisions / shape.decisions_per_batch))
    seq_len = shape.prefill + shape.decode
    step = 0
    for b in range(batches):
        B = shape.batch
        seqs = np.arange(b * B, (b + 1) * B, dtype=np.int64)
        domain = rng.integers(0, len(DOMAINS), size=B)
        tokens = rng.choice(shape.vocab, size=(B, seq_len), p=zipf).astype(np.int32)
        # token order within the batch: the prefill step (sequence-major), then one decode step per position
        pos = np.concatenate([np.tile(np.arange(shape.prefill), B), np.repeat(np.arange(shape.prefill, seq_len), B)])
        seq_idx = np.concatenate([np.repeat(np.arange(B), shape.prefill), np.tile(np.arange(B), shape.decode)])
        tok_step = np.concatenate(
            [np.full(B * shape.prefill, step), step + 1 + np.repeat(np.arange(shape.decode), B)]
        ).astype(np.int32)
        tok_id = tokens[seq_idx, pos]
        n = len(pos)
        experts = np.empty((L, n, k), dtype=np.int16)
        router_logits = np.empty((L, n, E), dtype=np.float32) if scores else None
        for layer in range(L):
            logits = popularity[layer] + token_pref[tok_id][:, layer_perm[layer]] + domain_pref[domain[seq_idx], layer]
            experts[layer], noisy = _route(logits, k, rng)
            if router_logits is not None:
                router_logits[layer] = noisy
        # rows ordered step, layer, token, k: the order a capture that collects per step writes them in
        steps_in_batch = 1 + shape.decode
        for s in range(steps_in_batch):
            sel = np.flatnonzero(tok_step == step + s)
            t = len(sel)
            rows = L * t * k
            table = pa.table(
                {
                    "step": np.full(rows, step + s, np.int32),
                    "sequence": np.tile(np.repeat(seqs[seq_idx[sel]], k), L),
                    "position": np.tile(np.repeat(pos[sel], k), L).astype(np.int32),
                    "token_id": np.tile(np.repeat(tok_id[sel], k), L),
                    "phase": phases.take(pa.array(np.full(rows, 0 if s == 0 else 1, np.int8))),
                    "layer": np.repeat(np.arange(L, dtype=np.int16), t * k),
                    "k": np.tile(np.arange(k, dtype=np.int8), L * t),
                    "expert": experts[:, sel, :].reshape(-1),
                    "weight": np.full(rows, 1.0 / k, np.float32),
                    "dropped": np.zeros(rows, dtype=bool),
                },
                schema=TABLES["routing"],
            )
            writer.append("routing", table)
            if router_logits is not None:
                # rows ordered layer, token, as for the routing; one list of E logits each
                flat = router_logits[:, sel, :].reshape(-1)
                writer.append(
                    "scores",
                    pa.table(
                        {
                            "step": np.full(L * t, step + s, np.int32),
                            "sequence": np.tile(seqs[seq_idx[sel]], L),
                            "position": np.tile(pos[sel], L).astype(np.int32),
                            "layer": np.repeat(np.arange(L, dtype=np.int16), t),
                            "scores": pa.ListArray.from_arrays(pa.array(np.arange(0, len(flat) + 1, E, dtype=np.int32)), pa.array(flat)),
                        },
                        schema=TABLES["scores"],
                    ),
                )
            # block time grows with the busiest expert's load, as it does on a GPU where the slowest expert
            # GEMM gates the layer
            busiest = np.array(
                [np.bincount(experts[layer, sel].reshape(-1), minlength=E).max() for layer in range(L)], np.float64
            )
            writer.append(
                "latency",
                pa.table(
                    {
                        "step": np.full(L, step + s, np.int32),
                        "layer": np.arange(L, dtype=np.int16),
                        "router_ms": 0.02 + rng.gamma(2.0, 0.005, L),
                        "block_ms": 0.1 + busiest * 0.002 + rng.gamma(2.0, 0.02, L),
                        "clock": ["perf_counter"] * L,
                    },
                    schema=TABLES["latency"],
                ),
            )
            writer.append(
                "steps",
                pa.table(
                    {
                        "step": [step + s],
                        "phase": ["prefill" if s == 0 else "decode"],
                        "batch": [B],
                        "tokens": [t],
                        "started_at": [1.7e9 + step + s],
                        "wall_ms": [5.0 + t * 0.01],
                    },
                    schema=TABLES["steps"],
                ),
            )
        writer.append(
            "tags",
            pa.table(
                {"sequence": seqs, "key": ["domain"] * B, "value": [DOMAINS[d] for d in domain]},
                schema=TABLES["tags"],
            ),
        )
        writer.counters["steps"] += steps_in_batch
        writer.counters["tokens"] += n
        writer.counters["decisions"] += n * L * k
        step += steps_in_batch
    writer.close("complete")
    return {"seconds": time.perf_counter() - started, "decisions": float(writer.counters["decisions"])}


def build_sharded_trace(path: Path, decisions: int, shards: int, *, seed: int = 0, shape: Shape | None = None) -> dict[str, float]:
    """A trace of ``shards`` ranks (``rank=R/``), about ``decisions / shards`` decisions each, as a job of that
    many ranks writes it: every rank runs its own steps 0, 1, ... over its own sequences and routing."""
    total = {"seconds": 0.0, "decisions": 0.0}
    for rank in range(shards):
        got = build_trace(path, decisions // shards, seed=seed * 1000 + rank, shape=shape, rank=rank, world_size=shards)
        total["seconds"] += got["seconds"]
        total["decisions"] += got["decisions"]
    return total
