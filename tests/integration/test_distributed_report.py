"""``report --engine dask``: per-shard partial aggregates on a local Dask cluster (worker processes) give the
single-machine report field for field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PYTHON, ROOT, run_cli_env

pytest.importorskip("distributed", reason="Dask (the dask extra) is needed for --engine dask")

sys.path.insert(0, str(ROOT / "bench"))
from synthetic import Shape, build_sharded_trace  # noqa: E402

# Small but with every analysis populated: 2 layers x 8 experts top-2, tags, prefill and decode, latency rows.
SHAPE = Shape(layers=2, experts=8, top_k=2, vocab=300, prefill=24, decode=6, batch=4)


@pytest.fixture(scope="module")
def eight_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dist") / "eight"
    build_sharded_trace(path, SHAPE.decisions_per_batch * 3 * 8, 8, seed=5, shape=SHAPE)
    return path


def _report(*args: str) -> dict[str, Any]:
    result = subprocess.run([PYTHON, "-m", "moeprobe", "report", *args, "--json"], capture_output=True, text=True,
                            env=run_cli_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_dask_report_equals_the_single_machine_report(eight_shards: Path) -> None:
    # small sample budgets, so that the sample of whole sequences is chosen from the merged sequence sizes
    common = (str(eight_shards), "--sample", "500", "--count-sample", "1500")
    single = _report(*common)
    distributed = _report(*common, "--engine", "dask", "--workers", "4")
    assert single["trace"]["ranks"] == list(range(8))
    assert single["overall"]["decisions"] == SHAPE.decisions_per_batch * 3 * 8
    assert 0 < single["specialization"]["sample"]["fraction"] < 1  # the sampled path really is exercised
    assert single["specialization"]["tags"] and single["latency"] is not None
    assert distributed == single


def test_dask_report_with_filters_equals_the_single_machine_report(eight_shards: Path) -> None:
    common = (str(eight_shards), "--rank", "1,3,6", "--layer", "1", "--phase", "decode", "--full")
    single = _report(*common)
    distributed = _report(*common, "--engine", "dask", "--workers", "2")
    assert single["filters"]["ranks"] == [1, 3, 6] and single["overall"]["decisions"] > 0
    assert distributed == single


def test_engine_options_are_checked() -> None:
    result = subprocess.run([PYTHON, "-m", "moeprobe", "report", "nowhere", "--workers", "2"], capture_output=True,
                            text=True, env=run_cli_env(), timeout=60)
    assert result.returncode == 2 and "--workers and --scheduler need --engine dask" in result.stderr


def test_workers_compute_the_tables_the_report_reads(eight_shards: Path) -> None:
    """The merged partials are installed under the names the analyses read, and hold what one machine's pass
    builds: the report above is equal because the workers' tables are right, not because they went unused."""
    import moeprobe
    from moeprobe.analysis.filters import Filters
    from moeprobe.analysis.load import aggregate_sql
    from moeprobe.distributed import prepare

    filters = Filters(phase="decode")
    with moeprobe.open_trace(eight_shards) as trace:
        assert prepare(trace, filters, workers=2) == list(range(8))
        ctx = trace.context(filters)
        seeded = {t for t in trace.snapshot_cache.names if t.endswith(filters.key)}
        assert seeded == {f"_mp_load_{filters.key}", f"_mp_sequences_{filters.key}"}
        assert trace.snapshot_cache.invalid_total == 0
        got = trace.sql(f"SELECT * FROM _mp_load_{filters.key} ORDER BY ALL").to_pylist()
        sequences = trace.sql(f"SELECT * FROM _mp_sequences_{filters.key} ORDER BY ALL").to_pylist()
    with moeprobe.open_trace(eight_shards) as trace:
        ctx = trace.context(filters)
        assert got == trace.sql(f"SELECT * FROM ({aggregate_sql(ctx)}) ORDER BY ALL").to_pylist()
        assert sequences == trace.sql(f"SELECT * FROM ({ctx.sequences_sql()}) ORDER BY ALL").to_pylist()
        assert len({row["rank"] for row in sequences}) == 8


