"""Scale check for the analysis engine (issue 4): ``moeprobe report --json`` on 10 M and 100 M routing decisions,
and the load metrics done by pandas on the same data.

1. Builds (or reuses) synthetic traces through the real ShardWriter (``bench/synthetic.py``: OLMoE-like,
   16 layers x 64 experts, top-8, prefill + decode steps, a domain tag per sequence, latency rows).
2. Times ``python -m moeprobe report TRACE --json`` in a fresh process, ``--runs`` times; wall time of the whole
   command (interpreter start, imports, every analysis, JSON out) and its peak RSS from wait4.
3. Load metrics only, each in a fresh process, interleaved: moeprobe (``Trace.load`` + ``Trace.ep_load``: per
   layer counts, MaxVio global and per step, CV, entropy, Gini, top-N, dead, EP balancedness) against pandas
   (read_parquet of the same segments, groupby, the same formulas). Checks they agree, prints the ratio.

Run:  .venv/bin/python bench/report_scale.py [--sizes 10M,100M] [--runs 3] [--dir /tmp/moeprobe-bench] [--rebuild]
      [--forms text,json,html] [--no-pandas]
Issue 14's small-trace target (every report under 1 M decisions in <= 1 s):
      .venv/bin/python bench/report_scale.py --sizes 1M --runs 5 --forms text,json,html --no-pandas
(a size below one synthetic batch of 2.1 M decisions writes fewer sequences: "1M" is 983,040 decisions).
Reports run with their bytecode cached (under DIR/pycache, whatever PYTHONDONTWRITEBYTECODE says), after one
untimed run per output form.
pandas is only needed here (pip install pandas); it is not a moeprobe dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from synthetic import parse_count as _size  # noqa: E402 - bench/ is put on the path just above


def _run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, float, str]:
    """(wall seconds, CPU seconds, peak RSS MiB, stdout) of one child process. Output goes through files so
    that wait4 can reap the child and report its own usage. CPU time (user + sys) is printed beside wall time
    because this machine is shared: wall time grows with other people's load, CPU time much less."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err.read().strip()}")
        return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, out.read()


