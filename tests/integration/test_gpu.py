"""GPU-only checks: capture never synchronises the host, latency comes from CUDA events, and the
captured routing still equals the model's. Skipped where there is no CUDA device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moeprobe
from tests.tiny_models import build

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "switch_transformers"])
def test_no_host_sync_inside_capture(family: str, tmp_path: Path) -> None:
    model = build(family).cuda()
    ids = torch.randint(3, 96, (2, 8), device="cuda")
    mask = torch.ones_like(ids)
    forward_kwargs = {"attention_mask": mask}
    if family == "switch_transformers":
        forward_kwargs["decoder_input_ids"] = torch.zeros(2, 1, dtype=torch.long, device="cuda")
    # check_sync runs every hook (and the end-of-step transfer) under torch's sync debug mode "error": a
    # host sync inside capture raises there and is counted as an anomaly, so no anomaly means no sync.
    # (The model's own code may sync, e.g. nonzero() in the experts loop; that is not ours to judge.)
    from moeprobe.hooks.probe import Probe

    with Probe(model, tmp_path / "t", logits=True, check_sync=True) as probe:
        for _ in range(3):
            model(ids, **forward_kwargs)
    assert probe.anomalies == {}
    trace = moeprobe.open_trace(tmp_path / "t")
    assert trace.sql("select count(distinct step) from routing").column(0)[0].as_py() == 3
    latency = trace.sql("select min(block_ms) lo, any_value(clock) c from latency").to_pylist()[0]
    assert latency["c"] == "cuda_event" and latency["lo"] > 0


def test_cuda_capture_equals_cpu_capture(tmp_path: Path) -> None:
    model = build("mixtral")
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    with moeprobe.record(model, tmp_path / "cpu"):
        model(ids)
    with moeprobe.record(model.cuda(), tmp_path / "gpu"):
        model(ids.cuda())
    q = "select list(expert order by layer, sequence, position, k) from routing"
    assert moeprobe.open_trace(tmp_path / "cpu").sql(q).to_pylist() == moeprobe.open_trace(tmp_path / "gpu").sql(q).to_pylist()
