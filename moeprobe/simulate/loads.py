"""Estimating expert load from per-step counts the way a deployment would before it plans a placement.

``step_counts`` is (S, L, E) or (S, E): assignments per step. Estimates:

- ``sum``: everything in the window (a whole-trace or step-window histogram),
- ``ema``: exponential moving average over the window's steps, e_t = (1 − α) e_{t−1} + α c_t (recent steps
  weigh more, as an online balancer that re-plans periodically sees them),
- ``last``: the sum over the window's last W steps (a sliding window).

"Plan on steps 0–N, evaluate on N–end" is ``estimate_load`` on the plan window, then the placement's load
computed from the evaluation window's ``sum``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHODS = ("sum", "ema", "last")


@dataclass(frozen=True)
class LoadEstimate:
    method: str = "sum"
    alpha: float = 0.1  # for ema
    last: int = 1  # for last

    @classmethod
    def parse(cls, text: str) -> LoadEstimate:
        """``sum``, ``ema:ALPHA`` or ``last:STEPS``."""
        name, _, arg = text.partition(":")
        if name == "sum" and not arg:
            return cls("sum")
        try:
            if name == "ema":
                alpha = float(arg or 0.1)
                if not 0.0 < alpha <= 1.0:
                    raise ValueError
                return cls("ema", alpha=alpha)
            if name == "last":
                steps = int(arg or 1)
                if steps < 1:
                    raise ValueError
                return cls("last", last=steps)
        except ValueError:
            pass
        raise ValueError(f"load estimate {text!r}: expected sum, ema:ALPHA (0 < ALPHA <= 1) or last:STEPS")

    def __str__(self) -> str:
        return {"sum": "sum", "ema": f"ema:{self.alpha:g}", "last": f"last:{self.last}"}[self.method]


def estimate_load(step_counts: np.ndarray, estimate: LoadEstimate | None = None) -> np.ndarray:
    """Collapse the step axis (axis 0) of ``step_counts`` into one load estimate."""
    counts = np.asarray(step_counts, dtype=np.float64)
    estimate = estimate or LoadEstimate()
    if counts.shape[0] == 0:
        return np.zeros(counts.shape[1:])
    if estimate.method == "sum":
        return np.asarray(counts.sum(axis=0))
    if estimate.method == "last":
        return np.asarray(counts[-estimate.last :].sum(axis=0))
    # EMA, started from the first step (no bias towards zero at the start of the window).
    value = counts[0].copy()
    for row in counts[1:]:
        value = (1.0 - estimate.alpha) * value + estimate.alpha * row
    return np.asarray(value)
