"""The report as plain tables of strings, for any renderer (rich in the terminal, Markdown, a TUI).

Built from the typed report (``report_model``, the same values as the JSON), so every output format shows the
same numbers. Layers are
listed worst first and each metric has its random-routing baseline beside it, so that a reader can tell good
from bad without looking anything up: a router no better than random scores the "random" column; perfect
balance is MaxVio 0, CV 0, Gini 0, entropy 1, balancedness 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .report_model import Comparison, FiltersInfo, Quantiles, Report, Specialization, TraceInfo


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    note: str = ""


def num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def pct(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def with_random(value: Any, random: Any, fmt: Any = num) -> str:
    return f"{fmt(value)} ({fmt(random)})" if random is not None else fmt(value)


def _limited(rows: list[Any], limit: int) -> tuple[list[Any], str]:
    if limit <= 0 or len(rows) <= limit:
        return rows, ""
    return rows[:limit], f"{len(rows) - limit} more not shown (--limit 0 shows all)"


# -- one report -----------------------------------------------------------------------------------------
def header(report: Report) -> list[str]:
    trace, overall, spec = report.trace, report.overall, report.specialization
    model = trace.model or {}
    status = trace.status
    state = {
        "running": "still being written (complete segments only)",
        "stale": "writer gone without closing it (stale); what was written",
        "aborted": "aborted recording; what was written",
    }.get(status, status)
    lines = [
        f"trace {trace.path}: {state}",
        f"model {model.get('name', '?')} ({model.get('family', '?')}), {_ranks(trace.ranks)}",
    ]
    lines += anomaly_lines(trace)
    if overall.layers:
        lines.append(
            f"{overall.layers} MoE layers, {overall.decisions:,} routing decisions, {overall.tokens:,} tokens, "
            f"steps {overall.first_step}..{overall.last_step}"
        )
    else:
        lines.append("no routing decisions match (nothing recorded yet, or the filters exclude everything)")
    if overall.invalid_decisions:
        lines.append(
            f"invalid: {overall.invalid_decisions:,} routing rows left out of every figure (expert id outside the "
            "layer's experts, NULLs, negative steps or layers the manifest does not list)"
        )
    lines.append("filters: " + describe_filters(report.filters))
    if spec.needs_tokens:
        lines.append(
            "counts trace (expert loads per step, no per-token routing): load, EP placement and windows only; "
            "not available without per-token rows: " + ", ".join(spec.needs_tokens)
        )
    elif overall.layers:
        lines.append(describe_tags(spec))
    if overall.dropped:
        lines.append(
            f"dropped over capacity: {overall.dropped:,} choices ({pct(overall.dropped_share)}); \"routed\" load "
            "counts them (what the router asked for), \"processed\" load does not (what the experts computed)"
        )
    sample, counts = spec.sample, spec.counts_sample
    logits = spec.router.sample if spec.router else sample
    if sample.fraction < 1 or counts.fraction < 1 or logits.fraction < 1:
        if logits == sample:
            token_level = f"repetition, co-activation and router {pct(sample.fraction)} ({sample.sequences:,} sequences)"
        else:
            token_level = (
                f"repetition and co-activation {pct(sample.fraction)} ({sample.sequences:,} sequences), router "
                f"{pct(logits.fraction)} ({logits.sequences:,} sequences, --logit-sample)"
            )
        lines.append(
            f"estimates on whole-sequence samples: tags and vocabulary {pct(counts.fraction)} of decisions, {token_level}"
        )
    return lines


def anomaly_lines(trace: TraceInfo) -> list[str]:
    """Capture problems, said first: the numbers below them may miss or misplace some routing."""
    lines = [f"ERROR the recording stopped: {error}" for error in trace.errors or []]
    anomalies = trace.anomalies or {}
    if anomalies:
        total = sum(anomalies.values())
        listed = ", ".join(f"{key} x{count:,}" for key, count in sorted(anomalies.items()))
        lines.append(f"WARNING {total:,} capture anomalies ({listed}): some routing may be missing or approximate")
    return lines


def _ranks(ranks: list[int]) -> str:
    if not ranks:
        return "no rank yet"
    if len(ranks) == 1:
        return f"1 rank (rank {ranks[0]})"
    return f"{len(ranks)} ranks ({', '.join(map(str, ranks))})"


def describe_tags(spec: Specialization) -> str:
    """Which tag keys the specialization tables cover, and why others are not shown."""
    tags = spec.tags
    if not tags and not spec.tags_skipped:
        return "tags: none (label sequences with probe.tag(...) or record --tag KEY=VALUE to see specialization)"
    parts = [f"{t.key} ({len(t.values)} values)" for t in tags if len(t.values) > 1]
    parts += [f"{t.key} = {t.values[0]} only (nothing to compare)" for t in tags if len(t.values) == 1]
    parts += [f"{t.key} ({t.values:,} values: an id, not a category; not shown)" for t in spec.tags_skipped]
    return "tags: " + ", ".join(parts)


def describe_filters(filters: FiltersInfo) -> str:
    """``steps 2:5, phase decode, domain=code, layers 0,3`` from the report's ``filters``."""
    parts = []
    if filters.steps:
        start, stop = filters.steps
        parts.append(f"steps {'' if start is None else start}:{'' if stop is None else stop}")
    if filters.phase:
        parts.append(f"phase {filters.phase}")
    parts += [f"{key}={value}" for key, value in (filters.tags or {}).items()]
    for name, values in (("layers", filters.layers), ("ranks", filters.ranks)):
        if values is not None:
            parts.append(f"{name} {','.join(map(str, values))}")
    return ", ".join(parts) or "none"


