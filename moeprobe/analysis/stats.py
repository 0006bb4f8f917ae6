"""Metric formulas on small aggregated arrays (one layer's expert counts, a count table) and the random-routing
baselines printed beside them. Definitions follow ``docs/metrics.md``; each function says which one.

Random baselines are Monte Carlo estimates with a seed derived from their inputs, so the same trace gives the
same report every time, and "random routing" always means: each token picks k distinct experts uniformly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# Draws above this many (tokens x k) per replicate switch from exact simulation to a moment-matched multinomial:
# the count vector is then close to Gaussian and simulating every token would only cost time.
_EXACT_DRAWS = 20_000
_REPLICATES = 64
_SEED = 0x6D6F65  # "moe"


# -- load imbalance -----------------------------------------------------------------------------------
def maxvio_rows(load: np.ndarray, empty: float = math.nan) -> np.ndarray:
    """MaxVio (Wang et al. 2024, eq. 4) over the last axis: (max_e c_e - c_bar) / c_bar, c_bar = sum(c) / E.
    ``empty`` where a row has no load. The one definition both the report and the simulator use."""
    load = np.asarray(load, dtype=np.float64)
    mean = load.mean(axis=-1)
    return np.asarray(np.divide(load.max(axis=-1) - mean, mean, out=np.full_like(mean, empty), where=mean > 0))


def cv_rows(load: np.ndarray, empty: float = math.nan) -> np.ndarray:
    """Coefficient of variation std(c) / mean(c) over the last axis, population std (Shazeer et al. 2017
    use its square); ``empty`` where a row has no load."""
    load = np.asarray(load, dtype=np.float64)
    mean = load.mean(axis=-1)
    return np.asarray(np.divide(load.std(axis=-1), mean, out=np.full_like(mean, empty), where=mean > 0))


def balancedness_rows(load: np.ndarray, empty: float = math.nan) -> np.ndarray:
    """Serving systems' balancedness, mean / max over the last axis (EP ranks, GPUs or experts); 1 is even."""
    load = np.asarray(load, dtype=np.float64)
    peak = load.max(axis=-1)
    return np.asarray(np.divide(load.mean(axis=-1), peak, out=np.full_like(peak, empty), where=peak > 0))


def maxvio(counts: np.ndarray) -> float:
    """MaxVio of one load vector; NaN when it has no load."""
    return float(maxvio_rows(counts))


def cv(counts: np.ndarray) -> float:
    """CV of one load vector; NaN when it has no load."""
    return float(cv_rows(counts))


