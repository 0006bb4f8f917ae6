"""Specialization: tag x expert distribution per layer, NMI per layer, repetition beside random baselines."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...analysis.repetition import RepetitionLayer
from ...analysis.session import Trace

# Smaller budgets than the report's: this runs again whenever a live trace grows, and must stay interactive.
COUNT_BUDGET = 4_000_000
SAMPLE_BUDGET = 400_000
PREFERRED_KEYS = ("domain", "task", "language", "dataset")


@dataclass(frozen=True)
class TagView:
    key: str
    values: tuple[str, ...]
    relative: dict[int, np.ndarray]  # layer -> values x experts, c_e / c_bar within each value (DeepSeek-V3)
    nmi: dict[int, float]


@dataclass(frozen=True)
class SpecializationData:
    tags: tuple[TagView, ...]  # every categorical tag key, the preferred one (domain, task, ...) first
    skipped: tuple[str, ...]  # keys with too many values to be categories
    repetition: tuple[RepetitionLayer, ...]
    sampled: float  # share of decisions the repetition pairs came from
    counts_only: bool = False  # a counts trace: no per-token rows, so nothing here can be computed

    @property
    def tag(self) -> TagView | None:
        return self.tags[0] if self.tags else None

    def keys(self) -> tuple[str, ...]:
        return tuple(t.key for t in self.tags)


def specialization(trace: Trace) -> SpecializationData:
    if trace.mode == "counts":
        return SpecializationData((), (), (), 1.0, counts_only=True)
    return _specialization(trace)


def _specialization(trace: Trace) -> SpecializationData:
    spec = trace.specialization(count_budget=COUNT_BUDGET, sample_budget=SAMPLE_BUDGET)
    keys = [t.key for t in spec.tags]
    preferred = [k for k in PREFERRED_KEYS if k in keys]
    order = preferred + [k for k in keys if k not in preferred]
    views = []
    for key in order:
        item = next(t for t in spec.tags if t.key == key)
        views.append(
            TagView(
                key=item.key,
                values=tuple(item.values),
                relative={layer.layer: layer.relative_load for layer in item.layers},
                nmi={layer.layer: layer.mi.nmi for layer in item.layers},
            )
        )
    return SpecializationData(
        tags=tuple(views),
        skipped=tuple(t.key for t in spec.tags_skipped),
        repetition=tuple(spec.repetition),
        sampled=spec.sample.fraction,
    )
