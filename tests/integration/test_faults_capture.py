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
    assert probe.flush(timeout=60), "the small first segment was not written"
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


def _small_tmpfs(path: Path, size: str) -> bool:
    """A real file system that fills up (ENOSPC, not a file-size limit); needs root and mount, else skipped."""
    import os
    import shutil

    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "none", str(path)], capture_output=True).returncode == 0


def test_a_disk_that_stays_full_still_gets_the_final_manifest_with_its_drops(tmp_path: Path) -> None:
    import json

    import pytest

    disk = tmp_path / "disk"
    if not _small_tmpfs(disk, "4m"):
        pytest.skip("needs root and mount(8) for a small tmpfs that really fills up")
    try:
        model = build("mixtral")
        with moeprobe.record(model, disk / "t", flush_interval=0.05) as probe:
            model(torch.randint(3, 96, (1, 4)))
            assert probe.flush(timeout=30)  # the first segment is on disk before the disk fills
            # Fill the disk to the last byte, and keep it full until after close.
            with open(disk / "filler", "wb", buffering=0) as filler:
                for block in (65536, 1):
                    try:
                        while filler.write(b"\0" * block):
                            pass
                    except OSError:
                        pass
            for _ in range(3):
                model(torch.randint(3, 96, (8, 32)))
        on_disk = json.loads((disk / "t" / "manifest.json").read_text())
        shard = json.loads((disk / "t" / "rank=0" / "shard.json").read_text())
        assert on_disk["status"] == shard["status"] == "complete"
        assert shard["counters"]["dropped"].get("disk_full", 0) >= 3 * 8 * 32 * 2 * 2
        assert on_disk["counters"]["dropped"] == shard["counters"]["dropped"]
        result = subprocess.run([PYTHON, "-m", "moeprobe", "inspect", str(disk / "t")], capture_output=True, text=True,
                                env=run_cli_env(), timeout=60)
        assert result.returncode == 0 and "disk_full" in result.stdout, result.stdout + result.stderr
    finally:
        subprocess.run(["umount", str(disk)], check=True)