def _top_n_ideal(report: Report) -> str:
    """The share the N busiest experts take under perfect balance, N / E, when every layer has the same N and E."""
    shapes = {(item.top_n, item.experts) for item in report.layers}
    if len(shapes) != 1:
        return "N/E"
    n, experts = shapes.pop()
    return pct(n / experts) if experts else "-"


def load_overall(report: Report) -> Table:
    overall = report.overall
    drops = bool(overall.dropped)
    table = Table(
        "Load imbalance across layers",
        ["metric", "mean", "p50", "p90", "worst", "worst layer", "random", "ideal"],
        note="random: the same tokens routed uniformly at random (k distinct experts each).",
    )
    labels = {
        "maxvio_global": ("MaxVio global", "0"),
        "maxvio_batch_mean": ("MaxVio batch (mean over steps)", "0"),
        "maxvio_batch_worst": ("MaxVio batch (worst step)", "0"),
        "cv": ("CV", "0"),
        "entropy_norm": ("entropy / ln E", "1"),
        "gini": ("Gini", "0"),
        "top_n_coverage": (f"top-N share (N = {_top_n(report)})", _top_n_ideal(report)),
        "dead_experts": ("dead experts", "0"),
    }
    for name, (label, ideal) in labels.items():
        m = overall.metrics[name]
        worst = m.min if name == "entropy_norm" else m.max
        fmt: Callable[[Any], str] = pct if name == "top_n_coverage" else (lambda v: num(v, 1)) if name == "dead_experts" else num
        values = [fmt(m.mean), fmt(m.p50), fmt(m.p90), fmt(worst)]
        if drops and name in ("maxvio_global", "cv"):
            label += " (routed)"
        table.rows.append([label, *values, num(m.worst_layer), fmt(m.random), ideal])
        if drops and name in ("maxvio_global", "cv"):
            processed = [getattr(item.processed, name) for item in report.layers]
            table.rows.append([label.replace("(routed)", "(processed)"), num(getattr(overall.processed, name)),
                               "", "", num(max((v for v in processed if v is not None), default=None)), "", "", ideal])
    bal = overall.balancedness
    table.rows.append(
        [
            f"balancedness EP{bal.ep_size} SGLang / vLLM",
            f"{num(bal.sglang)} / {num(bal.vllm)}",
            "",
            "",
            "",
            "",
            num(bal.random),
            "1",
        ]
    )
    table.rows.append(
        ["  per step SGLang / vLLM", f"{num(bal.sglang_batch)} / {num(bal.vllm_batch)}", "", "", "", "", "", "1"]
    )
    aux = overall.aux_loss
    if aux:
        table.rows.append(
            ["aux loss Switch / DeepSeek seq", f"{num(aux.switch)} / {num(aux.deepseek_seq)}", "", "", "", "", "", "1"]
        )
    return table


def _top_n(report: Report) -> str:
    values = sorted({item.top_n for item in report.layers})
    return ",".join(map(str, values)) or "k"


def dropped(report: Report, limit: int) -> Table | None:
    """Per layer, choices dropped over capacity and the load with and without them."""
    layers = [item for item in report.layers if item.dropped]
    if not layers:
        return None
    layers.sort(key=lambda item: -item.dropped_share)
    shown, more = _limited(layers, limit)
    table = Table(
        "Dropped choices (over capacity), most first: load routed -> processed",
        ["layer", "dropped", "share", "MaxVio global", "CV"],
        note="routed: every choice the router made; processed: dropped choices excluded. " + more,
    )
    for item in shown:
        p = item.processed
        table.rows.append(
            [
                str(item.layer),
                f"{item.dropped:,}",
                pct(item.dropped_share),
                f"{num(item.maxvio_global)} -> {num(p.maxvio_global)}",
                f"{num(item.cv)} -> {num(p.cv)}",
            ]
        )
    return table