def test_without_dask_the_engine_is_refused_in_one_line(eight_shards: Path) -> None:
    code = ("import sys; sys.modules['distributed'] = None; from moeprobe.cli.main import main; "
            f"sys.exit(main(['report', {str(eight_shards)!r}, '--engine', 'dask']))")
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=run_cli_env(), timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == "moeprobe report: --engine dask needs Dask, which is not installed: pip install 'moeprobe[dask]'"


def test_a_running_scheduler_gives_the_same_report(eight_shards: Path) -> None:
    """--scheduler: the workers of an already running cluster (started here as a cluster's hosts would run
    `dask scheduler` and `dask worker`) compute the partials."""
    from distributed import LocalCluster

    single = _report(str(eight_shards))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        distributed = _report(str(eight_shards), "--engine", "dask", "--scheduler", cluster.scheduler_address)
    assert distributed == single


def test_an_unreachable_scheduler_is_one_line() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess.run([PYTHON, "-m", "moeprobe", "report", str(ROOT / "tests" / "data" / "v1-good"), "--engine",
                             "dask", "--scheduler", f"tcp://127.0.0.1:{port}"], capture_output=True, text=True,
                            env=run_cli_env(), timeout=120)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(f"moeprobe report: --scheduler tcp://127.0.0.1:{port}: cannot connect")
    assert result.stderr.strip().count("\n") == 0


def test_a_counts_trace_gives_the_same_report(tmp_path: Path) -> None:
    """A counts trace (expert loads per step and rank, no routing rows): the partials are its loads, summed."""
    import numpy as np

    from moeprobe.cli.main import main as cli
    from tests.engine_formats import sglang_stat_dump

    rng = np.random.default_rng(11)
    for rank in (0, 1, 2):
        sglang_stat_dump(tmp_path / f"stat{rank}.pt", rng.integers(0, 9, size=(10, 2, 8)), rank=rank)
    trace = tmp_path / "counts"
    assert cli(["import", "sglang", *(str(tmp_path / f"stat{r}.pt") for r in (0, 1, 2)), "-o", str(trace), "--top-k", "2"]) == 0
    single = _report(str(trace))
    assert single["trace"]["mode"] == "counts" and single["trace"]["ranks"] == [0, 1, 2]
    assert _report(str(trace), "--engine", "dask", "--workers", "2") == single


def test_workers_read_the_drivers_snapshot_of_a_growing_trace(tmp_path: Path) -> None:
    """A trace still being written: the workers read exactly the segments the driver listed, not the ones that
    landed since, so the report is the one a single process makes of that snapshot."""
    import numpy as np

    import moeprobe
    from moeprobe.distributed import prepare
    from moeprobe.traces import ShardWriter, prepare_trace_dir
    from tests.support import layer_meta, routing_table

    path = tmp_path / "growing"
    prepare_trace_dir(path, force=False)
    writers = [ShardWriter(path, model={"name": "m"}, layers=layer_meta(1, 4, 2), options={}, rank=r, world_size=2)
               for r in (0, 1)]
    for r, writer in enumerate(writers):
        writer.append("routing", routing_table(np.array([[0, 1], [2, 3], [r, 2]]), sequence=np.array([0, 0, 1])))
        writer.flush()
    with moeprobe.open_trace(path) as driver, moeprobe.open_trace(path) as single:
        expected = single.summary()
        for writer in writers:  # more rows land after the driver listed the segments
            writer.append("routing", routing_table(np.array([[3, 0], [3, 1]]), step=np.array([1, 1]), sequence=np.array([2, 2])))
            writer.flush()
        prepare(driver, workers=1)
        assert driver.summary() == expected
        assert expected["overall"]["decisions"] == 12
    for writer in writers:
        writer.close()
