"""The two numbers the demo compares, computed with SQL over a recorded trace, with the same definitions as the
report (``moeprobe.analysis.stats``; docs/metrics.md):

- MaxVio_global per MoE layer: ``stats.maxvio`` of the assignments of each expert over the prompt tokens.
- NMI(first-choice expert; domain) per MoE layer: ``stats.mutual_information`` of the first-choice expert
  against the sequence's ``domain`` tag. The report's "Expert vs domain" NMI is the same function over every
  top-k assignment of prefill and decode; first choices carry more of the signal, so the demo's value is higher.

Only prefill rows are counted: they are the held-out prompt tokens themselves, identical for every model,
so trained and untrained weights are compared on exactly the same tokens (decoded tokens differ by model).
The first choice is the chosen expert with the largest gate weight. The capture stores each token's choices in
that order (k = 0 first, also for DeepSeek-V3, whose router returns its top-k unsorted), so this is the report's
first choice; the SQL picks it by weight so that it does not depend on the row order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..analysis import stats
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
    return {layer: stats.maxvio(c) for layer, c in loads.items()}


def normalised_mi(counts: np.ndarray) -> float:
    """The report's bias-corrected NMI (``stats.mutual_information``) of an (experts x domains) count table."""
    return stats.mutual_information(np.asarray(counts).T).nmi


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
