"""Bytes per routing decision: moeprobe's trace (format v2, each weight encoding) beside the peers, same data.

DeepSeek-V3 shape (bench/dsv3.py): one prefill step of 8 x 512 tokens, then decode steps of 256 sequences,
58 layers x top-8 of 256 experts. moeprobe is written through the real CapturePipeline and ShardWriter;
the peers write the same routing: pyarrow with format v1's schema and settings (one row per decision, fp32
weights), torch.save of int32 (tokens, k) ids per layer and step (SGLang's per_token dump), and JSONL of the
ids (one line per step and layer). Peers other than pyarrow store only the expert ids.

    python bench/trace_bytes.py [--decode-steps 32]

Where these bytes go, and what other layouts (choices by expert id) and 8-bit quantizers of the same data would
cost: bench/trace_layouts.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.dsv3 import LAYERS, TOP_K, Routing, layer_meta, make_routing, make_step  # noqa: E402
from moeprobe.hooks.pipeline import CapturePipeline  # noqa: E402
from moeprobe.hooks.timing import CpuClock  # noqa: E402
from moeprobe.traces import ShardWriter, prepare_trace_dir  # noqa: E402
from moeprobe.traces.schema import ROUTING  # noqa: E402

BATCH, PROMPT = 8, 512


def workload(decode_steps: int) -> list[tuple[Routing, int, int, bool]]:
    """(routing, batch, seq_len, new sequence) per step."""
    steps = [(make_routing(BATCH * PROMPT, PROMPT, seed=0), BATCH, PROMPT, True)]
    for i in range(decode_steps):
        r = make_routing(256, 1, seed=1 + i)
        r.positions[:] = PROMPT + i
        steps.append((r, 256, 1, i == 0))
    return steps


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def record(path: Path, steps: list[tuple[Routing, int, int, bool]], weights: str) -> tuple[int, int]:
    prepare_trace_dir(path, force=True)
    writer = ShardWriter(path, model={"name": "dsv3-synthetic"}, layers=layer_meta(), options={"weights": weights})
    pipeline = CapturePipeline(writer, clock=CpuClock(), flush_interval=3600, max_queue_bytes=1 << 40)
    for i, (routing, batch, seq_len, new) in enumerate(steps):
        pipeline.submit(make_step(i, routing, batch, seq_len, new))
    pipeline.close("complete")
    routing_bytes = sum(p.stat().st_size for p in (path / "rank=0" / "routing").glob("*.parquet"))
    return routing_bytes, int(writer.counters["decisions"])


def v1_table(steps: list[tuple[Routing, int, int, bool]]) -> pa.Table:
    parts = []
    for i, (r, batch, seq_len, _) in enumerate(steps):
        tokens = r.token_ids.size
        order = np.argsort(-r.weights, axis=2, kind="stable")
        experts = np.take_along_axis(r.experts, order, axis=2)
        weights = np.take_along_axis(r.weights, order, axis=2)
        per_token = lambda v: np.repeat(np.tile(v, LAYERS), TOP_K)  # noqa: E731
        sequence = np.repeat(np.arange(batch), seq_len)
        parts.append(pa.table({
            "step": np.full(tokens * LAYERS * TOP_K, i, np.int32),
            "sequence": per_token(sequence).astype(np.int64),
            "position": per_token(r.positions),
            "token_id": per_token(r.token_ids),
            "phase": np.full(tokens * LAYERS * TOP_K, "prefill" if seq_len > 1 else "decode"),
            "layer": np.repeat(np.arange(LAYERS, dtype=np.int16), tokens * TOP_K),
            "k": np.tile(np.arange(TOP_K, dtype=np.int8), tokens * LAYERS),
            "expert": experts.reshape(-1).astype(np.int16),
            "weight": weights.reshape(-1),
            "dropped": np.zeros(tokens * LAYERS * TOP_K, bool),
        }, schema=ROUTING))
    return pa.concat_tables(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decode-steps", type=int, default=32)
    args = parser.parse_args()
    print(f"load average: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    steps = workload(args.decode_steps)
    decisions = sum(r.decisions for r, *_ in steps)
    print(f"DeepSeek-V3 shape: {LAYERS} layers x top-{TOP_K} of 256; 1 prefill step of {BATCH}x{PROMPT} tokens + "
          f"{args.decode_steps} decode steps of 256 tokens = {decisions:,} decisions")
    out = Path(tempfile.mkdtemp(prefix="trace_bytes_"))
    try:
        rows = []
        for weights in ("fp32", "fp16", "u8"):
            size, recorded = record(out / f"v2-{weights}", steps, weights)
            assert recorded == decisions, (recorded, decisions)
            rows.append((f"moeprobe v2, weights {weights}", size))
        pq.write_table(v1_table(steps), out / "v1.parquet", compression="zstd", compression_level=1,
                       row_group_size=1 << 20)
        rows.append(("pyarrow, format v1 schema and settings (fp32 weights)", (out / "v1.parquet").stat().st_size))
        torch_dir = out / "torch"
        torch_dir.mkdir()
        jsonl = out / "ids.jsonl"
        with jsonl.open("w") as handle:
            for i, (r, *_rest) in enumerate(steps):
                torch.save({layer: torch.from_numpy(r.experts[layer]) for layer in range(LAYERS)}, torch_dir / f"{i:05d}.pt")
                for layer in range(LAYERS):
                    handle.write(json.dumps({"step": i, "layer": layer, "topk_ids": r.experts[layer].tolist()}) + "\n")
        rows.append(("torch.save int32 ids only (SGLang per_token)", dir_bytes(torch_dir)))
        rows.append(("JSONL ids only", jsonl.stat().st_size))
        print(f"{'format':58s} {'bytes':>12s} {'B/decision':>10s}")
        for name, size in rows:
            print(f"{name:58s} {size:12,d} {size / decisions:10.3f}")
    finally:
        shutil.rmtree(out)
    print(f"load average: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
