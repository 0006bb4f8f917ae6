"""Balancing lab against the demo ``balanced`` model (issue 6): re-routing its captured router logits with
the recorded bias reproduces the captured choices exactly, and with zero bias gives the choices the model's
own router makes without balancing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch

import moeprobe
from moeprobe.demo import checkpoints
from moeprobe.demo.prompts import load_prompts
from moeprobe.demo.tokenizer import encode
from tests.conftest import PYTHON, run_cli_env

CHOICES = "select step, sequence, position, layer, list(expert order by expert) e from routing group by all"


def _record(model: torch.nn.Module, path: Path) -> moeprobe.Trace:
    ids = torch.tensor([encode(p.text)[:48] for p in load_prompts()[::8]])
    with torch.no_grad(), moeprobe.record(model, path, logits=True):
        model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    return moeprobe.open_trace(path)


def _simulate(trace: Path, spec: str, out: Path) -> moeprobe.Trace:
    result = subprocess.run(
        [PYTHON, "-m", "moeprobe", "simulate", str(trace), "-s", spec, "-o", str(out)],
        capture_output=True, text=True, env=run_cli_env(), timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return moeprobe.open_trace(out)


def _choices(trace: moeprobe.Trace) -> dict[tuple[int, int, int, int], list[int]]:
    return {(r["step"], r["sequence"], r["position"], r["layer"]): r["e"] for r in trace.sql(CHOICES).to_pylist()}


def test_reroute_reproduces_and_zero_bias_matches_the_models_router(tmp_path: Path) -> None:
    model = checkpoints.load_checkpoint("balanced")
    recorded = _record(model, tmp_path / "rec")
    captured = _choices(recorded)

    same = _simulate(tmp_path / "rec", "reroute:bias=recorded", tmp_path / "same")
    assert _choices(same) == captured  # every token of every layer, prefill and decode

    unbiased = _choices(_simulate(tmp_path / "rec", "reroute:bias=zero", tmp_path / "zero"))
    assert unbiased != captured  # the bias really changes choices on this model

    # Ground truth 1: the model's own router module with its bias zeroed, fed the captured logits (an
    # identity weight makes its logits equal its input), for every layer and token.
    routers = [m for m in model.modules() if type(m).__name__ == "DeepseekV3TopkRouter"]
    rows = recorded.sql("select step, sequence, position, layer, scores from scores").to_pylist()
    for layer, router in enumerate(routers):
        mine = [r for r in rows if r["layer"] == layer]
        replica = type(router)(model.config)  # same config: groups, top-k, scaling; its bias starts at zero
        replica.weight = torch.nn.Parameter(torch.eye(router.num_experts))
        replica.hidden_dim = router.num_experts
        assert not replica.e_score_correction_bias.any()
        logits = torch.tensor([r["scores"] for r in mine])
        _, _, chosen = replica(logits)
        for r, experts in zip(mine, chosen.tolist(), strict=True):
            assert unbiased[(r["step"], r["sequence"], r["position"], layer)] == sorted(experts)

    # Ground truth 2: the first MoE layer sees the same input whatever the bias, so running the model with
    # zeroed biases must choose there exactly what the zero-bias replay chose.
    with torch.no_grad():
        for router in routers:
            router.e_score_correction_bias.zero_()
    rerun = _choices(_record(model, tmp_path / "rerun"))
    first_layer = {key: value for key, value in unbiased.items() if key[3] == 0 and key[0] == 0}
    assert first_layer and all(rerun[key] == value for key, value in first_layer.items())
