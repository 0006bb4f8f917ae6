"""``moeprobe simulate`` in a subprocess, on hand-made traces with known routing and router logits."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from moeprobe.simulate.replay import bias_table, scores_table
from moeprobe.simulate.report_model import SimulateReport
from moeprobe.simulate.routing import sigmoid_group_topk
from tests.conftest import PYTHON, run_cli_env
from tests.support import layer_meta, routing_table, write_trace

# 8 tokens, 4 experts, top-1. Token t's best logit is at FIRST[t] (load 4 2 1 1: MaxVio 1.0) and its
# second best at SECOND[t], so top-2 adds load 1 4 2 1 (total 5 6 3 2: MaxVio 0.5).
FIRST = np.array([0, 0, 0, 0, 1, 1, 2, 3])
SECOND = (FIRST + 1) % 4


def _simulate(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "moeprobe", "simulate", *argv],
        capture_output=True, text=True, env=run_cli_env(), timeout=120,
    )


def _json(*argv: str) -> dict:
    result = _simulate(*argv, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _rows(report: dict) -> dict[str, dict]:
    return {row["strategy"]: row for row in report["strategies"]}


@pytest.fixture(scope="module")
def softmax_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    logits = np.full((8, 4), -2.0, dtype=np.float32)
    logits[np.arange(8), FIRST] = 3.0
    logits[np.arange(8), SECOND] = 1.0
    tables = {
        "routing": routing_table(FIRST, weights=np.ones(8), position=np.arange(8)),
        "scores": scores_table(0, 0, np.arange(8), 0, logits),
    }
    return write_trace(tmp_path_factory.mktemp("sm") / "trace", tables, layers=layer_meta(1, 4, 1))


@pytest.fixture(scope="module")
def plain_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Routing only, recorded without --logits."""
    return write_trace(tmp_path_factory.mktemp("plain") / "trace", {"routing": routing_table(FIRST)},
                       layers=layer_meta(1, 4, 1))


