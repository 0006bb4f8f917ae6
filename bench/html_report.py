"""Build time and size of ``moeprobe report TRACE --html`` on a 10 M-decision trace (issue 17 target: 5 s or
less, 5 MB or less).

The trace comes from ``bench/synthetic.py`` (OLMoE-like: 16 layers x 64 experts, top-8, a domain tag, latency
rows), written once and reused. Each run is a fresh process timed from the outside: interpreter start, imports,
every analysis, the charts and the file. Two cases, interleaved:

- ``warm``: the Vega JavaScript bundle is in the user cache (every run after the first on a machine);
- ``cold``: an empty cache directory, so vl-convert builds the bundle (the first run on a machine).

Also renders ``--png`` once and prints its time. Run:
    .venv/bin/python bench/html_report.py [--decisions 10M] [--runs 3] [--dir /tmp/moeprobe-bench]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from synthetic import parse_count as _size  # noqa: E402 - bench/ is put on the path just above


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall s, CPU s of the child) of one command; CPU time is shown because this machine is shared."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode() if proc.stderr else ''}")
    return wall, usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", default="10M")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "moeprobe-bench")
    parser.add_argument("--rebuild", action="store_true")
    args = parser.parse_args()

    from synthetic import build_trace

    decisions = _size(args.decisions)
    trace = args.dir / f"synthetic-{args.decisions}"
    if args.rebuild or not (trace / "manifest.json").exists():
        built = build_trace(trace, decisions)
        print(f"built {trace}: {built['decisions']:,.0f} decisions in {built['seconds']:.1f} s")
    out = args.dir / "report.html"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "moeprobe", "report", str(trace), "--html", str(out)]

    load_before = os.getloadavg()
    warm_env = dict(env)
    subprocess.run(cmd, env=warm_env, check=True, capture_output=True)  # fills the user cache if it was empty
    times: dict[str, list[tuple[float, float]]] = {"warm": [], "cold": []}
    for _ in range(args.runs):
        times["warm"].append(_timed(cmd, warm_env))
        with tempfile.TemporaryDirectory() as cache:
            times["cold"].append(_timed(cmd, {**env, "MOEPROBE_CACHE_DIR": cache}))
    size = out.stat().st_size
    load = os.getloadavg()
    print(f"trace: {trace} ({decisions:,} decisions requested)")
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load[0]:.2f} (5 min {load[1]:.2f})")
    for case, rows in times.items():
        walls = [w for w, _ in rows]
        cpus = [c for _, c in rows]
        print(f"{case:>5}: wall best {min(walls):.2f} s, median {statistics.median(walls):.2f} s; "
              f"CPU best {min(cpus):.2f} s  ({args.runs} runs)")
    print(f"html: {size / 1e6:.2f} MB ({size:,} bytes); target <= 5 s and <= 5 MB")
    with tempfile.TemporaryDirectory() as pngs:
        wall, cpu = _timed([sys.executable, "-m", "moeprobe", "report", str(trace), "--png", pngs], env)
        total = sum(p.stat().st_size for p in Path(pngs).iterdir())
        print(f"--png: {wall:.2f} s wall, {cpu:.2f} s CPU, {len(list(Path(pngs).iterdir()))} files, {total / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