def load_layers(report: Report, limit: int) -> Table:
    layers = sorted(report.layers, key=lambda item: -(item.maxvio_batch_mean or 0.0))
    shown, more = _limited(layers, limit)
    table = Table(
        "Layers, worst first (by mean MaxVio_batch); random-routing value in brackets",
        ["layer", "E/k", "MaxVio batch", "worst step", "MaxVio global", "CV", "entropy", "Gini", "top-N share", "dead",
         "EP balancedness"],
        note=more,
    )
    for item in shown:
        r = item.random
        table.rows.append(
            [
                str(item.layer),
                f"{item.experts}/{item.top_k}",
                with_random(item.maxvio_batch_mean, r.maxvio_batch_mean),
                f"{num(item.maxvio_batch_worst)} @{item.maxvio_batch_worst_step}",
                with_random(item.maxvio_global, r.maxvio_global),
                with_random(item.cv, r.cv),
                with_random(item.entropy_norm, r.entropy_norm),
                with_random(item.gini, r.gini),
                f"{pct(item.top_n_coverage)} ({pct(r.top_n_coverage)})",
                str(item.dead_experts),
                with_random(item.ep.balancedness, item.ep.random),
            ]
        )
    return table


def windows(report: Report) -> Table | None:
    rows = report.overall.windows
    if len(rows) < 2:
        return None
    table = Table(
        f"Over time: windows of {report.overall.window_steps} steps, mean over layers; random-routing value in "
        "brackets",
        ["steps", "MaxVio global", "MaxVio batch", "CV"],
    )
    for w in rows:
        r = w.random
        table.rows.append(
            [
                f"{w.first_step}..{w.last_step}",
                with_random(w.maxvio_global, r.maxvio_global),
                num(w.maxvio_batch_mean),
                with_random(w.cv, r.cv),
            ]
        )
    return table


def tags(report: Report, limit: int) -> list[Table]:
    out = []
    for tag in report.specialization.tags:
        if len(tag.values) < 2:
            continue  # one value: nothing to tell apart (the header says so)
        layers = sorted(tag.layers, key=lambda item: -(item.nmi or 0.0))
        shown, more = _limited(layers, limit)
        table = Table(
            f"Expert vs {tag.key} ({len(tag.values)} values): NMI over all assignments (every top-k choice), "
            "most specialised first",
            ["layer", "NMI", "MI nats", "bias nats", "top expert per value: share (uniform 1/E)"],
            note="NMI = (I(expert; tag) - (E-1)(D-1)/2N) / H(tag): 0 independent, 1 the expert determines the tag. "
            + more,
        )
        for item in shown:
            tops = []
            for value, experts in item.top_experts.items():
                if experts:
                    tops.append(f"{value}: e{experts[0].expert} {pct(experts[0].share)}")
            table.rows.append(
                [str(item.layer), num(item.nmi), num(item.mi_nats, 4), num(item.bias_nats, 4), ", ".join(tops)]
            )
        out.append(table)
    return out


