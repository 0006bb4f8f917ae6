"""The report as typed records: what every output renders from (``moeprobe.cli.render``: JSON, text, Markdown, HTML).

``report_json.build`` assembles the report and rounds every float once (``clean``); ``Report.from_json`` gives it
these types, and ``Report.to_json()`` is the ``--json`` object of docs/report-json.md, key for key (tests compare
the round trip on real traces). Field order is the JSON's key order. A new metric is a field here, its value in
``report_json``, and a cell in the renderers that show it.

Numbers that cannot be computed are None (``null``). ``Num`` is a JSON number: an int or a float rounded to 6
decimals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self

from .json_record import JsonRecord, omitted_when_none

Num = float | int


# -- trace, filters, options ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TraceInfo(JsonRecord):
    path: str
    status: str
    model: dict[str, Any]
    world_size: Any
    ranks: list[int]
    mode: str
    source: dict[str, Any] | None
    segments: dict[str, int]
    anomalies: dict[str, int]
    errors: list[str]


@dataclass(frozen=True)
class FiltersInfo(JsonRecord):
    steps: list[int | None] | None
    phase: str | None
    tags: dict[str, str]
    layers: list[int] | None
    ranks: list[int] | None


@dataclass(frozen=True)
class OptionsInfo(JsonRecord):
    ep_size: int
    placement: str
    window_steps: int | None
    top_n: int | None
    min_count: int
    count_budget: int
    sample_budget: int
    logit_budget: int


# -- load -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MaxVioCV(JsonRecord):
    """MaxVio_global and CV together: a window's random-routing values, the overall processed load."""

    maxvio_global: Num | None
    cv: Num | None


@dataclass(frozen=True)
class Window(JsonRecord):
    first_step: int
    last_step: int
    maxvio_global: Num | None
    maxvio_batch_mean: Num | None
    cv: Num | None
    random: MaxVioCV


@dataclass(frozen=True)
class ProcessedLoad(JsonRecord):
    maxvio_global: Num | None
    cv: Num | None
    counts: list[int]


@dataclass(frozen=True)
class RandomLoad(JsonRecord):
    maxvio_global: Num | None
    maxvio_batch_mean: Num | None
    cv: Num | None
    entropy_norm: Num | None
    gini: Num | None
    top_n_coverage: Num | None
    dead_experts: Num | None


@dataclass(frozen=True)
class EPLayer(JsonRecord):
    loads: list[Num]
    balancedness: Num | None
    balancedness_batch: Num | None
    random: Num | None


@dataclass(frozen=True)
class AuxLoss(JsonRecord):
    """Balance losses without their alpha (1.0 is balanced) and the router z-loss, from captured logits."""

    switch: Num | None
    deepseek_seq: Num | None
    z_loss: Num | None


@dataclass(frozen=True)
class LayerReport(JsonRecord):
    layer: int
    name: str
    experts: int
    top_k: int
    scoring: str | None
    decisions: int
    tokens: int
    steps: int
    dropped: int
    dropped_share: Num
    maxvio_global: Num | None
    maxvio_batch_mean: Num | None
    maxvio_batch_worst: Num | None
    maxvio_batch_worst_step: int | None
    cv: Num | None
    entropy_norm: Num | None
    gini: Num | None
    top_n: int
    top_n_coverage: Num | None
    dead_experts: int
    dead_expert_ids: list[int]
    counts: list[int]
    utilisation: list[Num | None]
    processed: ProcessedLoad
    random: RandomLoad
    ep: EPLayer
    aux_loss: AuxLoss | None
    windows: list[Window]
    first_choice_counts: list[int] | None = omitted_when_none()  # --full only
    invalid_decisions: int = 0


@dataclass(frozen=True)
class Spread(JsonRecord):
    """One load metric across layers (``stats.spread``) and the layers' mean random-routing value."""

    mean: Num | None
    p50: Num | None
    p90: Num | None
    min: Num | None
    max: Num | None
    worst_layer: int | None
    random: Num | None


@dataclass(frozen=True)
class Balancedness(JsonRecord):
    ep_size: int
    placement: str
    sglang: Num | None
    vllm: Num | None
    sglang_batch: Num | None
    vllm_batch: Num | None
    random: Num | None


@dataclass(frozen=True)
class Overall(JsonRecord):
    layers: int
    decisions: int
    dropped: int
    dropped_share: Num
    processed: MaxVioCV  # means over layers, dropped choices excluded
    tokens: int
    steps: int
    first_step: int | None
    last_step: int | None
    window_steps: int | None
    metrics: dict[str, Spread]  # keyed by report_json.LOAD_METRICS, in that order
    balancedness: Balancedness
    windows: list[Window]
    aux_loss: AuxLoss | None
    invalid_decisions: int = 0


# -- specialization -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleInfo(JsonRecord):
    fraction: Num
    decisions: int
    sequences: int
    budget: int


@dataclass(frozen=True)
class TopExpert(JsonRecord):
    expert: int
    share: Num | None
    olmoe: Num | None
    relative_load: Num | None


@dataclass(frozen=True)
class TagLayer(JsonRecord):
    layer: int
    assignments: int
    nmi: Num | None
    mi_nats: Num | None
    bias_nats: Num | None
    h_tag_nats: Num | None
    top_experts: dict[str, list[TopExpert]]
    counts: list[list[int]] | None = omitted_when_none()  # --full only


