"""``moeprobe simulate``'s text: strategies side by side (summary, then per layer), drops, and the EPLB plan."""

from __future__ import annotations

from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from ...simulate.report_model import EplbResult, SimulateReport, StrategyLayer, StrategySummary

LEGEND = """columns (load = what the experts computed: dropped choices excluded; means over layers):
  MaxVio        (busiest expert - mean) / mean over the window; 0 is perfect balance
  MaxVio/batch  the same per step, averaged over steps
  balanced      mean / max expert load, 0..1 (1 = perfect balance; = 1 / (1 + MaxVio))
  EP balanced   mean / max load over {gpus} GPUs, experts placed contiguously (expert parallelism)
  CV            standard deviation / mean of the expert loads
  dropped       share of choices dropped over capacity
  changed       share of tokens whose set of experts differs from the recording
  mass lost     share of the recorded gate weight that no longer reaches an expert (re-routed or dropped)"""

_HEADER = ["MaxVio", "MaxVio/batch", "balanced", "EP balanced", "CV", "dropped", "changed", "mass lost"]


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def _steps_text(steps: list[int | None]) -> str:
    lo, hi = steps
    if lo is None and hi is None:
        return "all steps"
    return f"steps {'' if lo is None else lo}:{'' if hi is None else hi}"


def _cells(s: StrategySummary | StrategyLayer) -> list[str]:
    def num(value: float | None) -> str:
        return "-" if value is None or value != value else f"{value:.3f}"  # NaN: no EP balance for this layer

    return [
        num(s.max_vio), num(s.max_vio_batch), num(s.balancedness), num(s.ep_balancedness), num(s.cv),
        _pct(s.dropped_share), _pct(s.changed_share), _pct(s.mass_lost),
    ]


def write_simulate(report: SimulateReport, out: IO[str]) -> None:
    from ...safe_text import printable

    tokens = sorted(set(report.tokens.values()))
    token_text = "-" if not tokens else f"{tokens[0]:,}" if len(tokens) == 1 else f"{tokens[0]:,}-{tokens[-1]:,}"
    out.write(f"{printable(report.trace)}\n")  # a path from the user or a trace: no control codes
    out.write(f"  {_steps_text(report.steps)}, {len(report.layers)} layer(s), {token_text} tokens per layer\n\n")
    if report.strategies:
        _write_strategies(report, out)
    notes = list(report.notes) + [n for row in report.strategies for n in row.notes]
    if report.eplb is not None:
        _write_eplb(report.eplb, out)
        notes += report.eplb.notes
    if report.written is not None:
        out.write(f"\nwrote the simulated routing to {printable(report.written)}\n")
    if report.exported is not None:
        out.write(f"\nwrote the EPLB placement to {printable(report.exported)}\n")
    for note in notes:
        out.write(f"note: {printable(note)}\n")


def _write_strategies(report: SimulateReport, out: IO[str]) -> None:
    from ...simulate.compare import position_buckets

    ep = report.ep
    width = max(24, *(len(row.strategy) for row in report.strategies)) + 2
    cols = [max(len(h), 7) + 2 for h in _HEADER]

    def line(name: str, cells: list[str]) -> str:
        return f"{name:<{width}}" + "".join(f"{c:>{w}}" for c, w in zip(cells, cols, strict=True)) + "\n"

    out.write(line("strategy", _HEADER))
    for row in report.strategies:
        out.write(line(row.strategy, _cells(row.summary)))
    if len(report.layers) > 1:
        out.write("\nper layer\n")
        out.write(line("layer  strategy", _HEADER))
        for index in report.layers:
            for row in report.strategies:
                layer = next(item for item in row.layers if item.layer == index)
                out.write(line(f"{index:<6} {row.strategy}", _cells(layer)))
    out.write("\n" + LEGEND.format(gpus=ep.gpus) + "\n")
    if ep.layers_not_divisible:
        out.write(f"  (EP balanced is '-' for layers {', '.join(map(str, ep.layers_not_divisible))}: their experts do "
                  f"not divide over {ep.gpus} GPUs; see --ep-size)\n")

    for row in report.strategies:
        drops = row.drops
        if drops is None:
            continue
        out.write(f"\ndropped, {row.strategy}\n")
        layers = "  ".join(f"L{d.layer} {_pct(d.dropped / d.routed if d.routed else 0.0)}" for d in drops.by_layer)
        out.write(f"  by layer:     {layers}\n")
        by_position = {"routed": drops.by_position.routed, "dropped": drops.by_position.dropped}
        buckets = "  ".join(f"{lo}-{hi} {_pct(share)}" for lo, hi, share in position_buckets(by_position))
        out.write(f"  by position:  {buckets}\n")
        worst = []
        for d in drops.by_expert:
            for expert, count in enumerate(d.dropped):
                if count:
                    worst.append((count, d.layer, expert, d.routed[expert]))
        worst.sort(key=lambda item: (-item[0], item[1], item[2]))
        experts = "  ".join(f"L{layer} e{expert} {count}/{routed}" for count, layer, expert, routed in worst[:6])
        out.write(f"  most dropped: {experts}\n")


def _write_eplb(e: EplbResult, out: IO[str]) -> None:
    redundant = e.replicas - len(e.logcnt[0]) if e.logcnt else 0
    out.write(
        f"\nEPLB {e.policy}: {e.replicas} physical experts ({redundant} redundant) on {e.gpus} GPUs, "
        f"{e.nodes} node(s), {e.groups} group(s)\n"
        f"  planned on steps {e.plan_steps[0]}-{e.plan_steps[1]} ({e.estimate}), "
        f"evaluated on steps {e.eval_steps[0]}-{e.eval_steps[1]}\n"
    )
    contiguous = e.contiguous
    out.write(f"  {'layer':<7}{'contiguous':>11}{'eplb':>8}  replicated (expert x replicas: GPUs)\n")
    by_layer: dict[int, list[str]] = {}
    for r in e.replicated:
        by_layer.setdefault(r.layer, []).append(f"e{r.expert}x{r.replicas}: {','.join(map(str, r.gpus))}")
    for i, layer in enumerate(e.layers):
        cont = f"{contiguous.balancedness[i]:.3f}" if contiguous else "-"
        out.write(f"  {layer:<7}{cont:>11}{e.eplb.balancedness[i]:>8.3f}  {'  '.join(by_layer.get(layer, [])) or '-'}\n")
    cont_mean = f"{contiguous.balancedness_mean:.3f}" if contiguous else "-"
    out.write(f"  {'mean':<7}{cont_mean:>11}{e.eplb.balancedness_mean:>8.3f}\n")
    out.write(f"  all-to-all, assignments from source rank to GPU over all layers (origin: {e.origin}):\n")
    for name, placement in (("contiguous", e.contiguous), ("eplb", e.eplb)):
        if placement is not None:
            t = placement.traffic
            out.write(f"    {name:<11} max/mean {t.max_over_mean:.3f}  max {t.max:.0f}  local {_pct(t.local_share)}\n")
