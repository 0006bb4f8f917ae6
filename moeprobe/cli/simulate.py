"""``moeprobe simulate``: replay a trace's routing under other balancing strategies, side by side."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .._version import __version__
from .args import Parser, add_selection_options, selection_filters
from .main import UsageError

HELP = "replay recorded routing under other balancing strategies (re-routing, bias, capacity, EPLB)"


EPILOG = """strategies (repeat --strategy; join a routing stage and a capacity stage with +):
  recorded                              the routing as captured (always shown first)
  reroute[:k=K,bias=auto|recorded|zero|none]
                                        re-route from captured router logits (needs record --logits)
  topk:k=K                              re-route with another top-k
  online-bias[:u=0.001,init=zero|recorded,k=K]
                                        aux-loss-free bias, updated after every replayed step
  capacity:cf=F|slots=N[,order=position|score,group=step|sequence,second=keep|random,seed=S]
                                        token dropping past expert capacity (second=random: GShard top-2)

--eplb gpus=G[,replicas=R|redundant=N,groups=N,nodes=N,plan=A:B,eval=A:B,estimate=sum|ema:A|last:W,
       origin=auto|rank|sequence]
  plans DeepSeek EPLB on the plan window's load and evaluates it (and contiguous placement) on the
  evaluation window (default: after the plan window, or the same steps when no plan window is given).

examples:
  moeprobe simulate traces/run --strategy reroute:bias=zero --strategy online-bias:u=0.01
  moeprobe simulate traces/run --strategy topk:k=1+capacity:cf=1.25 --steps 0:100 --json
  moeprobe simulate traces/run --eplb replicas=16,groups=4,nodes=2,gpus=8,plan=0:50 --json
  moeprobe simulate traces/run --eplb gpus=8,redundant=8 --export sglang expert_location.json

