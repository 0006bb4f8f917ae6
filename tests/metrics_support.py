"""Helpers for the metrics tests: read an exposition into plain values, answer for a trace with numpy."""

from __future__ import annotations

import math
import urllib.request
from typing import Any

import numpy as np
import pyarrow as pa
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def scrape(url: str, timeout: float = 10.0) -> Samples:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return parse(response.read().decode())


def value(samples: Samples, name: str, **labels: Any) -> float:
    return samples[(name, frozenset((k, str(v)) for k, v in labels.items()))]


def values_of(samples: Samples, name: str) -> list[tuple[dict[str, str], float]]:
    return [(dict(labels), v) for (n, labels), v in samples.items() if n == name]


def expected_counts(routing: pa.Table, layer: int, experts: int, min_step: int | None = None) -> np.ndarray:
    """Decisions per expert of one layer, straight from the routing rows (optionally steps >= min_step)."""
    step = routing.column("step").to_numpy()
    keep = routing.column("layer").to_numpy() == layer
    if min_step is not None:
        keep &= step >= min_step
    counts = np.zeros(experts, np.int64)
    np.add.at(counts, routing.column("expert").to_numpy()[keep].astype(np.int64), 1)
    return counts


def maxvio(counts: np.ndarray) -> float:
    """(max - mean) / mean over every expert, zeros included: Wang et al. 2024, eq. 4, written out again."""
    mean = counts.sum() / len(counts)
    return math.nan if mean == 0 else (counts.max() - mean) / mean


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
