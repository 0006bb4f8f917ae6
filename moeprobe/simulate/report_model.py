"""``moeprobe simulate``'s result as typed records: what its JSON, text and HTML outputs render from
(``moeprobe.cli.render``).

``to_json()`` is the ``--json`` document of docs/simulate-json.md before ``clean`` (NaN to null, floats to 6
decimals), key for key; the field order is its key order. Values are the ones the simulator computed (the text
table formats them itself, as it always has).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..analysis.json_record import JsonRecord, omitted_when_none

PerExpert = list[int]  # one count per expert
PerPosition = list[int]  # one count per token position in the sequence

# Of the --json document (docs/simulate-json.md): changes only when a field is removed or changes meaning.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class EPInfo(JsonRecord):
    gpus: int
    placement: str
    layers_not_divisible: list[int]


@dataclass(frozen=True)
class _Balance(JsonRecord):
    """The columns of the simulator's table (compare.SUMMARY_KEYS), for a layer or summed up over layers."""

    max_vio: float
    max_vio_batch: float
    balancedness: float
    ep_balancedness: float | None
    cv: float
    dropped_share: float
    changed_share: float
    mass_lost: float


@dataclass(frozen=True)
class _LayerKey(JsonRecord):
    """Which layer, and how many tokens it routed."""

    layer: int
    tokens: int


@dataclass(frozen=True)
class StrategySummary(_Balance):
    """Means over layers (shares weighted by tokens)."""


@dataclass(frozen=True)
class StrategyLayer(_Balance, _LayerKey):
    """One layer: its key fields first, then the balance columns, then the expert loads (dataclass fields come in
    reverse base order: _LayerKey, _Balance, then these)."""

    load: PerExpert


@dataclass(frozen=True)
class DropLayer(JsonRecord):
    """Choices dropped over capacity in one layer, of those routed."""

    layer: int
    dropped: int
    routed: int


@dataclass(frozen=True)
class DropExperts(JsonRecord):
    layer: int
    dropped: PerExpert
    routed: PerExpert


@dataclass(frozen=True)
class DropPositions(JsonRecord):
    """Routed and dropped choices by the token's position in its sequence."""

    routed: PerPosition
    dropped: PerPosition


@dataclass(frozen=True)
class Drops(JsonRecord):
    by_layer: list[DropLayer]
    by_expert: list[DropExperts]
    by_position: DropPositions


@dataclass(frozen=True)
class StrategyRow(JsonRecord):
    strategy: str
    summary: StrategySummary
    layers: list[StrategyLayer]
    notes: list[str]
    drops: Drops | None = omitted_when_none()  # only for strategies that drop


@dataclass(frozen=True)
class Replicated(JsonRecord):
    layer: int
    expert: int
    replicas: int
    gpus: list[int]


@dataclass(frozen=True)
class Traffic(JsonRecord):
    matrix: list[list[float]]
    max: float
    mean: float
    max_over_mean: float
    local_share: float


@dataclass(frozen=True)
class PlacementResult(JsonRecord):
    gpu_load: list[list[float]]
    balancedness: list[float]
    balancedness_mean: float
    balancedness_total: float
    traffic: Traffic


@dataclass(frozen=True)
class EplbResult(JsonRecord):
    policy: str
    replicas: int
    groups: int
    nodes: int
    gpus: int
    estimate: str
    origin: str
    plan_steps: list[int]
    eval_steps: list[int]
    layers: list[int]
    phy2log: list[list[int]]
    log2phy: list[list[list[int]]]
    logcnt: list[list[int]]
    replicated: list[Replicated]
    notes: list[str]
    eplb: PlacementResult
    contiguous: PlacementResult | None = omitted_when_none()  # when the experts divide over the GPUs


@dataclass(frozen=True, kw_only=True)  # keyword-only: the optional mode sits between required fields
class SimulateReport(JsonRecord):
    format_version: int
    generator: str
    trace: str
    mode: str | None = omitted_when_none()  # "counts" only; a tokens trace's document has no mode key
    steps: list[int | None]  # [A, B), either end None, like the report's filters.steps
    layers: list[int]
    tokens: dict[str, int]
    ep: EPInfo
    strategies: list[StrategyRow]
    notes: list[str]
    eplb: EplbResult | None = omitted_when_none()
    written: str | None = omitted_when_none()  # -o: the simulated trace
    exported: str | None = omitted_when_none()  # --export: the placement file

    @property
    def gpus_for_pictures(self) -> int | None:
        """The GPU count the per-GPU load pictures use (contiguous placement), or None to draw per expert."""
        if self.eplb is not None and self.ep.gpus and not self.ep.layers_not_divisible:
            return int(self.ep.gpus)
        return None
