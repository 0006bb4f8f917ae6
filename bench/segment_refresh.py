"""Cost of re-listing a long recording's segments: a simulated day of flushes, and what a TUI tick costs.

Writes a trace with --segments flushes of a few routing rows (a recording at a 1 s flush interval makes 3,600
an hour, 86,400 a day) through the real ShardWriter, which merges small segments as it goes (compaction).
At --checkpoints points along the way, and after close, it prints the files the reader shows and the files on
disk, and times what the TUI does on every tick: ``Trace.refresh()`` (re-list the segments, read the footers of
new ones, re-create the DuckDB views) and a ``count(*)`` over the routing view. ``--no-compact`` keeps every
flush as its own file (the behaviour before compaction); ``--root`` picks the moeprobe checkout to import:

    python bench/segment_refresh.py --segments 86400 --grace 2
    python bench/segment_refresh.py --segments 3600 --no-compact
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segments", type=int, default=3600)
    parser.add_argument("--checkpoints", type=int, default=6)
    parser.add_argument("--no-compact", action="store_true")
    parser.add_argument("--grace", type=float, default=60.0, help="seconds merged-away segments stay (the writer's "
                        "default 60 s keeps about 60 of them at a 1 s flush; this loop flushes far faster, so pass "
                        "60 / (its flushes per second) to keep as many)")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, str(args.root))
    import numpy as np
    import pyarrow as pa

    import moeprobe
    from moeprobe.traces import ShardWriter, prepare_trace_dir
    from moeprobe.traces.schema import FORMAT_VERSION, ROUTING

    load = lambda: " ".join(f"{x:.2f}" for x in os.getloadavg())  # noqa: E731
    print(f"moeprobe from {args.root} (format {FORMAT_VERSION}); load average {load()}")
    path = Path(tempfile.mkdtemp(prefix="segment_refresh_")) / "trace"
    prepare_trace_dir(path, force=False)
    layers = [{"index": 0, "name": "l0", "num_experts": 8, "top_k": 2}]
    writer = ShardWriter(path, model={"name": "bench"}, layers=layers, options={}, compact=not args.no_compact)
    rows = pa.table({
        "step": np.zeros(4, np.int32), "sequence": np.zeros(4, np.int64), "position": np.array([0, 0, 1, 1], np.int32),
        "token_id": np.zeros(4, np.int32), "phase": ["prefill"] * 4, "layer": np.zeros(4, np.int16),
        "k": np.array([0, 1, 0, 1], np.int8), "expert": np.array([1, 2, 3, 4], np.int16),
        "weight": np.array([0.5, 0.25, 0.5, 0.25], np.float32), "dropped": np.zeros(4, bool),
    }, schema=ROUTING)
    if writer.compactor is not None:
        writer.compactor.grace_s = args.grace
    trace = None

    def tick(label: str) -> None:
        nonlocal trace
        if trace is None:
            trace = moeprobe.open_trace(path)
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            trace.refresh()
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        n = trace.sql("select count(*) from routing").column(0).to_pylist()[0]
        count_ms = (time.perf_counter() - t0) * 1000
        shown = len(trace.reader.segments("routing"))
        on_disk = len(list((path / "rank=0" / "routing").glob("*.parquet")))
        print(f"{label:>22s} | {shown:6d} | {on_disk:6d} | {statistics.median(times) * 1000:8.1f} | {max(times) * 1000:8.1f} | "
              f"{count_ms:8.1f} | {n:,}", flush=True)

    print(f"{'flushes':>22s} | shown  | files  | refresh median ms | max ms | count(*) ms | decisions")
    marks = {round(args.segments * (i + 1) / args.checkpoints) for i in range(args.checkpoints)}
    began = time.perf_counter()
    for step in range(args.segments):
        writer.append("routing", rows.set_column(0, "step", pa.array(np.full(4, step, np.int32))))
        writer.flush()
        if step + 1 in marks:
            tick(f"{step + 1:,}")
    writer.close()
    print(f"wrote {args.segments:,} flushes in {time.perf_counter() - began:.1f} s "
          f"({writer.compactor.merges if writer.compactor else 0} merges)")
    tick("after close")
    print(f"load average {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
