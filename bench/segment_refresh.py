"""Cost of re-listing a long recording's segments: ``TraceReader.refresh()`` and re-creating the DuckDB views.

Writes a trace with --segments routing segments (one per flush, as a recording at a 1 s flush interval makes
one an hour is 3,600), then times a refresh that finds nothing new (what the TUI does on every tick) and the
views' re-creation. ``--root`` picks the moeprobe checkout to import, so that two versions compare in one
session:

    python bench/segment_refresh.py --segments 3600
    python bench/segment_refresh.py --segments 3600 --root /path/to/other/checkout
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
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, str(args.root))
    import duckdb
    import numpy as np
    import pyarrow as pa

    from moeprobe.analysis.views import create_views
    from moeprobe.traces import ShardWriter, prepare_trace_dir
    from moeprobe.traces.reader import TraceReader
    from moeprobe.traces.schema import FORMAT_VERSION, ROUTING

    print(f"moeprobe from {args.root} (format {FORMAT_VERSION}); load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    path = Path(tempfile.mkdtemp(prefix="segment_refresh_")) / "trace"
    prepare_trace_dir(path, force=False)
    layers = [{"index": 0, "name": "l0", "num_experts": 8, "top_k": 2}]
    writer = ShardWriter(path, model={"name": "bench"}, layers=layers, options={})
    rows = pa.table({
        "step": np.zeros(4, np.int32), "sequence": np.zeros(4, np.int64), "position": np.array([0, 0, 1, 1], np.int32),
        "token_id": np.zeros(4, np.int32), "phase": ["prefill"] * 4, "layer": np.zeros(4, np.int16),
        "k": np.array([0, 1, 0, 1], np.int8), "expert": np.array([1, 2, 3, 4], np.int16),
        "weight": np.array([0.5, 0.25, 0.5, 0.25], np.float32), "dropped": np.zeros(4, bool),
    }, schema=ROUTING)
    began = time.perf_counter()
    for step in range(args.segments):
        writer.append("routing", rows.set_column(0, "step", pa.array(np.full(4, step, np.int32))))
        writer.flush()
    writer.close()
    print(f"wrote {args.segments} routing segments in {time.perf_counter() - began:.1f} s")
    reader = TraceReader(path)
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        reader.refresh()
        times.append(time.perf_counter() - t0)
    print(f"TraceReader.refresh(), nothing new: median {statistics.median(times) * 1000:.0f} ms (min {min(times) * 1000:.0f})")
    con = duckdb.connect()
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        create_views(con, reader)
        times.append(time.perf_counter() - t0)
    print(f"create_views: median {statistics.median(times) * 1000:.0f} ms")
    t0 = time.perf_counter()
    n = con.execute("select count(*) from routing").fetchone()[0]
    print(f"count(*) over the routing view: {n} rows in {(time.perf_counter() - t0) * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
