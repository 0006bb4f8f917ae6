"""Issue 14: a report over a trace with router scores costs at most twice the same report without them.

1. Builds (or reuses) two synthetic traces with the same routing (same seed, same draws) through the real
   ShardWriter (``bench/synthetic.py``), DeepSeek-V3-shaped by default (58 MoE layers, top-8 of 256 experts,
   4,096 tokens a batch): one with the router logits of every token and layer (the ``scores`` table, as
   ``record --logits`` writes it), one without.
2. Times ``python -m moeprobe report TRACE --json`` on each in a fresh process, interleaved, ``--runs`` times:
   wall and CPU seconds (CPU beside wall: this machine is shared) and peak RSS.
3. Prints the median CPU and wall ratio scores / no scores, the load average, and which share of the sequences
   the router statistics read (``specialization.router.sample``, the ``--logit-sample`` budget).

Run:  .venv/bin/python bench/report_scores.py [--decisions 1.9M] [--runs 3] [--dir /tmp/moeprobe-bench] [--rebuild]
      [--logit-sample N]  (passed to the report; 0 reads the logits of the whole token-level sample)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from report_scale import _run  # noqa: E402 - bench/ is put on the path just above
from synthetic import Shape, build_trace, parse_count  # noqa: E402

DSV3 = Shape(layers=58, experts=256, top_k=8, vocab=129_280, batch=8)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", default="1.9M", help="about this many routing decisions (whole batches)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/moeprobe-bench"))
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--logit-sample", help="the report's --logit-sample (default: the report's default)")
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # worker: write one trace, then exit
    parser.add_argument("--with-scores", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    decisions = parse_count(args.decisions)
    if args.build:
        built = build_trace(args.build, decisions, shape=DSV3, scores=args.with_scores)
        print(f"built {args.build} ({int(built['decisions']):,} decisions) in {built['seconds']:.1f} s")
        return 0
    paths = {}
    for scores in (False, True):
        path = args.dir / f"dsv3-{args.decisions}-{'scores' if scores else 'noscores'}"
        if args.rebuild or not (path / "manifest.json").exists():
            # in a child process: the reports' peak RSS would otherwise start from this process's (forked) memory
            flags = ["--with-scores"] if scores else []
            subprocess.run([sys.executable, __file__, "--build", str(path), "--decisions", args.decisions, *flags], check=True)
        paths[scores] = path
    size = {s: sum(f.stat().st_size for f in p.rglob("*.parquet")) / 2**20 for s, p in paths.items()}
    print(f"on disk: {size[False]:.0f} MiB without scores, {size[True]:.0f} MiB with")

    extra = ["--logit-sample", args.logit_sample] if args.logit_sample is not None else []
    runs: dict[bool, list[tuple[float, float, float, str]]] = {False: [], True: []}
    for _ in range(args.runs):  # interleaved, so machine noise hits both alike
        for scores in (False, True):
            runs[scores].append(_run([sys.executable, "-m", "moeprobe", "report", str(paths[scores]), "--json", *extra]))
    reports = {s: json.loads(r[-1][3]) for s, r in runs.items()}
    def routing_only(report: dict) -> list[dict]:  # aux losses come from the logits: only the traces with them have any
        return [{k: v for k, v in item.items() if k != "aux_loss"} for item in report["layers"]]

    if routing_only(reports[False]) != routing_only(reports[True]):
        raise SystemExit("the two traces' load reports differ: they should hold the same routing")
    router = reports[True]["specialization"]["router"]
    for scores in (False, True):
        r = runs[scores]
        print(
            f"  {'with scores   ' if scores else 'without scores'}: wall median {statistics.median(x[0] for x in r):.2f} s "
            f"(runs: {', '.join(f'{x[0]:.2f}' for x in r)}), CPU median {statistics.median(x[1] for x in r):.2f} s, "
            f"peak RSS {max(x[2] for x in r):.0f} MiB"
        )
    cpu = statistics.median(x[1] for x in runs[True]) / statistics.median(x[1] for x in runs[False])
    wall = statistics.median(x[0] for x in runs[True]) / statistics.median(x[0] for x in runs[False])
    sample = router["sample"]
    print(
        f"  ratio scores / no scores: CPU {cpu:.2f}x, wall {wall:.2f}x (target <= 2); router statistics on "
        f"{sample['fraction'] * 100:.1f}% of decisions ({sample['sequences']} sequences, logit budget "
        f"{router['logit_budget']:,}); load average {os.getloadavg()[0]:.1f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
