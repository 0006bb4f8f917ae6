"""``report``, ``simulate --eplb`` and ``--export`` on a trace imported from every source, counts traces included."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moeprobe import open_trace
from moeprobe.analysis.report_model import Report
from moeprobe.cli.main import main as cli
from tests.engine_formats import imported_traces

SOURCES = ["vllm", "sglang_generate", "sglang_stat", "sglang_per_pass", "sglang_per_token", "megatron"]
COUNTS = {"sglang_stat", "sglang_per_pass"}


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return imported_traces(tmp_path_factory.mktemp("imported"))


def _loads(trace: Path) -> np.ndarray:
    """(layers, experts) load straight from the trace's tables: loads for a counts trace, else routing rows."""
    with open_trace(trace) as t:
        shape = (len(t.layers), int(t.layers[0]["num_experts"]))
        sql = ("SELECT layer, expert, sum(tokens) AS n FROM loads GROUP BY ALL" if t.mode == "counts"
               else "SELECT layer, expert, count(*) AS n FROM routing GROUP BY ALL")
        got = t.sql(sql).to_pydict()
    out = np.zeros(shape, dtype=np.int64)
    out[got["layer"], got["expert"]] = got["n"]
    return out


@pytest.mark.parametrize("name", SOURCES)
def test_report_on_imported_trace(name: str, traces: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["report", str(traces[name]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["trace"]["mode"] == ("counts" if name in COUNTS else "tokens")
    assert report["trace"]["source"]["engine"] == name.split("_")[0]
    assert Report.from_json(report).to_json() == report  # the typed report holds every field, counts traces too
    loads = _loads(traces[name])
    assert [layer["counts"] for layer in report["layers"]] == loads.tolist()
    assert report["overall"]["decisions"] == int(loads.sum())
    assert all(layer["ep"]["balancedness"] is not None for layer in report["layers"])
    if name in COUNTS:
        assert "co-activation" in report["specialization"]["needs_tokens"]
        assert all(len(layer["windows"]) > 1 for layer in report["layers"])  # over time, from the loads table
    assert cli(["report", str(traces[name])]) == 0
    text = capsys.readouterr().out
    assert "Load imbalance across layers" in text
    if name in COUNTS:
        assert "counts trace" in text and "not available without per-token rows" in text
        assert "Token-level specialization" not in text


def test_counts_trace_refuses_tag_filters(traces: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["report", str(traces["sglang_stat"]), "--tag", "domain=code"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tag filters need per-token routing" in err[0]


@pytest.mark.parametrize("name", SOURCES)
def test_simulate_eplb_on_imported_trace(name: str, traces: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["simulate", str(traces[name]), "--eplb", "gpus=2,redundant=2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    eplb = report["eplb"]
    loads = _loads(traces[name])
    # the evaluation load per GPU sums to the trace's load per layer (EPLB only moves it around)
    np.testing.assert_allclose(np.asarray(eplb["eplb"]["gpu_load"]).sum(axis=1), loads.sum(axis=1))
    assert len(eplb["phy2log"][0]) == loads.shape[1] + 2
    if name in COUNTS:
        assert report["strategies"] == [] and eplb["origin"] == "rank"
        # re-routing needs tokens: refused in one line
        assert cli(["simulate", str(traces[name]), "--strategy", "topk:k=1"]) == 2
        assert "need per-token routing" in capsys.readouterr().err


# -- placements back to the engines ------------------------------------------------------------------------
def _sglang_init_expert_location(value: str, num_logical_experts: int) -> dict[str, list]:
    """SGLang's loader for ``--init-expert-location`` (python/sglang/srt/eplb/expert_location.py,
    ``compute_initial_expert_location_metadata`` -> ``init_by_mapping`` -> ``_compute_logical_to_all_physical_map``),
    without torch: the same branches and the same loops."""
    if value.endswith(".pt"):
        raise AssertionError("moeprobe writes JSON")
    data = json.loads(Path(value).read_text()) if value.endswith(".json") else json.loads(value)
    if "physical_to_logical_map" not in data:
        raise NotImplementedError(f"Unknown init_expert_location format ({list(data.keys())=})")
    p2l = data["physical_to_logical_map"]
    l2all = [[[] for _ in range(num_logical_experts)] for _ in p2l]
    for layer_id, row in enumerate(p2l):
        for physical_id, logical_id in enumerate(row):
            l2all[layer_id][logical_id].append(physical_id)
    width = max(len(inner) for outer in l2all for inner in outer)
    padded = [[inner + [-1] * (width - len(inner)) for inner in outer] for outer in l2all]
    return {"physical_to_logical_map": p2l, "logical_to_all_physical_map": padded}


@pytest.mark.parametrize("name", ["sglang_stat", "vllm"])
def test_export_round_trips_through_the_engines_loaders(name: str, traces: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    spec = "gpus=2,redundant=2"
    assert cli(["simulate", str(traces[name]), "--eplb", spec, "--json", "--export", "sglang",
                str(tmp_path / "location.json")]) == 0
    planned = json.loads(capsys.readouterr().out)["eplb"]
    assert cli(["simulate", str(traces[name]), "--eplb", spec, "--export", "eplb", str(tmp_path / "eplb.json")]) == 0
    assert "wrote the EPLB placement" in capsys.readouterr().out
    experts = len(planned["logcnt"][0])

    # SGLang reads back the same slots for every logical expert
    loaded = _sglang_init_expert_location(str(tmp_path / "location.json"), experts)
    assert loaded["physical_to_logical_map"] == planned["phy2log"]
    for layer, rows in enumerate(loaded["logical_to_all_physical_map"]):
        for expert, slots in enumerate(rows):
            assert sorted(s for s in slots if s != -1) == sorted(s for s in planned["log2phy"][layer][expert] if s != -1)
    # SGLang's _init_common: physical experts = logical + redundant, divisible by the EP size
    assert len(loaded["physical_to_logical_map"][0]) == experts + 2 and (experts + 2) % 2 == 0

    # DeepSeek EPLB's outputs: log2phy[l, e, r] is replica r of expert e (r < logcnt), -1 past it; the GPU of
    # slot p is p // (replicas / gpus), as the reference README lays phy2log out per GPU.
    data = json.loads((tmp_path / "eplb.json").read_text())
    phy2log, log2phy, logcnt = np.array(data["phy2log"]), np.array(data["log2phy"]), np.array(data["logcnt"])
    assert data["num_gpus"] == 2 and data["num_replicas"] == experts + 2 and data["layers"] == planned["layers"]
    for layer in range(phy2log.shape[0]):
        for expert in range(experts):
            n = logcnt[layer, expert]
            assert n == (phy2log[layer] == expert).sum()
            assert all(phy2log[layer, log2phy[layer, expert, r]] == expert for r in range(n))
            assert (log2phy[layer, expert, n:] == -1).all()
    # same placement: the per-GPU load recomputed from the file is the one the simulator evaluated
    load = _loads(traces[name]).astype(float)
    per_slot = np.take_along_axis(load, phy2log, axis=1) / np.take_along_axis(logcnt, phy2log, axis=1)
    gpu = per_slot.reshape(phy2log.shape[0], data["num_gpus"], -1).sum(axis=2)
    np.testing.assert_allclose(gpu, planned["eplb"]["gpu_load"])


def test_export_refusals_are_one_line(traces: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = str(traces["sglang_stat"])
    assert cli(["simulate", trace, "--export", "sglang", str(tmp_path / "x.json")]) == 2  # no --eplb
    assert cli(["simulate", trace, "--eplb", "gpus=2", "--export", "sglang", str(tmp_path / "x.txt")]) == 2
    assert cli(["simulate", trace, "--eplb", "gpus=2", "--export", "vllm", str(tmp_path / "x.json")]) == 2
    (tmp_path / "exists.json").write_text("{}")
    assert cli(["simulate", trace, "--eplb", "gpus=2", "--export", "eplb", str(tmp_path / "exists.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4
    assert "give --eplb" in err[0] and "end in .json" in err[1] and "not one of" in err[2] and "--force" in err[3]
    assert (tmp_path / "exists.json").read_text() == "{}"


def test_token_level_api_on_a_counts_trace_says_why(traces: dict[str, Path]) -> None:
    from moeprobe.traces.errors import QueryError

    with open_trace(traces["sglang_stat"]) as t:
        assert t.load().decisions > 0
        with pytest.raises(QueryError, match="needs per-token routing"):
            t.specialization()
        with pytest.raises(QueryError, match="needs per-token routing"):
            t.router()


@pytest.mark.parametrize("name", ["sglang_stat", "megatron"])
def test_inspect_shows_mode_and_source(name: str, traces: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["inspect", str(traces[name])]) == 0
    text = capsys.readouterr().out
    mode = "counts" if name in COUNTS else "tokens"
    assert f"mode      {mode}" in text and f"source    {name.split('_')[0]}" in text and "loads" in text
    assert cli(["inspect", str(traces[name]), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["mode"] == mode and summary["manifest"]["options"]["mode"] == mode
    assert summary["tables"]["loads" if mode == "counts" else "routing"]["rows"] > 0