@pytest.fixture(scope="module")
def deepseek_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 experts in 4 groups, top-4, a bias that changes at step 2; choices from the exact router."""
    rng = np.random.default_rng(0)
    steps = np.repeat(np.arange(4), 32)
    logits = rng.standard_normal((128, 16)).astype(np.float32)
    logits[:, :4] += 1.0  # group 0 is popular: the bias has work to do
    bias = (rng.standard_normal((2, 16)) * 0.2).astype(np.float32)
    experts = np.empty((128, 4), np.int32)
    weights = np.empty((128, 4), np.float32)
    for half, rows in enumerate((steps < 2, steps >= 2)):
        routed = sigmoid_group_topk(logits[rows], 4, bias=bias[half], n_group=4, topk_group=2,
                                    routed_scaling_factor=2.5)
        experts[rows], weights[rows] = routed.experts, routed.weights
    position = np.tile(np.arange(32), 4)
    tables = {
        "routing": routing_table(experts, weights=weights, step=steps, position=position, sequence=steps),
        "scores": scores_table(steps, steps, position, 0, logits),
        "bias": bias_table(np.array([0, 2]), 0, bias),
    }
    layers = layer_meta(1, 16, 4, scoring="sigmoid", n_group=4, topk_group=2, norm_topk_prob=True,
                        routed_scaling_factor=2.5, has_bias=True)
    return write_trace(tmp_path_factory.mktemp("ds") / "trace", tables, layers=layers)


def test_text_table_side_by_side(softmax_trace: Path) -> None:
    result = _simulate(str(softmax_trace), "-s", "reroute", "-s", "capacity:cf=1.0")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("strategy"))
    assert header.split()[1:6] == ["MaxVio", "MaxVio/batch", "balanced", "EP", "balanced"]
    recorded = next(line for line in lines if line.startswith("recorded ")).split()
    assert recorded[1] == "1.000" and recorded[7] == "0.00%"
    reroute = next(line for line in lines if line.startswith("reroute ")).split()
    assert reroute[1] == "1.000" and reroute[7] == "0.00%"  # same choices as recorded
    capacity = next(line for line in lines if line.startswith("capacity:cf=1.0 ")).split()
    assert capacity[6] == "25.00%" and capacity[8] == "25.00%"  # 2 of 8 dropped, each its whole weight
    for column in ("balanced ", "EP balanced ", "changed ", "mass lost "):
        assert f"\n  {column}" in result.stdout  # every column is explained under the table
    assert "dropped, capacity:cf=1.0" in result.stdout
    assert result.stderr == ""


def test_json_known_answers(softmax_trace: Path) -> None:
    report = _json(str(softmax_trace), "-s", "topk:k=2", "-s", "capacity:cf=1.0", "-s", "capacity:slots=1,order=score")
    assert SimulateReport.from_json(report).to_json() == report  # typed: drops and every row's field
    rows = _rows(report)
    assert list(rows) == ["recorded", "topk:k=2", "capacity:cf=1.0", "capacity:slots=1,order=score"]
    assert rows["recorded"]["summary"]["max_vio"] == pytest.approx(1.0)
    assert rows["recorded"]["summary"]["cv"] == pytest.approx(np.std([4, 2, 1, 1]) / 2)
    assert rows["recorded"]["layers"][0]["load"] == [4, 2, 1, 1]
    top2 = rows["topk:k=2"]
    assert top2["layers"][0]["load"] == [5, 6, 3, 2] and top2["summary"]["max_vio"] == pytest.approx(0.5)
    assert top2["summary"]["changed_share"] == 1.0 and top2["summary"]["mass_lost"] == 0.0
    capacity = rows["capacity:cf=1.0"]
    # Capacity 2 per expert: expert 0's tokens at positions 2 and 3 are dropped.
    assert capacity["drops"]["by_position"]["dropped"] == [0, 0, 1, 1, 0, 0, 0, 0]
    assert capacity["drops"]["by_expert"][0]["dropped"] == [2, 0, 0, 0]
    assert capacity["summary"]["dropped_share"] == pytest.approx(0.25)
    assert rows["capacity:slots=1,order=score"]["summary"]["dropped_share"] == pytest.approx(4 / 8)


def test_deepseek_replay_eplb_and_written_trace(deepseek_trace: Path, tmp_path: Path) -> None:
    report = _json(str(deepseek_trace), "-s", "reroute", "-s", "reroute:bias=zero", "-s", "online-bias:u=0.01",
                   "--eplb", "replicas=20,groups=4,nodes=2,gpus=4,plan=0:2")
    assert SimulateReport.from_json(report).to_json() == report  # typed: the EPLB plan too
    rows = _rows(report)
    assert rows["reroute"]["summary"]["changed_share"] == 0.0  # the recorded bias reproduces the capture
    assert rows["reroute:bias=zero"]["summary"]["changed_share"] > 0.1
    assert rows["reroute:bias=zero"]["summary"]["max_vio"] > rows["recorded"]["summary"]["max_vio"]
    eplb = report["eplb"]
    assert eplb["policy"] == "hierarchical" and eplb["plan_steps"] == [0, 1] and eplb["eval_steps"] == [2, 3]
    assert np.asarray(eplb["phy2log"]).shape == (1, 20) and np.asarray(eplb["logcnt"]).sum() == 20
    assert np.asarray(eplb["log2phy"]).shape[:2] == (1, 16)
    assert sum(r["replicas"] - 1 for r in eplb["replicated"]) == 4
    assert np.asarray(eplb["contiguous"]["traffic"]["matrix"]).sum() == 64 * 4

    out = tmp_path / "sim"
    result = _simulate(str(deepseek_trace), "-s", "online-bias:u=0.01", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert f"wrote the simulated routing to {out}" in result.stdout
    again = _rows(_json(str(out)))["recorded"]["summary"]
    assert again["max_vio"] == pytest.approx(rows["online-bias:u=0.01"]["summary"]["max_vio"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["simulated_from"]["strategy"] == "online-bias:u=0.01"


def test_steps_window_and_eplb_text(deepseek_trace: Path) -> None:
    result = _simulate(str(deepseek_trace), "--steps", "1:3", "--eplb", "gpus=4,redundant=4")
    assert result.returncode == 0, result.stderr
    assert "steps 1:3, 1 layer(s), 64 tokens per layer" in result.stdout
    assert "EPLB hierarchical: 20 physical experts (4 redundant) on 4 GPUs" in result.stdout
    assert "all-to-all" in result.stdout


@pytest.mark.parametrize(
    ("fixture", "argv", "code", "message"),
    [
        ("plain_trace", ["-s", "reroute"], 1, "moeprobe record --logits"),
        ("softmax_trace", ["-s", "reroute:bias=recorded"], 1, "needs the recorded router bias"),
        ("softmax_trace", ["--steps", "100:"], 1, "no routing recorded in steps 100:"),
        ("softmax_trace", ["-s", "magic"], 2, "unknown strategy 'magic'"),
        ("softmax_trace", ["--steps", "5:2"], 2, "the range is empty"),
        ("softmax_trace", ["-s", "reroute", "-s", "topk:k=2", "-o", "x"], 2, "exactly one --strategy"),
        ("softmax_trace", ["--eplb", "gpus=3"], 2, "4 physical experts do not divide evenly over 3 GPUs"),
        ("softmax_trace", ["--eplb", "replicas=2,gpus=2"], 2, "must be >= 4"),
        ("softmax_trace", ["--layers", "x"], 2, "--layers"),
        ("softmax_trace", ["--bogus"], 2, "unrecognized arguments"),
    ],
)
def test_errors_are_one_line(
    request: pytest.FixtureRequest, fixture: str, argv: list[str], code: int, message: str
) -> None:
    trace = request.getfixturevalue(fixture)
    result = _simulate(str(trace), *argv)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""


def test_missing_trace_and_help(tmp_path: Path) -> None:
    result = _simulate(str(tmp_path / "nope"))
    assert result.returncode == 1 and "no such trace" in result.stderr
    result = _simulate("--help")
    assert result.returncode == 0 and "online-bias" in result.stdout and "--eplb" in result.stdout


def test_json_has_a_version_a_step_list_and_one_balance_unit(softmax_trace: Path) -> None:
    plain = _json(str(softmax_trace), "-s", "capacity:cf=1.0", "--steps", "0:")
    with_eplb = _json(str(softmax_trace), "-s", "capacity:cf=1.0", "--eplb", "gpus=2")
    assert plain["format_version"] == 1 and plain["generator"].startswith("moeprobe ")
    assert plain["steps"] == [0, None]
    assert with_eplb["steps"] == [None, None]
    # "balancedness" is over experts with and without --eplb; the EP balance has its own field and GPU count.
    for report in (plain, with_eplb):
        recorded = _rows(report)["recorded"]
        assert recorded["summary"]["balancedness"] == pytest.approx(1 / (1 + recorded["summary"]["max_vio"]), abs=1e-6)
    assert plain["ep"]["gpus"] == 8 and plain["ep"]["layers_not_divisible"] == [0]  # 4 experts over 8 GPUs
    assert _rows(plain)["recorded"]["summary"]["ep_balancedness"] is None
    assert with_eplb["ep"]["gpus"] == 2
    # loads [4, 2, 1, 1] over 2 GPUs: [6, 2], mean 4, max 6
    assert _rows(with_eplb)["recorded"]["summary"]["ep_balancedness"] == pytest.approx(4 / 6, abs=1e-6)

    def decimals(value: object) -> None:
        if isinstance(value, float):
            assert value == round(value, 6)
        elif isinstance(value, dict):
            for item in value.values():
                decimals(item)
        elif isinstance(value, list):
            for item in value:
                decimals(item)

    decimals(plain)


def test_text_has_per_layer_rows(softmax_trace: Path, tmp_path: Path) -> None:
    one_layer = _simulate(str(softmax_trace), "-s", "capacity:cf=1.0")
    assert "\nper layer\n" not in one_layer.stdout  # one layer: the summary is the layer
    assert "EP balanced   mean / max load over 8 GPUs" in one_layer.stdout
    assert "EP balanced is '-' for layers 0" in one_layer.stdout
    # Two layers: layer 0 skewed (MaxVio 1.0), layer 1 balanced (MaxVio 0).
    two = write_trace(tmp_path / "two", {"routing": [routing_table(FIRST, layer=0),
                                                     routing_table(np.tile(np.arange(4), 2), layer=1)]},
                      layers=layer_meta(2, 4, 1))
    result = _simulate(str(two), "-s", "capacity:cf=1.0", "--ep-size", "2")
    assert result.returncode == 0, result.stderr
    rows = result.stdout.split("\nper layer\n", 1)[1].splitlines()
    assert rows[1].split()[:3] == ["0", "recorded", "1.000"]
    assert rows[3].split()[:3] == ["1", "recorded", "0.000"]
    assert "EP balanced   mean / max load over 2 GPUs" in result.stdout
