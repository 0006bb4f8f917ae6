"""Single-process vs distributed ``moeprobe report --json`` on one sharded synthetic trace (issue 19).

1. Builds (or reuses) a trace of ``--shards`` ranks, ``--decisions`` routing decisions in all, through the real
   ShardWriter (``bench/synthetic.py``: OLMoE-like, 16 layers x 64 experts, top-8, a domain tag per sequence,
   latency rows), each rank with its own steps and sequences as a job of that many ranks writes them.
2. Times, in fresh processes and in one run: ``report TRACE --json`` (DuckDB in one process, the default) and
   ``report TRACE --json --engine dask --workers N`` for each N of ``--workers`` (a local Dask cluster of N
   worker processes, one thread each, started by the command: its start-up is inside the time).
3. Checks that every distributed report equals the single-process one field for field, and prints the load
   average before and after (the machine may be shared: wall times grow with other people's load).

Wall time only: the workers are grandchildren of the timed process, so its CPU time would leave them out.

Run:  .venv/bin/python bench/distributed_report.py [--decisions 200M] [--shards 16] [--workers 1,2,4] [--runs 1]
      [--dir /tmp/moeprobe-bench-dist] [--rebuild]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from synthetic import parse_count as _size  # noqa: E402 - bench/ is put on the path just above


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def _report(trace: Path, *extra: str) -> tuple[float, dict]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), *filter(None, [env.get("PYTHONPATH")])])
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "moeprobe", "report", str(trace), "--json", *extra],
                            capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"report {' '.join(extra)} failed ({result.returncode}): {result.stderr.strip()}")
    return wall, json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decisions", type=_size, default=_size("200M"))
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--runs", type=int, default=1, help="runs of each command (the median is printed)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/moeprobe-bench-dist"))
    parser.add_argument("--rebuild", action="store_true")
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]

    from synthetic import Shape, build_sharded_trace

    import moeprobe

    trace = args.dir / f"trace-{args.decisions}-{args.shards}"
    built = None
    try:
        built = moeprobe.open_trace(trace).manifest["counters"]["decisions"] if not args.rebuild else None
    except moeprobe.traces.TraceError:
        pass
    if built is None:
        shutil.rmtree(trace, ignore_errors=True)
        trace.parent.mkdir(parents=True, exist_ok=True)
        got = build_sharded_trace(trace, args.decisions, args.shards, seed=1)
        built = int(got["decisions"])
        print(f"built {trace}: {built:,} decisions in {args.shards} shards, {got['seconds']:.0f} s")
    size = sum(f.stat().st_size for f in trace.rglob("*.parquet"))
    shape = Shape()
    print(f"trace {trace}: {built:,} decisions ({shape.layers} layers x {shape.experts} experts, top-{shape.top_k}), "
          f"{args.shards} shards, {size / 2**20:,.0f} MiB of Parquet; {os.cpu_count()} CPUs")
    print(f"load average before: {_load()}")

    rows: list[tuple[str, float, list[float]]] = []
    reference: dict | None = None
    plans = [("single process (DuckDB)", ())] + [(f"dask, {n} worker{'s' if n > 1 else ''}", ("--engine", "dask", "--workers", str(n))) for n in workers]
    for label, extra in plans:
        walls = []
        for _ in range(args.runs):
            wall, report = _report(trace, *extra)
            walls.append(wall)
            if reference is None:
                reference = report
            elif report != reference:
                raise SystemExit(f"{label}: the report differs from the single-process report")
        walls.sort()
        rows.append((label, walls[len(walls) // 2], walls))
        print(f"  {label:28s} {walls[len(walls) // 2]:7.2f} s   runs: {', '.join(f'{w:.2f}' for w in walls)}", flush=True)
    print(f"load average after: {_load()}")
    base = rows[0][1]
    print("\n| engine | `report --json` wall (median) | vs single process |")
    print("| --- | --- | --- |")
    for label, median, _ in rows:
        print(f"| {label} | {median:.2f} s | {base / median:.2f}x |")
    print("\nevery distributed report equals the single-process report field for field")


if __name__ == "__main__":
    main()