def _installed_env(bench_dir: Path) -> dict[str, str]:
    """The environment of a timed report: as an installed moeprobe runs, with its bytecode cached. A caller's
    PYTHONDONTWRITEBYTECODE (set on the shared development machines) would otherwise make every run compile
    moeprobe's modules from source again: importing the report's modules took 0.27 s against 0.23 s from the cache
    (medians of 6, load 3), a cost no installed copy pays. The cache goes under the bench directory
    (PYTHONPYCACHEPREFIX), not into the source tree."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(bench_dir / "pycache")
    return env


# -- workers (run in their own process so that each starts cold and its RSS is its own) -----------------
def moeprobe_load(trace_path: str) -> dict[str, Any]:
    import moeprobe

    started = time.perf_counter()
    with moeprobe.open_trace(trace_path) as trace:
        load = trace.load()
        ep = trace.ep_load(ep_size=8)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "maxvio_global": [item.maxvio_global for item in load.layers],
        "maxvio_batch_mean": [item.maxvio_batch_mean for item in load.layers],
        "gini": [item.gini for item in load.layers],
        "balancedness": [item.balancedness for item in ep.layers],
    }


def pandas_load(trace_path: str) -> dict[str, Any]:
    """The same load metrics the way one would write them in pandas over the trace's Parquet files."""
    import pandas as pd

    started = time.perf_counter()
    files = sorted(Path(trace_path).glob("rank=*/routing/*.parquet"))
    def read(f: Path) -> pd.DataFrame:
        import pyarrow.parquet as pq

        names = pq.read_schema(f).names
        if "expert" in names:  # format 1: one row per decision
            return pd.read_parquet(f, columns=["step", "layer", "expert"])
        # format 2: one row per token, choice i in expert_i, the first `choices` of them used
        choice = [n for n in names if n.startswith("expert_")]
        t = pd.read_parquet(f, columns=["step", "layer", "choices", *choice])
        used = np.arange(len(choice))[None, :] < t["choices"].to_numpy()[:, None]
        return pd.DataFrame({
            "step": np.repeat(t["step"].to_numpy(), t["choices"].to_numpy().astype(np.int64)),
            "layer": np.repeat(t["layer"].to_numpy(), t["choices"].to_numpy().astype(np.int64)),
            "expert": t[choice].to_numpy()[used].astype(np.int16),
        })

    df = pd.concat([read(f) for f in files], ignore_index=True)
    layers = json.loads((Path(trace_path) / "manifest.json").read_text())["layers"]
    experts = {layer["index"]: layer["num_experts"] for layer in layers}
    top_k = {layer["index"]: layer["top_k"] for layer in layers}
    counts = df.groupby(["layer", "expert"]).size()
    per_step = df.groupby(["step", "layer", "expert"]).size()
    step_stats = per_step.groupby(level=["step", "layer"]).agg(["max", "sum"])
    out: dict[str, list[float]] = {"maxvio_global": [], "maxvio_batch_mean": [], "gini": [], "balancedness": []}
    for layer, series in counts.groupby(level="layer"):
        E = experts[int(layer)]
        c = np.zeros(E)
        c[series.index.get_level_values("expert").to_numpy()] = series.to_numpy()
        mean = c.mean()
        out["maxvio_global"].append(c.max() / mean - 1)
        s = step_stats.xs(layer, level="layer")
        out["maxvio_batch_mean"].append(float((s["max"] * E / s["sum"] - 1).mean()))
        ordered = np.sort(c)
        out["gini"].append(float(2 * (np.arange(1, E + 1) * ordered).sum() / (E * c.sum()) - (E + 1) / E))
        ep = c.reshape(8, E // 8).sum(axis=1)
        out["balancedness"].append(float(ep.mean() / ep.max()))
        _ = c.std() / mean, top_k[int(layer)]  # CV and top-N are one line each; computed for parity
    return {"seconds": time.perf_counter() - started, **out}


def _worker(kind: str, trace_path: str) -> tuple[float, dict[str, Any]]:
    _, _, rss, out = _run([sys.executable, __file__, f"--worker={kind}", trace_path])
    return rss, json.loads(out)


# -- driver ---------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10M,100M")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/moeprobe-bench"))
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--forms", default="json", help="report outputs to time: text, json, html (comma-separated)")
    parser.add_argument("--no-pandas", action="store_true", help="time the reports only, not the pandas comparison")
    parser.add_argument("--worker", choices=("moeprobe", "pandas"), help=argparse.SUPPRESS)
    parser.add_argument("trace", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = moeprobe_load(args.trace) if args.worker == "moeprobe" else pandas_load(args.trace)
        print(json.dumps(result))
        return 0

    from synthetic import build_trace

    import moeprobe

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    for text in args.sizes.split(","):
        decisions = _size(text)
        path = args.dir / f"routing-{text.strip()}"
        if args.rebuild or not (path / "manifest.json").exists():
            built = build_trace(path, decisions)
            print(f"\n[{text}] built {int(built['decisions']):,} decisions in {built['seconds']:.1f} s -> {path}")
        with moeprobe.open_trace(path) as trace:
            total = trace.manifest["counters"]["decisions"]
            segments = len(trace.reader.segments("routing"))
        size_mb = sum(f.stat().st_size for f in path.rglob("*.parquet")) / 2**20
        print(f"\n[{text}] {total:,} routing decisions, {segments} segments, {size_mb:.0f} MiB on disk")

        env = _installed_env(args.dir)
        for form in args.forms.split(","):
            flags = {"text": [], "json": ["--json"], "html": ["--html", str(args.dir / "report-scale.html")]}[form]
            report_cmd = [sys.executable, "-m", "moeprobe", "report", str(path), *flags]
            _run(report_cmd, env)  # untimed: writes the bytecode cache and warms the page cache
            runs = [_run(report_cmd, env) for _ in range(args.runs)]
            walls = [r[0] for r in runs]
            print(
                f"  report {' '.join(flags[:1]) or '(text)'}: wall median {statistics.median(walls):.2f} s, best {min(walls):.2f} s "
                f"(runs: {', '.join(f'{w:.2f}' for w in walls)}); CPU median {statistics.median(r[1] for r in runs):.2f} s; "
                f"peak RSS {max(r[2] for r in runs):.0f} MiB; load average {os.getloadavg()[0]:.1f}"
            )
        if args.no_pandas:
            continue

        ours, theirs = [], []
        for _ in range(args.runs):  # interleaved, so machine noise hits both alike
            ours.append(_worker("moeprobe", str(path)))
            theirs.append(_worker("pandas", str(path)))
        for key in ("maxvio_global", "maxvio_batch_mean", "gini", "balancedness"):
            if not np.allclose(ours[0][1][key], theirs[0][1][key], rtol=1e-6):
                raise SystemExit(f"moeprobe and pandas disagree on {key}")
        ours_s = statistics.median(r[1]["seconds"] for r in ours)
        theirs_s = statistics.median(r[1]["seconds"] for r in theirs)
        print(
            f"  load metrics (in-process time, median of {args.runs}): moeprobe {ours_s:.2f} s "
            f"(peak RSS {max(r[0] for r in ours):.0f} MiB), pandas {theirs_s:.2f} s "
            f"(peak RSS {max(r[0] for r in theirs):.0f} MiB): pandas / moeprobe = {theirs_s / ours_s:.1f}x; "
            "results agree"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
