"""``trace.df()``: the SQL result as a pandas (or polars) DataFrame, and a clear error without either."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

import moeprobe
from tests.conftest import PYTHON, run_cli_env
from tests.support import layer_meta, routing_table, write_trace


@pytest.fixture()
def trace(tmp_path: Path) -> Path:
    experts = np.array([[0, 1], [2, 3], [0, 2]])
    return write_trace(tmp_path / "t", {"routing": [routing_table(experts)]}, layers=layer_meta(1, 4, 2))


def test_df_is_pandas_with_the_sql_result(trace: Path) -> None:
    pd = pytest.importorskip("pandas")
    with moeprobe.open_trace(trace) as t:
        frame = t.df("select expert, count(*) as n from routing group by expert order by expert")
        whole = t.df()
    assert isinstance(frame, pd.DataFrame)
    assert frame["expert"].tolist() == [0, 1, 2, 3]
    assert frame["n"].tolist() == [2, 1, 2, 1]
    assert len(whole) == 6 and "weight" in whole.columns


def test_df_polars_when_asked(trace: Path) -> None:
    pl = pytest.importorskip("polars")
    with moeprobe.open_trace(trace) as t:
        frame = t.df("select count(*) as n from routing", library="polars")
    assert isinstance(frame, pl.DataFrame) and frame["n"][0] == 6


def test_df_rejects_an_unknown_library(trace: Path) -> None:
    with moeprobe.open_trace(trace) as t, pytest.raises(ValueError, match="pandas, polars"):
        t.df(library="spark")


def test_df_without_pandas_or_polars_names_both(trace: Path) -> None:
    # A child interpreter where both imports fail, as on a machine that has neither.
    code = (
        "import sys; sys.modules['pandas'] = None; sys.modules['polars'] = None\n"
        "import moeprobe\n"
        f"t = moeprobe.open_trace({str(trace)!r})\n"
        "try:\n    t.df()\nexcept ImportError as exc:\n    print(exc)\n"
    )
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=run_cli_env(), timeout=60)
    assert result.returncode == 0, result.stderr
    assert "needs pandas or polars" in result.stdout and "trace.sql()" in result.stdout
