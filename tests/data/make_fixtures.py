"""Writes tests/data/v1-good, a small format-version-1 trace kept in git so that every later moeprobe
must still read what version 1 wrote. Run from the repo root: python -m tests.data.make_fixtures"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from tests.support import layer_meta, routing_table, write_trace

HERE = Path(__file__).parent


def main() -> None:
    out = HERE / "v1-good"
    if out.exists():
        shutil.rmtree(out)
    rng = np.random.default_rng(7)
    tables = [routing_table(rng.integers(0, 8, (16, 2)), layer=layer, sequence=np.repeat([0, 1], 8), position=np.tile(np.arange(8), 2)) for layer in range(2)]
    write_trace(out, {"routing": tables}, layers=layer_meta(2, 8, 2))


if __name__ == "__main__":
    main()
