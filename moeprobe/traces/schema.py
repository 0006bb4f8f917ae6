"""The on-disk format: format version, magic and the Arrow schema of every table.

A trace is a directory::

    manifest.json                 magic, format_version, model, layers, options, world size (rank 0 keeps
                                  status and counters of its own shard here too)
    rank=R/shard.json             one per process: status, pid, host, heartbeat, counters
    rank=R/<table>/NNNNNN.parquet segments, each written as .NNNNNN.parquet.tmp and renamed when complete

The schemas below are the logical tables every reader sees. Format v2 stores ``routing`` one row per
(step, layer, token) with the k choices side by side (``compact.RoutingEncoding``); v1 stored it as below.

The ``rank=R`` directories use Hive-style names so that DuckDB and pyarrow both recover ``rank`` as a column.
"""

from __future__ import annotations

import pyarrow as pa

from .constants import FORMAT_VERSION as FORMAT_VERSION, MAGIC as MAGIC, PHASES as PHASES  # re-exported

ROUTING = pa.schema(
    [
        pa.field("step", pa.int32(), nullable=False),  # forward call number within the shard
        pa.field("sequence", pa.int64(), nullable=False),  # request id, unique within the shard
        pa.field("position", pa.int32(), nullable=False),  # position in the sequence, padding excluded
        pa.field("token_id", pa.int32(), nullable=False),  # -1 when the model was fed embeddings
        pa.field("phase", pa.string(), nullable=False),  # "prefill" or "decode"
        pa.field("layer", pa.int16(), nullable=False),  # MoE layer index in model order, from 0
        pa.field("k", pa.int8(), nullable=False),  # rank of the choice by gate weight, 0 = largest
        pa.field("expert", pa.int16(), nullable=False),
        # gate weight the model multiplied by; null where the source gives ids only (engine imports, see docs/engines.md)
        pa.field("weight", pa.float32()),
        pa.field("dropped", pa.bool_(), nullable=False),  # token exceeded the expert's capacity (Switch)
    ]
)

STEPS = pa.schema(
    [
        pa.field("step", pa.int32(), nullable=False),
        pa.field("phase", pa.string(), nullable=False),
        pa.field("batch", pa.int32(), nullable=False),
        pa.field("tokens", pa.int32(), nullable=False),  # tokens routed (padding excluded)
        pa.field("started_at", pa.float64(), nullable=False),  # unix seconds
        pa.field("wall_ms", pa.float64(), nullable=False),  # host wall time of the forward call
    ]
)

LATENCY = pa.schema(
    [
        pa.field("step", pa.int32(), nullable=False),
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("router_ms", pa.float64()),
        pa.field("block_ms", pa.float64()),
        pa.field("clock", pa.string(), nullable=False),  # "cuda_event" or "perf_counter"
    ]
)

TAGS = pa.schema(
    [
        pa.field("sequence", pa.int64(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("value", pa.string(), nullable=False),
    ]
)

SCORES = pa.schema(
    [
        pa.field("step", pa.int32(), nullable=False),
        pa.field("sequence", pa.int64(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("scores", pa.list_(pa.float32()), nullable=False),  # raw router logits, one per expert
    ]
)

BIAS = pa.schema(
    [
        pa.field("step", pa.int32(), nullable=False),  # first step at which the router used this bias
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("bias", pa.list_(pa.float32()), nullable=False),
    ]
)

# Expert load without per-token rows ("counts" traces: engine dumps that only count, e.g. SGLang's stat recorder).
# One row per (step, layer, expert) with a non-zero count.
LOADS = pa.schema(
    [
        pa.field("step", pa.int32(), nullable=False),
        pa.field("phase", pa.string(), nullable=False),  # "prefill" or "decode"
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("expert", pa.int16(), nullable=False),  # logical expert id
        pa.field("tokens", pa.int64(), nullable=False),  # routing choices sent to this expert in this step and layer
    ]
)

TABLES: dict[str, pa.Schema] = {
    "routing": ROUTING,
    "steps": STEPS,
    "latency": LATENCY,
    "tags": TAGS,
    "scores": SCORES,
    "bias": BIAS,
    "loads": LOADS,
}

MODES = ("tokens", "counts")  # manifest options["mode"]: per-token routing rows, or only the loads table


def with_rank(schema: pa.Schema) -> pa.Schema:
    """The logical schema a reader exposes: the stored columns plus ``rank`` from the shard directory."""
    return schema.append(pa.field("rank", pa.int32(), nullable=False))
