"""Time for ``moeprobe tui`` to paint the overview of a 10 M-decision trace (issue 5 target: under 1 s).

The trace is written once by ``bench/synthetic.py`` (OLMoE-like: 16 layers x 64 experts, top-8) and reused.
Each run is a fresh Python process, so DuckDB starts cold as it would for a user; a run measures from creating
the app to the overview screen having painted its first pass (header, heat map, per-layer MaxVio, CV, dead
experts), headless at 200 x 50; then to the per-step pass (MaxVio_batch, sparklines). Imports are timed apart.

Run:  .venv/bin/python bench/tui_open.py [--decisions N] [--runs N] [--trace DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import asyncio, json, sys, time
t0 = time.perf_counter()
from moeprobe.tui.app import MoeprobeApp
from moeprobe.tui.screens.overview import OverviewScreen
imported = time.perf_counter() - t0

async def after_refresh(app, started: float) -> float:
    # The time once the screen has been redrawn with what it was given (not when the queue next goes idle:
    # the per-step pass is still running in its worker then).
    done = asyncio.Event()
    app.screen.call_after_refresh(done.set)
    await done.wait()
    return time.perf_counter() - started

async def main() -> None:
    started = time.perf_counter()
    app = MoeprobeApp([sys.argv[1]])
    async with app.run_test(size=(200, 50)) as pilot:
        while True:
            screen = app.screen
            if isinstance(screen, OverviewScreen) and screen.data is not None:
                break
            await asyncio.sleep(0.005)
        painted = await after_refresh(app, started)
        rows = len(screen.data.layers)
        decisions = screen.data.decisions
        while screen.shown_generation is None:  # the per-step pass: MaxVio_batch and the sparklines
            await asyncio.sleep(0.005)
        full = await after_refresh(app, started)
    print(json.dumps({"import_s": imported, "painted_s": painted, "full_s": full, "layers": rows,
                      "decisions": decisions}))

asyncio.run(main())
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--trace", type=Path, help="trace to open (default: a synthetic one, built once under /tmp)")
    args = parser.parse_args()

    trace = args.trace
    if trace is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from synthetic import build_trace

        trace = Path(tempfile.gettempdir()) / f"moeprobe-bench-tui-{args.decisions}"
        if not (trace / "manifest.json").exists():
            built = build_trace(trace, args.decisions)
            print(f"wrote {trace}: {built['decisions']:,.0f} decisions in {built['seconds']:.1f} s")
    results = []
    for _ in range(args.runs):
        out = subprocess.run([sys.executable, "-c", _CHILD, str(trace)], capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    painted = [r["painted_s"] for r in results]
    imports = [r["import_s"] for r in results]
    full = [r["full_s"] for r in results]
    print(f"machine: {platform.processor() or platform.machine()}, {platform.python_version()}")
    print(f"trace: {trace} ({results[0]['decisions']:,} decisions, {results[0]['layers']} layers)")
    print(f"overview painted: median {statistics.median(painted):.3f} s, min {min(painted):.3f} s, "
          f"max {max(painted):.3f} s over {len(painted)} cold runs")
    print(f"per-step columns (MaxVio_batch, sparklines) filled in: median {statistics.median(full):.3f} s, "
          f"max {max(full):.3f} s")
    print(f"imports before the app starts (textual, moeprobe.tui): median {statistics.median(imports):.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
