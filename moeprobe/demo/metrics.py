"""The two numbers the demo compares, computed with SQL over a recorded trace (definitions: METRICS.md).

- MaxVio_global per MoE layer: (max_e c_e - c̄) / c̄ with c_e the assignments of expert e over the trace
  and c̄ = assignments / E.
- Normalised mutual information between first-choice expert and the sequence's ``domain`` tag, per MoE
  layer: I(expert; domain) minus the small-sample bias (E-1)(D-1)/(2N), divided by H(domain).

Only prefill rows are counted: they are the held-out prompt tokens themselves, identical for every model,
so trained and random weights are compared on exactly the same tokens (decoded tokens differ by model).
The DeepSeek-V3 router returns its top-k unsorted, so the first choice is the chosen expert with the
largest gate weight, not the row with k = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..analysis.session import Trace

_LOADS_SQL = """
select layer, expert, count(*) as n
from routing where phase = 'prefill' and not dropped
group by all order by all
"""

_FIRST_CHOICE_SQL = """
with first as (
    select layer, step, sequence, position, rank, arg_max(expert, weight) as expert
    from routing where phase = 'prefill'
    group by all
)
select f.layer, f.expert, t.value as domain, count(*) as n
from first f join tags t on t.sequence = f.sequence and t.rank = f.rank and t.key = 'domain'
group by all order by all
"""


@dataclass(frozen=True)
class LayerMetrics:
    layer: int
    max_vio: float
    nmi: float
    tokens: int


def _num_experts(trace: Trace) -> dict[int, int]:
    return {int(entry["index"]): int(entry["num_experts"]) for entry in trace.layers}


def max_vio_global(trace: Trace) -> dict[int, float]:
    experts = _num_experts(trace)
    rows = trace.sql(_LOADS_SQL).to_pydict()
    loads = {layer: np.zeros(n) for layer, n in experts.items()}
    for layer, expert, n in zip(rows["layer"], rows["expert"], rows["n"], strict=True):
        loads[int(layer)][int(expert)] = n
    out: dict[int, float] = {}
    for layer, c in loads.items():
        mean = c.sum() / len(c)
        out[layer] = float((c.max() - mean) / mean) if mean > 0 else float("nan")
    return out


def normalised_mi(counts: np.ndarray) -> float:
    """Bias-corrected I(row; column) / H(column) from a contingency table of counts (rows: experts).

    The bias term uses the table's full shape (all E experts, all D domains), as METRICS.md states it.
    """
    n = counts.sum()
    if n == 0:
        return float("nan")
    p = counts / n
    pe = p.sum(axis=1, keepdims=True)
    pd = p.sum(axis=0, keepdims=True)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / (pe @ pd)[nz])).sum())
    h_domain = float(-(pd[pd > 0] * np.log(pd[pd > 0])).sum())
    e, d = counts.shape
    corrected = mi - (e - 1) * (d - 1) / (2 * n)
    return corrected / h_domain if h_domain > 0 else float("nan")


def expert_domain_counts(trace: Trace) -> tuple[dict[int, np.ndarray], list[str]]:
    """Per MoE layer, first-choice counts as an (experts x domains) array, and the domain order."""
    experts = _num_experts(trace)
    rows = trace.sql(_FIRST_CHOICE_SQL).to_pydict()
    domains = sorted(set(rows["domain"]))
    col = {d: i for i, d in enumerate(domains)}
    tables = {layer: np.zeros((n, len(domains))) for layer, n in experts.items()}
    for layer, expert, domain, n in zip(rows["layer"], rows["expert"], rows["domain"], rows["n"], strict=True):
        tables[int(layer)][int(expert), col[domain]] = n
    return tables, domains


def layer_metrics(trace: Trace) -> list[LayerMetrics]:
    vio = max_vio_global(trace)
    tables, _ = expert_domain_counts(trace)
    return [
        LayerMetrics(layer, vio[layer], normalised_mi(tables[layer]), int(tables[layer].sum()))
        for layer in sorted(vio)
    ]


def mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")