def specialization(report: Report, limit: int) -> list[Table]:
    spec = report.specialization
    out = tags(report, limit)
    vocab = {v.layer: v for v in spec.vocabulary.layers}
    rep = {r.layer: r for r in spec.repetition.layers}
    coact = {c.layer: c for c in spec.coactivation.layers}
    layers = sorted(set(vocab) | set(rep) | set(coact))
    shown, more = _limited(layers, limit)
    table = Table(
        "Token-level specialization; random-routing value in brackets",
        ["layer", f"vocabulary (ids >= {spec.vocabulary.min_count})", "repeat first choice", "repeat any expert",
         "strongest co-activation P(j|i)"],
        note="vocabulary: mean share of a token id's most common first choice (OLMoE); repetition: consecutive tokens "
        "(Mixtral §5). " + more,
    )
    for layer in shown:
        v, r, c = vocab.get(layer), rep.get(layer), coact.get(layer)
        pair = "-"
        if c and c.top_pairs:
            top = c.top_pairs[0]
            pair = f"e{top.i}->e{top.j} {pct(top.p)} ({pct(c.random)})"
        table.rows.append(
            [
                str(layer),
                f"{pct(v.value)} ({pct(v.random)}) n={v.token_ids:,}" if v else "-",
                f"{pct(r.first)} ({pct(r.random_first)})" if r else "-",
                f"{pct(r.any)} ({pct(r.random_any)})" if r else "-",
                pair,
            ]
        )
    out.append(table)
    router = spec.router
    if router and router.layers:
        rows, more = _limited(sorted(router.layers, key=lambda item: item.layer), limit)
        aux = {item.layer: item.aux_loss for item in report.layers}
        table = Table(
            "Router (from captured logits)",
            ["layer", "scoring", "entropy / ln E", "top-k margin", "Switch aux", "DeepSeek seq aux", "z-loss",
             "biased != unbiased"],
            note="aux losses without their alpha: 1.0 is perfectly balanced. " + more,
        )
        for item in rows:
            a = aux.get(item.layer)
            table.rows.append(
                [
                    str(item.layer),
                    item.scoring,
                    num(item.entropy_norm),
                    num(item.margin, 4),
                    num(a.switch if a else None),
                    num(a.deepseek_seq if a else None),
                    num(a.z_loss if a else None, 2),
                    pct(item.bias_flip) if item.bias_flip is not None else "-",
                ]
            )
        out.append(table)
    return out


def latency(report: Report, limit: int) -> list[Table]:
    lat = report.latency
    if not lat:
        return []
    per_step = lat.moe_ms_per_step
    layers = sorted(lat.layers, key=lambda item: -(item.block_ms.p50 or 0.0))
    shown, more = _limited(layers, limit)
    table = Table(
        f"Latency in ms ({', '.join(lat.clocks) or 'unknown clock'}), slowest block first",
        ["layer", "router p50/p90/p99/max", "block p50/p90/p99/max", "block p50 prefill", "block p50 decode",
         "r prefill / decode"],
        note=f"MoE time per step p50 {num(per_step.p50)} ms, p99 {num(per_step.p99)} ms over {per_step.n:,} "
        "steps. r: how block time follows the step's busiest expert, within each phase (over all steps the few large "
        "prefill steps decide it). " + more,
    )

    def q(d: Quantiles) -> str:
        return "/".join(num(v) for v in (d.p50, d.p90, d.p99, d.max))

    for item in shown:
        phases = item.by_phase
        prefill, decode = phases.get("prefill"), phases.get("decode")
        table.rows.append(
            [
                str(item.layer),
                q(item.router_ms),
                q(item.block_ms),
                num(prefill.block_ms.p50 if prefill else None),
                num(decode.block_ms.p50 if decode else None),
                " / ".join(num(phase.block_vs_max_load.r if phase else None) for phase in (prefill, decode)),
            ]
        )
    return [table]


def report_tables(report: Report, *, limit: int = 16) -> list[Table]:
    if not report.layers:
        return []
    tables = [load_overall(report), load_layers(report, limit)]
    d = dropped(report, limit)
    if d is not None:
        tables.append(d)
    w = windows(report)
    if w is not None:
        tables.append(w)
    if report.specialization.needs_tokens:
        return tables + latency(report, limit)  # the header says what needs per-token rows
    return tables + specialization(report, limit) + latency(report, limit)


# -- two reports ----------------------------------------------------------------------------------------
def compare_tables(comparison: Comparison, *, limit: int = 16) -> list[Table]:
    overall = Table("Overall: a vs b (delta = b - a)", ["metric", "a", "b", "delta"])
    for label, pair in comparison.diff.overall.items():
        if pair.a is None and pair.b is None:
            continue
        overall.rows.append([label, num(pair.a), num(pair.b), _signed(pair.delta)])
    layers = sorted(
        comparison.diff.layers,
        key=lambda item: -max(item.values["maxvio_batch_mean"].a or 0.0, item.values["maxvio_batch_mean"].b or 0.0),
    )
    shown, more = _limited(layers, limit)
    per_layer = Table(
        "Layers, worst first: a -> b (delta)",
        ["layer", "MaxVio batch", "MaxVio global", "CV", "entropy", "EP balancedness"],
        note=more,
    )
    for item in shown:
        per_layer.rows.append(
            [str(item.layer)]
            + [
                f"{num(item.values[m].a)} -> {num(item.values[m].b)} ({_signed(item.values[m].delta)})"
                for m in ("maxvio_batch_mean", "maxvio_global", "cv", "entropy_norm", "balancedness")
            ]
        )
    return [overall, per_layer]


def _signed(value: Any) -> str:
    return "-" if value is None else f"{value:+.3f}"
