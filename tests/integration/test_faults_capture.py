"""Faults on the capture side: a disk that fills up, and token redaction."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import torch

import moeprobe
from tests.conftest import PYTHON, ROOT, run_cli_env
from tests.tiny_models import build

FULL_DISK_JOB = """
import resource, signal, sys, time, torch
sys.path.insert(0, {root!r})
import moeprobe
from tests.tiny_models import build
# A file-size limit stands in for a full disk: writes past it fail with EFBIG instead of killing us.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
model = build("mixtral")
with moeprobe.record(model, {trace!r}, flush_interval=0.05) as probe:
    model(torch.randint(3, 96, (1, 4)))          # small first segment: fits
    time.sleep(0.3)  # let the writer flush the small first segment
    resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))
    for _ in range(3):
        out = model(torch.randint(3, 96, (16, 64)))   # segments far over the limit: cannot be written
print("job finished", tuple(out.logits.shape))
"""


def test_full_disk_drops_counts_warns_once_and_the_job_finishes(tmp_path: Path) -> None:
    job = tmp_path / "job.py"
    job.write_text(textwrap.dedent(FULL_DISK_JOB.format(root=str(ROOT), trace=str(tmp_path / "t"))))
    result = subprocess.run([PYTHON, str(job)], capture_output=True, text=True, env=run_cli_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "job finished (16, 64, 96)" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if "cannot write" in line]
    assert len(warnings) == 1 and "dropping records and counting them" in warnings[0]
    trace = moeprobe.open_trace(tmp_path / "t")
    counters = trace.manifest["counters"]
    assert counters["dropped"]["disk_full"] == 3 * 16 * 64 * 2 * 2
    assert trace.status == "complete"
    assert trace.routing().num_rows == 4 * 2 * 2  # what was written before the disk filled is intact


def test_redact_tokens_keeps_no_token_id_on_disk(tmp_path: Path) -> None:
    model = build("olmoe")
    ids = torch.tensor([[11, 22, 33, 44, 55]])
    with moeprobe.record(model, tmp_path / "t", redact_tokens=True, logits=True):
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    trace = moeprobe.open_trace(tmp_path / "t")
    assert trace.manifest["options"]["redact_tokens"] is True
    assert set(trace.routing().column("token_id").to_pylist()) == {-1}
    assert trace.routing().num_rows == (5 + 2) * 2 * 2
    # Every file on disk that has a token_id column holds only -1 there, and no JSON file names a token.
    files = list((tmp_path / "t").rglob("*.parquet"))
    assert files
    for path in files:
        table = pq.read_table(path)
        if "token_id" in table.column_names:
            assert set(table.column("token_id").to_pylist()) == {-1}, path
    for path in (tmp_path / "t").rglob("*.json"):
        assert "11, 22, 33" not in path.read_text()