a counts trace (imported engine counts, see docs/engines.md) supports --eplb and --export only."""


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="moeprobe simulate",
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("trace", help="trace directory")
    parser.add_argument("--strategy", "-s", action="append", default=[], metavar="SPEC", help="strategy to replay")
    add_selection_options(parser)
    parser.add_argument("--eplb", metavar="KEY=VALUE,...", help="expert placement to evaluate (see below)")
    parser.add_argument("--ep-size", type=int, default=8, metavar="GPUS", help="expert-parallel GPUs for the EP balance "
                        "column, experts placed contiguously (default: 8, or the --eplb gpus)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text (schema: "
                        "docs/simulate-json.md)")
    parser.add_argument("--output", "-o", metavar="OUT", type=Path, help="write the (single) strategy's routing as a trace")
    parser.add_argument("--force", action="store_true", help="with -o or --export: overwrite an existing file")
    parser.add_argument(
        "--export", nargs=2, metavar=("FORMAT", "FILE"),
        help="with --eplb: write the EPLB placement for an engine: sglang (--init-expert-location JSON) or eplb "
        "(DeepSeek EPLB phy2log/log2phy/logcnt JSON); see docs/engines.md",
    )
    parser.add_argument("--html", metavar="FILE", help="per-GPU (or per-expert) load before and after, as an HTML page (instead of the text table)")
    return parser


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)

    from ..simulate.deployment import EplbOptions
    from ..simulate.strategies import parse_strategy

    try:
        strategies = [parse_strategy(text) for text in args.strategy]
        eplb = EplbOptions.parse(args.eplb) if args.eplb else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    selection = selection_filters(args)  # the report's parser: the same --steps and --layers
    window = selection.steps or (None, None)
    layers = list(selection.layers) if selection.layers is not None else None
    if args.ep_size < 1:
        raise UsageError("--ep-size must be at least 1")
    if args.output is not None and len(strategies) != 1:
        raise UsageError("-o writes one simulated routing: give exactly one --strategy")
    if args.force and args.output is None and args.export is None:
        raise UsageError("--force only applies with -o OUT or --export")
    if args.export is not None:
        from ..simulate.export import EXPORT_FORMATS

        if eplb is None:
            raise UsageError("--export writes an EPLB placement: give --eplb gpus=N,...")
        if args.export[0] not in EXPORT_FORMATS:
            raise UsageError(f"--export: format {args.export[0]!r} is not one of {', '.join(EXPORT_FORMATS)}")
        if args.export[0] == "sglang" and not args.export[1].endswith(".json"):
            raise UsageError(f"--export sglang: {args.export[1]} should end in .json (SGLang reads any other value as inline JSON)")
        if Path(args.export[1]).exists() and not args.force:  # before the simulation, not after it
            raise UsageError(f"--export: {args.export[1]} already exists; pass --force to overwrite it")

    from ..simulate.report_model import SimulateReport

    report = SimulateReport.from_json(_simulate(args, strategies, window, layers, eplb))
    if args.export is not None:
        from dataclasses import replace

        from ..simulate.export import export_placement

        assert report.eplb is not None  # --export needs --eplb (checked above)
        try:
            exported = export_placement(report.eplb.to_json(), args.export[0], Path(args.export[1]), force=args.force)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        report = replace(report, exported=str(exported))
    if args.html:
        from .pictures import write_pictures
        from .render import RenderOptions

        code = write_pictures("simulate", report, RenderOptions(), html=args.html, png=None, svg=None)
        if code or not args.json:  # as with report: the page replaces the text table, --json still prints
            if report.written is not None:  # said at the end of the text table, which is not printed
                from ..safe_text import printable

                print(f"wrote the simulated routing to {printable(report.written)}", file=sys.stderr)
            return code
    from .render import json_doc, text

    (json_doc if args.json else text).render(report, sys.stdout)
    return 0


def _simulate(args: argparse.Namespace, strategies: list[Any], window: Any, layers: list[int] | None, eplb: Any) -> dict[str, Any]:
    """Load the trace, run every strategy (and the placement), write -o; return the report."""
    from ..analysis.session import open_trace
    from ..simulate import replay
    from ..simulate.data import SimRouting
    from ..simulate.deployment import evaluate_placement
    from ..simulate.report_model import FORMAT_VERSION

    with open_trace(args.trace) as trace:
        if trace.mode == "counts":
            return _simulate_counts(trace, strategies, window, layers, eplb)
        data = replay.load_layers(trace, window=window, layers=layers, scores=any(s.needs_scores for s in strategies))
        replay.check_requirements(strategies, data)
        gpus = eplb.gpus if eplb else args.ep_size
        recorded = [SimRouting(layer.experts, layer.weights, layer.dropped) for layer in data.layers]
        report: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "generator": f"moeprobe {__version__}",
            "trace": str(trace.path),
            "steps": list(window),  # [A, B), either end null, like the report's filters.steps
            "layers": [layer.index for layer in data.layers],
            "tokens": {str(layer.index): layer.tokens for layer in data.layers},
            "ep": {"gpus": gpus, "placement": "contiguous",
                   "layers_not_divisible": [layer.index for layer in data.layers if layer.num_experts % gpus]},
            "strategies": [_row("recorded", data.layers, recorded, gpus)],
            "notes": data.notes,
        }
        sims: list[SimRouting] = []
        try:
            for strategy in strategies:
                sims = replay.run(strategy, data)
                report["strategies"].append(_row(strategy.text, data.layers, sims, gpus))
            if eplb is not None:
                report["eplb"] = evaluate_placement(data.layers, eplb, data.world_size)
        except ValueError as exc:  # StrategyError included: a spec that does not fit this trace
            raise UsageError(str(exc)) from None
        if args.output is not None:
            report["written"] = str(replay.write_simulated_trace(data, sims, strategies[0], args.output, force=args.force))
    return report


def _simulate_counts(trace: Any, strategies: list[Any], window: Any, layers: list[int] | None, eplb: Any) -> dict[str, Any]:
    """A counts trace (the loads table only): EPLB planning works from per-step expert loads; re-routing cannot."""
    import numpy as np

    from ..simulate.deployment import evaluate_placement_counts
    from ..simulate.report_model import FORMAT_VERSION

    if strategies:
        raise UsageError(
            "strategies re-route tokens and need per-token routing; this trace holds only expert counts "
            "(the loads table): use --eplb to plan a placement from them"
        )
    if eplb is None:
        raise UsageError("this trace holds only expert counts: nothing to replay without --eplb gpus=N,...")
    metas = [m for m in trace.layers if layers is None or int(m["index"]) in layers]
    missing = sorted(set(layers or []) - {int(m["index"]) for m in metas})
    if missing:
        raise UsageError(f"--layers: layer {missing[0]} is not in this trace")
    where, params = [], []
    if window[0] is not None:
        where.append("step >= ?")
        params.append(window[0])
    if window[1] is not None:
        where.append("step < ?")
        params.append(window[1])
    clause = (" WHERE " + " AND ".join(where)) if where else ""
    got = trace.sql(f"SELECT step, layer, expert, rank, tokens FROM loads{clause}", params).to_pydict()
    loads = {key: np.asarray(values, dtype=np.int64) for key, values in got.items()}
    try:
        result = evaluate_placement_counts(metas, loads, eplb)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return {
        "format_version": FORMAT_VERSION,
        "generator": f"moeprobe {__version__}",
        "trace": str(trace.path),
        "mode": "counts",
        "steps": list(window),
        "layers": [int(m["index"]) for m in metas],
        "tokens": {},
        "ep": {"gpus": eplb.gpus, "placement": "contiguous",
               "layers_not_divisible": [int(m["index"]) for m in metas if int(m["num_experts"]) % eplb.gpus]},
        "strategies": [],
        "notes": [
            "counts trace (expert loads per step, no per-token routing): EPLB planning only; re-routing, capacity "
            "and the recorded-routing metrics need per-token rows; tokens originate on their recorded rank"
        ],
        "eplb": result,
    }


def _row(name: str, layers: list[Any], sims: list[Any], gpus: int | None) -> dict[str, Any]:
    from ..simulate.compare import drop_report, layer_metrics, summarize

    per_layer = [layer_metrics(layer, sim, gpus) for layer, sim in zip(layers, sims, strict=True)]
    notes = [note for sim in sims for note in sim.notes]
    row: dict[str, Any] = {"strategy": name, "summary": summarize(per_layer), "layers": per_layer, "notes": notes}
    drops = drop_report(layers, sims)
    if drops is not None:
        row["drops"] = drops
    return row