@dataclass(frozen=True)
class TagReport(JsonRecord):
    key: str
    values: list[str]
    layers: list[TagLayer]


@dataclass(frozen=True)
class SkippedTag(JsonRecord):
    key: str
    values: int  # how many: an id, not a category


@dataclass(frozen=True)
class VocabularyLayer(JsonRecord):
    layer: int
    value: Num | None
    random: Num | None
    token_ids: int
    token_ids_below_min_count: int


@dataclass(frozen=True)
class Vocabulary(JsonRecord):
    min_count: int
    layers: list[VocabularyLayer]


@dataclass(frozen=True)
class RepetitionLayer(JsonRecord):
    layer: int
    pairs: int
    first: Num | None
    any: Num | None
    random_first: Num | None
    random_any: Num | None


@dataclass(frozen=True)
class Repetition(JsonRecord):
    layers: list[RepetitionLayer]


@dataclass(frozen=True)
class CoactivationPair(JsonRecord):
    """P(j chosen | i chosen) = N(i and j) / N(i) (OLMoE)."""

    i: int
    j: int
    p: Num


@dataclass(frozen=True)
class CoactivationLayer(JsonRecord):
    layer: int
    random: Num | None
    top_pairs: list[CoactivationPair]
    matrix: list[list[Num | None]] | None = omitted_when_none()  # --full only


@dataclass(frozen=True)
class Coactivation(JsonRecord):
    layers: list[CoactivationLayer]


@dataclass(frozen=True)
class RouterLayer(JsonRecord):
    layer: int
    scoring: str
    tokens: int
    entropy_norm: Num | None
    margin: Num | None
    bias_flip: Num | None
    bias_tokens: int


@dataclass(frozen=True)
class Router(JsonRecord):
    layers: list[RouterLayer]
    sample: SampleInfo  # the sequences the router statistics read (see sampling.DEFAULT_LOGIT_BUDGET)
    logit_budget: int


@dataclass(frozen=True)
class Specialization(JsonRecord):
    counts_sample: SampleInfo
    sample: SampleInfo
    tags: list[TagReport]
    tags_skipped: list[SkippedTag]
    vocabulary: Vocabulary
    repetition: Repetition
    coactivation: Coactivation
    router: Router | None
    needs_tokens: list[str] | None = omitted_when_none()  # counts traces only: what they cannot show


# -- latency --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Quantiles(JsonRecord):
    n: int
    p50: Num | None
    p90: Num | None
    p99: Num | None
    max: Num | None


@dataclass(frozen=True)
class Fit(JsonRecord):
    r: Num | None
    slope_ms: Num | None
    n: int


@dataclass(frozen=True)
class PhaseLatency(JsonRecord):
    router_ms: Quantiles
    block_ms: Quantiles
    block_vs_max_load: Fit


@dataclass(frozen=True)
class LatencyLayer(JsonRecord):
    layer: int
    router_ms: Quantiles
    block_ms: Quantiles
    by_phase: dict[str, PhaseLatency]
    block_vs_max_load: Fit


@dataclass(frozen=True)
class Latency(JsonRecord):
    clocks: list[str]
    steps: int
    moe_ms_per_step: Quantiles
    router_ms_per_step_p50: Num | None
    layers: list[LatencyLayer]


# -- the report, and two side by side -------------------------------------------------------------------------
@dataclass(frozen=True)
class Report(JsonRecord):
    format_version: int
    generator: str
    trace: TraceInfo
    filters: FiltersInfo
    options: OptionsInfo
    overall: Overall
    layers: list[LayerReport]
    specialization: Specialization
    latency: Latency | None


@dataclass(frozen=True)
class Delta(JsonRecord):
    """One number in two reports and b - a (None unless both are numbers)."""

    a: Num | None
    b: Num | None
    delta: Num | None


@dataclass(frozen=True)
class LayerDelta:
    """One layer's compared numbers, keyed by report_json.COMPARED_LAYER labels (flat in the JSON)."""

    layer: int
    values: dict[str, Delta]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Self:
        return cls(int(data["layer"]), {k: Delta.from_json(v) for k, v in data.items() if k != "layer"})

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, **{k: v.to_json() for k, v in self.values.items()}}


@dataclass(frozen=True)
class ComparedPaths(JsonRecord):
    a: str
    b: str


@dataclass(frozen=True)
class Diff(JsonRecord):
    overall: dict[str, Delta]  # keyed by report_json.COMPARED_OVERALL labels
    layers: list[LayerDelta]

    @classmethod
    def from_json(cls, data: Any) -> Self:
        return cls({k: Delta.from_json(v) for k, v in data["overall"].items()},
                   [LayerDelta.from_json(item) for item in data["layers"]])

    def to_json(self) -> dict[str, Any]:
        return {"overall": {k: v.to_json() for k, v in self.overall.items()},
                "layers": [item.to_json() for item in self.layers]}


@dataclass(frozen=True)
class Comparison(JsonRecord):
    format_version: int
    generator: str
    compare: ComparedPaths
    diff: Diff
    a: Report
    b: Report