def entropy_norm(counts: np.ndarray) -> float:
    """H(c / sum c) / ln E: 1 for uniform load, 0 when one expert takes everything."""
    total = float(counts.sum())
    if total <= 0 or len(counts) < 2:
        return math.nan
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum() / math.log(len(counts)))


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of the load: sum_i sum_j |c_i - c_j| / (2 E^2 mean); 0 uniform, (E-1)/E one expert."""
    total = float(counts.sum())
    n = len(counts)
    if total <= 0:
        return math.nan
    ordered = np.sort(counts.astype(np.float64))
    ranks = np.arange(1, n + 1)
    return float(2.0 * (ranks * ordered).sum() / (n * total) - (n + 1) / n)


def top_n_coverage(counts: np.ndarray, n: int) -> float:
    """Share of all assignments taken by the n busiest experts (uniform: n / E)."""
    total = float(counts.sum())
    if total <= 0:
        return math.nan
    n = max(0, min(n, len(counts)))
    return float(np.sort(counts)[::-1][:n].sum() / total)


def balancedness(loads: np.ndarray) -> float:
    """Balancedness of one load vector; NaN when it has no load."""
    return float(balancedness_rows(loads)) if len(loads) else math.nan


def ep_loads(counts: np.ndarray, placement: np.ndarray, ep_size: int) -> np.ndarray:
    """Per-EP-rank load: the sum of the counts of the experts each rank holds."""
    return np.bincount(placement, weights=counts.astype(np.float64), minlength=ep_size)


def contiguous_placement(experts: int, ep_size: int) -> np.ndarray:
    """Expert e lives on rank floor(e * W / E): contiguous, near-equal blocks (equal when W divides E)."""
    return (np.arange(experts) * ep_size) // experts


# -- random routing ---------------------------------------------------------------------------------------
def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([_SEED, *[int(k) for k in key]])


def _k_subsets(rng: np.random.Generator, rows: int, experts: int, k: int) -> np.ndarray:
    """``rows`` uniform k-subsets of range(experts), shape (rows, k)."""
    if 2 * k > experts:
        return np.argpartition(rng.random((rows, experts)), k - 1, axis=1)[:, :k]
    picks = rng.integers(0, experts, size=(rows, k))
    # Rejection: redraw the rows that repeat an expert. At k <= E/2 at least ~1/3 of rows pass each round.
    while True:
        ordered = np.sort(picks, axis=1)
        bad = np.flatnonzero((ordered[:, 1:] == ordered[:, :-1]).any(axis=1)) if k > 1 else np.empty(0, int)
        if bad.size == 0:
            return picks
        picks[bad] = rng.integers(0, experts, size=(bad.size, k))


def random_counts(experts: int, k: int, tokens: int, replicates: int = _REPLICATES) -> np.ndarray:
    """Expert load vectors (replicates x E) of ``tokens`` tokens under uniform random top-k routing.

    Small batches are simulated token by token. Large ones draw a multinomial of T k assignments and shrink
    its deviations by sqrt((E - k) / (E - 1)): that matches the exact mean and covariance of a sum of
    k-subsets (a k-subset never repeats an expert, so its variance is smaller than k independent picks).
    """
    k = min(k, experts)
    rng = _rng(experts, k, tokens, replicates)
    if tokens <= 0:
        return np.zeros((replicates, experts))
    if tokens * k <= _EXACT_DRAWS:
        picks = _k_subsets(rng, replicates * tokens, experts, k)
        offsets = np.repeat(np.arange(replicates) * experts, tokens)[:, None]
        flat = np.bincount((picks + offsets).ravel(), minlength=replicates * experts)
        return flat.reshape(replicates, experts).astype(np.float64)
    mean = tokens * k / experts
    raw = rng.multinomial(tokens * k, np.full(experts, 1.0 / experts), size=replicates).astype(np.float64)
    shrink = math.sqrt((experts - k) / (experts - 1)) if experts > 1 else 0.0
    return mean + (raw - mean) * shrink


@dataclass(frozen=True)
class LoadBaseline:
    """Expected value of each load metric under uniform random routing of the same number of tokens."""

    maxvio: float
    cv: float
    entropy_norm: float
    gini: float
    top_n_coverage: float
    dead_experts: float


def random_load_baseline(experts: int, k: int, tokens: int, top_n: int) -> LoadBaseline:
    reps = random_counts(experts, k, tokens)
    return LoadBaseline(
        # Row by row in one call: the same reduction of each replicate as maxvio(c), cv(c) (its last axis).
        maxvio=float(np.mean(maxvio_rows(reps))),
        cv=float(np.mean(cv_rows(reps))),
        entropy_norm=float(np.mean([entropy_norm(c) for c in reps])),
        gini=float(np.mean([gini(c) for c in reps])),
        top_n_coverage=float(np.mean([top_n_coverage(c, top_n) for c in reps])),
        dead_experts=float(np.mean((reps == 0).sum(axis=1))),
    )


def random_balancedness(experts: int, k: int, tokens: int, placement: np.ndarray, ep_size: int) -> float:
    """Expected balancedness over EP ranks when ``tokens`` tokens are routed at random."""
    reps = random_counts(experts, k, tokens)
    return float(np.mean([balancedness(ep_loads(c, placement, ep_size)) for c in reps]))


def _quantised(tokens: np.ndarray, weights: np.ndarray, bins: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """At most ``bins`` representative batch sizes (geometric bins) with their summed weights."""
    if len(tokens) <= bins:
        return tokens, weights
    edges = np.unique(np.geomspace(tokens.min(), tokens.max() + 1, bins + 1).astype(np.int64))
    which = np.clip(np.searchsorted(edges, tokens, side="right") - 1, 0, len(edges) - 2)
    reps, sums = [], []
    for b in np.unique(which):
        sel = which == b
        reps.append(int(round(np.average(tokens[sel], weights=weights[sel]))))
        sums.append(weights[sel].sum())
    return np.asarray(reps), np.asarray(sums, dtype=np.float64)


def random_maxvio_batch(experts: int, k: int, step_tokens: np.ndarray, step_counts: np.ndarray) -> float:
    """Mean per-step MaxVio of random routing over steps of the given sizes (``step_counts`` steps of each).

    docs/metrics.md's reference points (T = 4096): 0.040 for E=8, k=2; 0.099 for E=64, k=8; 0.25 for E=256, k=8.
    """
    tokens = np.asarray(step_tokens, dtype=np.int64)
    weights = np.asarray(step_counts, dtype=np.float64)
    keep = tokens > 0
    if not keep.any():
        return math.nan
    tokens, weights = _quantised(tokens[keep], weights[keep])
    values = [float(np.mean(maxvio_rows(random_counts(experts, k, int(t))))) for t in tokens]
    return float(np.average(values, weights=weights))


# -- specialization -------------------------------------------------------------------------------------
def repetition_baselines(experts: int, k: int) -> tuple[float, float]:
    """Random-routing chance that consecutive tokens share their first choice (1/E) and share any expert
    (1 - C(E-k, k) / C(E, k)); Mixtral §5: 12.5 % and 46.4 % for E=8, k=2."""
    k = min(k, experts)
    return 1.0 / experts, 1.0 - math.comb(experts - k, k) / math.comb(experts, k)


def coactivation_baseline(experts: int, k: int) -> float:
    """P(j chosen | i chosen) for j != i under random routing: (k - 1) / (E - 1)."""
    return (min(k, experts) - 1) / (experts - 1) if experts > 1 else math.nan


@dataclass(frozen=True)
class MutualInformation:
    mi_nats: float  # plug-in estimate from the count table
    bias_nats: float  # (E - 1)(D - 1) / (2N), subtracted
    h_tag_nats: float
    nmi: float  # (mi - bias) / H(tag), clipped to [0, 1]


def mutual_information(table: np.ndarray) -> MutualInformation:
    """I(expert; tag) from a D x E count table, with the Miller-Madow style bias correction of docs/metrics.md,
    normalised by H(tag). D and E count only the rows and columns that occur."""
    table = np.asarray(table, dtype=np.float64)
    n = table.sum()
    if n <= 0:
        return MutualInformation(math.nan, math.nan, math.nan, math.nan)
    p = table / n
    pd = p.sum(axis=1, keepdims=True)
    pe = p.sum(axis=0, keepdims=True)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / (pd @ pe)[nz])).sum())
    d = int((pd > 0).sum())
    e = int((pe > 0).sum())
    bias = (e - 1) * (d - 1) / (2.0 * n)
    pdv = pd[pd > 0]
    h = float(-(pdv * np.log(pdv)).sum())
    nmi = math.nan if h <= 0 else float(min(1.0, max(0.0, (mi - bias) / h)))
    return MutualInformation(mi, bias, h, nmi)


@lru_cache(maxsize=4096)
def expected_max_share(experts: int, n: int) -> float:
    """E[max multinomial(n, 1/E)] / n: the top expert's share of n occurrences routed uniformly at random.

    Exact for n <= 64 through P(max <= m) = n! / E^n [x^n] (sum_{j<=m} x^j / j!)^E; above that a seeded Monte
    Carlo estimate (the share is then close to 1/E and varies little between draws).
    """
    if n <= 0:
        return math.nan
    if n > 64:
        draws = _rng(experts, n, 1).multinomial(n, np.full(experts, 1.0 / experts), size=256).max(axis=1)
        return float(draws.mean() / n)
    scale = math.exp(math.lgamma(n + 1) - n * math.log(experts))
    inv_fact = np.array([1.0 / math.factorial(j) for j in range(n + 1)])
    expected = 0.0
    for m in range(1, n + 1):  # E[max] = sum_{m>=1} P(max >= m) = sum_m (1 - P(max <= m - 1))
        base = inv_fact.copy()
        base[m:] = 0.0
        power, e = base, experts
        result: np.ndarray | None = None
        while e:  # (base)^E by squaring, truncated at degree n
            if e & 1:
                # The first factor is taken as it is: a product with 1 (x^0) gives it back unchanged, bit for bit.
                result = power if result is None else np.convolve(result, power)[: n + 1]
            e >>= 1
            if e:  # a square after the last factor would go unused
                power = np.convolve(power, power)[: n + 1]
        expected += 1.0 - (0.0 if result is None else result[n]) * scale  # E = 0: x^0 only
    return float(expected / n)


def random_vocab_specialization(experts: int, occurrences: np.ndarray, token_ids: np.ndarray) -> float:
    """Expected vocabulary specialization under random routing for the same occurrence counts: token ids
    seen n times (``token_ids`` of them at each ``occurrences`` value) each score ``expected_max_share``,
    averaged over token ids the way the measured number is."""
    occ = np.asarray(occurrences, dtype=np.int64)
    ids = np.asarray(token_ids, dtype=np.float64)
    if occ.size == 0 or ids.sum() <= 0:
        return math.nan
    values = [expected_max_share(experts, int(n)) for n in occ]
    return float(np.average(values, weights=ids))


# -- spreads across layers ----------------------------------------------------------------------------
def spread(values: Sequence[float], layers: Sequence[int], *, higher_is_worse: bool = True) -> dict[str, float | int | None]:
    """Mean, p50, p90, min, max of one metric across layers and the worst layer (NaNs ignored)."""
    arr = np.asarray(values, dtype=np.float64)
    ok = ~np.isnan(arr)
    if not ok.any():
        return {"mean": None, "p50": None, "p90": None, "min": None, "max": None, "worst_layer": None}
    vals, idx = arr[ok], np.asarray(layers)[ok]
    # No layer is worst when all are equal (e.g. no dead experts anywhere).
    worst = None if vals.max() == vals.min() else int(idx[np.argmax(vals) if higher_is_worse else np.argmin(vals)])
    return {
        "mean": float(vals.mean()),
        "p50": float(np.percentile(vals, 50)),
        "p90": float(np.percentile(vals, 90)),
        "min": float(vals.min()),
        "max": float(vals.max()),
        "worst_layer": worst,
    }
