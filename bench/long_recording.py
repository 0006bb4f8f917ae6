"""A long CPU recording (>= 10 M routing decisions): resident memory over time, writer throughput over time, bytes
per decision on disk, and the same routing written by the peers in the same run: pyarrow with format 1's schema
and settings (one row per decision, fp32 weights), SGLang-style pickled int64 tensors and Megatron-style JSONL.

    .venv/bin/python bench/long_recording.py --steps 48 --out /tmp/long

The model is a random tiny Mixtral with many layers and experts and big batches, so the routing volume is large
while the model itself costs little. RSS is sampled by a background thread every 0.2 s; writer throughput is the
growth of the routing rows written to segments (the manifest counter) per sampling window.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import moeprobe  # noqa: E402


def build(layers: int, experts: int, top_k: int) -> torch.nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=16, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, num_local_experts=experts, num_experts_per_tok=top_k,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    return MixtralForCausalLM(config).eval()


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--weights", choices=("fp16", "fp32", "u8"), default="fp16")
    parser.add_argument("--out", type=Path, default=Path("/tmp/moeprobe-long"))
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    trace_dir = args.out / "trace"
    torch.set_num_threads(1)

    model = build(args.layers, args.experts, args.top_k)
    ids = torch.randint(3, 96, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    per_step = args.batch * args.seq * args.layers * args.top_k
    process = psutil.Process()
    samples: list[tuple[float, int, int]] = []  # (seconds, rss bytes, routing rows written)
    stop = threading.Event()

    with torch.no_grad(), moeprobe.record(model, trace_dir, flush_interval=1.0, weights=args.weights) as probe:
        writer = probe.pipeline.writer
        began = time.monotonic()

        def sample() -> None:
            while not stop.is_set():
                samples.append((time.monotonic() - began, process.memory_info().rss, writer.counters["rows"]["routing"]))
                stop.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        for _ in range(args.steps):
            model(ids)
        model_done = time.monotonic() - began
    closed = time.monotonic() - began
    stop.set()
    sampler.join()
    samples.append((closed, process.memory_info().rss, writer.counters["rows"]["routing"]))

    trace = moeprobe.open_trace(trace_dir)
    counters = trace.manifest["counters"]
    decisions = int(counters["decisions"])
    written = int(counters["rows"]["routing"])
    routing_bytes = sum(s.bytes for s in trace.reader.segments("routing"))
    trace_bytes = dir_bytes(trace_dir)

    # The same routing in the formats other tools write: per step, each layer's top-k ids as an int64
    # (tokens, k) tensor pickled with torch.save (SGLang's expert-distribution dumps), and one JSON line per
    # step and layer with the ids as nested lists (Megatron-style router logging).
    sglang_dir = args.out / "sglang"
    sglang_dir.mkdir()
    jsonl = args.out / "megatron.jsonl"
    tokens = args.batch * args.seq
    with jsonl.open("w") as out:
        for step in range(args.steps):
            table = trace.sql(
                f"select layer, expert from routing where step = {step} order by layer, sequence, position, k"
            )
            experts = table.column("expert").to_numpy().astype(np.int64).reshape(args.layers, tokens, args.top_k)
            torch.save({layer: torch.from_numpy(experts[layer].copy()) for layer in range(args.layers)},
                       sglang_dir / f"step{step:05d}.pt")
            for layer in range(args.layers):
                out.write(json.dumps({"step": step, "layer": layer, "topk_ids": experts[layer].tolist()}) + "\n")
    sglang_bytes = dir_bytes(sglang_dir)
    # pyarrow, same data: the logical routing table written as format 1 stored it.
    v1 = args.out / "v1.parquet"
    pq.write_table(trace.sql("select * exclude (rank) from routing order by step, layer, sequence, position, k"), v1,
                   compression="zstd", compression_level=1, row_group_size=1 << 20)
    v1_bytes = v1.stat().st_size
    jsonl_bytes = jsonl.stat().st_size

    rss = np.array([s[1] for s in samples]) / 2**20
    t = np.array([s[0] for s in samples])
    rows = np.array([s[2] for s in samples])
    # Throughput per ~2 s window of the recording (the flush interval is 1 s, so shorter windows are jumpy).
    windows = []
    edges = np.arange(0.0, model_done + 2.0, 2.0)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (t >= lo) & (t < hi)
        if inside.sum() >= 2:
            windows.append((rows[inside][-1] - rows[inside][0]) / (t[inside][-1] - t[inside][0]))
    print("load average (1, 5, 15 min): " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"model: Mixtral, {args.layers} MoE layers x {args.experts} experts, top-{args.top_k}; "
          f"{args.steps} steps of {args.batch}x{args.seq} tokens = {per_step:,} decisions per step")
    print(f"recorded {decisions:,} routing decisions ({written:,} rows written, dropped {counters['dropped'] or 'none'}) "
          f"in {model_done:.1f} s of model time, trace closed at {closed:.1f} s, status {trace.status}")
    print(f"RSS over {len(samples)} samples: first {rss[0]:.0f} MiB, max {rss.max():.0f} MiB, last {rss[-1]:.0f} MiB; "
          f"max growth over first {rss.max() - rss[0]:.0f} MiB")
    quarters = np.array_split(rss, 4)
    print("RSS by quarter of the run (mean MiB): " + ", ".join(f"{q.mean():.0f}" for q in quarters if len(q)))
    print(f"writer throughput: {written / closed:,.0f} decisions/s overall; per 2 s window: "
          + ", ".join(f"{w / 1e6:.2f}M" for w in windows))
    print(f"on disk: trace {trace_bytes:,} B ({trace_bytes / decisions:.2f} B/decision, routing segments "
          f"{routing_bytes / decisions:.2f} B/decision, with weights, positions, token ids)")
    print(f"pyarrow, format 1 schema and settings (same columns, fp32 weights): {v1_bytes:,} B "
          f"({v1_bytes / decisions:.2f} B/decision, {v1_bytes / routing_bytes:.1f}x the routing segments)")
    print(f"SGLang-style torch.save int64 topk_ids: {sglang_bytes:,} B ({sglang_bytes / decisions:.2f} B/decision, "
          f"{sglang_bytes / trace_bytes:.1f}x the trace)")
    print(f"Megatron-style JSONL: {jsonl_bytes:,} B ({jsonl_bytes / decisions:.2f} B/decision, "
          f"{jsonl_bytes / trace_bytes:.1f}x the trace)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
