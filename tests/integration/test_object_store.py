"""Traces in an S3-compatible object store (moto in server mode on 127.0.0.1): recorded straight into it by one
process and by a 2-rank gloo job, a run killed mid-way, and every reader command (inspect, report, tui) on s3://."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import torch
import torch.multiprocessing as mp

import moeprobe
from tests.object_store import ACCESS_KEY, SECRET, ObjectStoreServer
from tests.conftest import PYTHON, ROOT, run_cli_env

pytest.importorskip("s3fs", reason="s3fs (the s3 extra) is needed for s3:// traces")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "moeprobe", *args], capture_output=True, text=True, env=run_cli_env(), timeout=300)


def _json(*args: str) -> dict[str, Any]:
    result = _cli(*args, "--json")
    assert result.returncode == 0, result.stderr
    _assert_no_credentials(result.stdout + result.stderr)
    return json.loads(result.stdout)


def _assert_no_credentials(text: str) -> None:
    assert SECRET not in text and ACCESS_KEY not in text


def _assert_store_clean(s3: ObjectStoreServer, prefix: str) -> None:
    """Only moeprobe's names, no temporary object, and no credential in any object."""
    objects = s3.objects(prefix)
    assert objects
    for key, body in objects.items():
        relative = key[len(prefix):]
        assert relative == "/manifest.json" or relative.startswith("/rank="), key
        assert not relative.rsplit("/", 1)[-1].startswith("."), key  # nothing written under a temporary name
        assert SECRET.encode() not in body and ACCESS_KEY.encode() not in body, key


def _record(model: torch.nn.Module, path: str | Path) -> None:
    ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(7))
    with moeprobe.record(model, path, flush_interval=0.05) as probe:
        probe.tag(domain="code")
        model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)


def _without_timing(report: dict[str, Any]) -> dict[str, Any]:
    """A report without what differs between two recordings of the same routing: where and how fast."""
    report = json.loads(json.dumps(report))
    report["trace"].pop("path")
    report["trace"].pop("segments")  # flush timing decides how rows split into segments
    report.pop("latency")
    return report


def test_one_process_records_into_s3_and_reads_back_like_disk(s3: ObjectStoreServer, tmp_path: Path) -> None:
    from tests.tiny_models import build

    model = build("qwen2_moe")
    url = s3.url("runs/one")
    _record(model, url)
    _record(model, tmp_path / "one")
    _assert_store_clean(s3, "runs/one")

    remote, local = moeprobe.open_trace(url), moeprobe.open_trace(tmp_path / "one")
    assert remote.status == "complete" and remote.manifest["counters"]["decisions"] == local.manifest["counters"]["decisions"]
    assert remote.sql("select count(*) n from routing").to_pylist() == local.sql("select count(*) n from routing").to_pylist()
    assert remote.routing().num_rows == local.routing().num_rows > 0
    # the console's sandboxed connection reads the store too (its allowed paths are the segment URLs)
    from moeprobe.analysis.console import sandboxed_connection

    assert sandboxed_connection(remote.reader).sql("select count(*) from routing").fetchall() == [(local.routing().num_rows,)]

    report_remote = _json("report", url)
    report_local = _json("report", str(tmp_path / "one"))
    assert report_remote["trace"]["path"] == url
    assert _without_timing(report_remote) == _without_timing(report_local)

    inspected = _json("inspect", url)
    assert inspected["path"] == url and inspected["manifest"]["status"] == "complete"
    assert inspected["tables"]["routing"]["rows"] == local.routing().num_rows
    assert inspected["missing_ranks"] == [] and inspected["stale_ranks"] == []
    assert json.dumps(inspected).count("s3://") >= 1

    simulated = _json("simulate", url, "--eplb", "gpus=2")
    assert simulated["eplb"]["eplb"]["gpu_load"]


def test_existing_prefix_is_refused_and_force_deletes_only_a_trace(s3: ObjectStoreServer) -> None:
    from tests.tiny_models import build

    model = build("qwen2_moe")
    url = s3.url("runs/again")
    _record(model, url)
    with pytest.raises(moeprobe.traces.TraceExistsError, match="already exists; pass --force"):
        moeprobe.record(model, url)
    first = s3.objects("runs/again")
    with moeprobe.record(model, url, force=True):
        pass
    assert "runs/again/rank=0/routing/000000.parquet" in first
    assert "runs/again/rank=0/routing/000000.parquet" not in s3.objects("runs/again")  # the old segments are gone

    # a writer that is alive (this process, its heartbeat fresh) is never deleted under it
    with moeprobe.record(model, url, force=True), pytest.raises(moeprobe.traces.TraceBusyError, match="a writer is still writing this shard"):
        moeprobe.record(model, url, force=True)

    import boto3

    boto3.client("s3").put_object(Bucket=s3.bucket, Key="runs/again/notes.txt", Body=b"mine")
    with pytest.raises(moeprobe.traces.NotATraceError, match="notes.txt is not written by moeprobe"):
        moeprobe.record(model, url, force=True)
    assert "runs/again/notes.txt" in s3.objects("runs/again")


def test_two_gloo_ranks_record_into_one_prefix(s3: ObjectStoreServer, tmp_path: Path) -> None:
    from tests.integration.test_distributed import _worker

    url = s3.url("runs/gloo")
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), url), nprocs=2, join=True)
    _assert_store_clean(s3, "runs/gloo")

    opened = moeprobe.open_trace(url)
    assert opened.status == "complete" and opened.manifest["world_size"] == 2
    rows = opened.sql("select rank, count(distinct sequence) seqs, count(*) n from routing group by rank order by rank").to_pylist()
    assert rows == [{"rank": 0, "seqs": 1, "n": 1 * 6 * 2 * 2}, {"rank": 1, "seqs": 2, "n": 2 * 6 * 2 * 2}]

    inspected = _json("inspect", url)
    assert [(r["rank"], r["state"], r["decisions"], r["routing_rows"]) for r in inspected["ranks"]] == [
        (0, "complete", 24, 24), (1, "complete", 48, 48)]
    assert inspected["missing_ranks"] == [] and inspected["stale_ranks"] == []
    [host] = inspected["hosts"]  # both ranks ran on this machine
    assert host["ranks"] == [0, 1] and host["decisions"] == 72
    text = _cli("inspect", url)
    assert text.returncode == 0 and "Ranks" in text.stdout and "Hosts" in text.stdout

    report = _json("report", url)
    assert report["trace"]["ranks"] == [0, 1] and report["overall"]["decisions"] == 72
    assert report["trace"]["status"] == "complete"
    asyncio.run(_tui_shows(url, "complete", "18 tokens"))


# A job that records as rank 1 of 2 until it is killed; it flushes every 50 ms, so segments land while it runs.
_FOREVER = textwrap.dedent(
    """
    import sys, torch, moeprobe
    sys.path.insert(0, {root!r})
    from tests.tiny_models import build
    model = build("qwen2_moe")
    ids = torch.randint(3, 96, (1, 4), generator=torch.Generator().manual_seed(1))
    with moeprobe.record(model, {url!r}, flush_interval=0.05):
        while True:
            model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    """
)


def _committed_routing_segments(s3: ObjectStoreServer, key: str) -> int:
    body = s3.objects(key).get(key)
    return json.loads(body)["counters"]["segments"]["routing"] if body else 0


def test_a_run_killed_mid_way_reads_back_with_its_rank_stale(s3: ObjectStoreServer) -> None:
    url = s3.url("runs/killed")
    env = run_cli_env() | {"RANK": "1", "WORLD_SIZE": "2"}
    job = subprocess.Popen([PYTHON, "-c", _FOREVER.format(root=str(ROOT), url=url)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while _committed_routing_segments(s3, "runs/killed/rank=1/shard.json") < 3:
            assert job.poll() is None, job.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the job wrote no segment within 120 s"
            time.sleep(0.05)  # polling the store: the job's segments are the event
    finally:
        os.kill(job.pid, signal.SIGKILL)
        _, err = job.communicate(timeout=60)
    assert job.returncode == -signal.SIGKILL
    _assert_no_credentials(err.decode())
    _assert_store_clean(s3, "runs/killed")

    opened = moeprobe.open_trace(url)
    assert opened.status == "stale"
    committed = opened.manifest["counters"]["rows"]["routing"]
    assert committed > 0 and opened.routing().num_rows == committed  # every counted segment, nothing else

    inspected = _json("inspect", url)
    assert inspected["missing_ranks"] == [0] and inspected["stale_ranks"] == [1]
    assert [(r["rank"], r["state"]) for r in inspected["ranks"]] == [(1, "stale")]
    text = _cli("inspect", url)
    assert text.returncode == 0 and "missing" in text.stdout and "stale" in text.stdout

    report = _json("report", url)
    assert report["trace"]["status"] == "stale" and report["overall"]["decisions"] == committed
    asyncio.run(_tui_shows(url, "stale", ""))


async def _tui_shows(url: str, status: str, also: str) -> None:
    from moeprobe.tui.app import MoeprobeApp
    from moeprobe.tui.screens.overview import OverviewScreen
    from moeprobe.tui.widgets.heatmap import HeatMap
    from tests.tui.helpers import loaded, text_of, wait_for

    app = MoeprobeApp([url])
    async with app.run_test(size=(120, 36)) as pilot:
        await wait_for(pilot, lambda: loaded(app, OverviewScreen), timeout=60, what="overview of an s3:// trace")
        header = text_of(app.screen.query_one("#run"))
        assert status in header and also in header
        assert [r.label for r in app.screen.query_one(HeatMap).rows] == ["L0", "L1"]


def test_a_failed_put_is_counted_never_raised(s3: ObjectStoreServer) -> None:
    """The store going away under a writer (here: its bucket deleted) is a write error counted in the shard's
    counters, like a full disk; the model never sees an exception."""
    import boto3
    import pyarrow as pa

    from moeprobe.traces import ShardWriter
    from moeprobe.traces.schema import TABLES
    from tests.support import layer_meta, routing_table

    warnings: list[str] = []
    writer = ShardWriter(s3.url("runs/vanishing"), model={"name": "m"}, layers=layer_meta(1, 4, 2), options={},
                         on_warning=warnings.append)
    client = boto3.client("s3")
    for key in s3.objects():
        client.delete_object(Bucket=s3.bucket, Key=key)
    client.delete_bucket(Bucket=s3.bucket)
    writer.append("routing", routing_table(pa.array([0, 1, 2, 3], pa.int16()).to_numpy().reshape(2, 2)).cast(TABLES["routing"]))
    writer.flush()
    writer.close()
    assert writer.counters["dropped"] == {"write_error": 4} and writer.counters["segments"]["routing"] == 0
    assert any("cannot write routing segment" in w for w in warnings)
    client.create_bucket(Bucket=s3.bucket)  # for the fixture's next user


def test_reader_commands_refuse_a_missing_or_foreign_prefix_in_one_line(s3: ObjectStoreServer) -> None:
    other = _cli("inspect", "gs://bucket/trace")
    assert other.returncode == 1 and "unsupported location" in other.stderr and other.stderr.strip().count("\n") == 0

    missing = _cli("inspect", s3.url("nothing/here"))
    assert missing.returncode == 1 and missing.stderr.strip().count("\n") == 0
    assert "no such trace (nothing is stored under this prefix)" in missing.stderr

    import boto3

    boto3.client("s3").put_object(Bucket=s3.bucket, Key="foreign/data.csv", Body=b"a,b\n")
    foreign = _cli("report", s3.url("foreign"))
    assert foreign.returncode == 1 and "not a moeprobe trace" in foreign.stderr
    assert foreign.stderr.strip().count("\n") == 0


def test_record_command_writes_to_s3_and_marks_a_killed_job_aborted(s3: ObjectStoreServer, tmp_path: Path) -> None:
    from tests.integration.test_cli_record import FLUSH_THEN_KILL, _job

    url = s3.url("runs/cli")
    # the job flushes, then kills itself: `record` marks the stale shard aborted in the store
    job = _job(tmp_path, FLUSH_THEN_KILL)
    result = _cli("record", "-o", url, "--flush-interval", "0.2", "--", PYTHON, str(job))
    assert result.returncode == 128 + 9, result.stderr
    _assert_no_credentials(result.stdout + result.stderr)
    assert f"moeprobe: {url}: aborted" in result.stderr and f"next: moeprobe inspect {url}" in result.stderr
    _assert_store_clean(s3, "runs/cli")
    trace = moeprobe.open_trace(url)
    assert trace.status == "aborted" and "killed by SIGKILL" in trace.manifest["shards"][0]["error"]
    assert trace.routing().num_rows == 64  # everything generated before the kill had been flushed

    again = _cli("record", "-o", url, "--", PYTHON, str(job))
    assert again.returncode == 1 and "already exists; pass --force" in again.stderr
    assert again.stderr.strip().count("\n") == 0


def test_import_writes_to_s3(s3: ObjectStoreServer, tmp_path: Path) -> None:
    from tests.engine_formats import routing, vllm_completion

    lines = [json.dumps(vllm_completion(f"cmpl-{i}", [1, 2, 3, 4], [100, 101, 102], routing(f"v{i}", 6, 2, 2, 8), experts=8))
             for i in range(3)]
    (tmp_path / "vllm.jsonl").write_text("\n".join(lines) + "\n")
    url = s3.url("imported/vllm")
    result = _cli("import", "vllm", str(tmp_path / "vllm.jsonl"), "-o", url, "--num-experts", "8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(f"-> {url}")
    _assert_store_clean(s3, "imported/vllm")
    report = _json("report", url)
    assert report["trace"]["source"]["engine"] == "vllm" and report["overall"]["decisions"] == 3 * 6 * 2 * 2

    # an input with no routing leaves nothing behind in the store
    (tmp_path / "empty.jsonl").write_text("\n")
    empty = _cli("import", "vllm", str(tmp_path / "empty.jsonl"), "-o", s3.url("imported/empty"), "--num-experts", "8")
    assert empty.returncode == 1 and s3.objects("imported/empty") == {}


def test_a_reader_follows_a_growing_trace_in_the_store(s3: ObjectStoreServer) -> None:
    """refresh() sees new segments and the final status (shard.json is re-fetched when its ETag changes)."""
    from moeprobe.traces import ShardWriter, TraceReader
    from tests.support import layer_meta, routing_table

    url = s3.url("runs/growing")
    writer = ShardWriter(url, model={"name": "m"}, layers=layer_meta(1, 4, 2), options={})
    writer.append("routing", routing_table([[0, 1], [2, 3]]))
    writer.flush()
    reader = TraceReader(url)
    assert reader.status == "running" and reader.routing().num_rows == 4
    reader.refresh()
    assert reader.routing().num_rows == 4  # nothing new: the same snapshot
    writer.append("routing", routing_table([[1, 2], [3, 0], [0, 2]]))
    writer.flush()
    reader.refresh()
    assert reader.routing().num_rows == 10 and len(reader.segments("routing")) == 2
    writer.close()
    reader.refresh()
    assert reader.status == "complete"


def test_counts_mode_writes_the_loads_table_into_s3(s3: ObjectStoreServer, tmp_path: Path) -> None:
    from tests.integration.test_graph_capture import LOADS, STEPS, _generate
    from tests.tiny_models import build

    model = build("deepseek_v3").eval()
    url = s3.url("runs/counts")
    with moeprobe.record(model, url, mode="counts"):
        _generate(model)
    with moeprobe.record(model, tmp_path / "counts", mode="counts"):
        _generate(model)
    _assert_store_clean(s3, "runs/counts")
    remote, local = moeprobe.open_trace(url), moeprobe.open_trace(tmp_path / "counts")
    assert remote.manifest["options"]["mode"] == "counts" and remote.status == "complete"
    assert remote.sql(LOADS).to_pylist() == local.sql(LOADS).to_pylist() != []
    assert remote.sql(STEPS).to_pylist() == local.sql(STEPS).to_pylist()
    assert remote.sql("select count(*) n from routing").to_pylist() == [{"n": 0}]
    assert any(key.split("/")[-2] == "loads" for key in s3.objects("runs/counts"))


@pytest.mark.parametrize("weights", ["fp16", "u8"])
def test_the_store_gets_format_2_encoded_like_disk(s3: ObjectStoreServer, tmp_path: Path, weights: str) -> None:
    from tests.tiny_models import build

    model = build("deepseek_v3").eval()
    ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(7))
    for path in (s3.url("runs/fmt"), tmp_path / "fmt"):
        with moeprobe.record(model, path, weights=weights):
            model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    remote, local = moeprobe.open_trace(s3.url("runs/fmt")), moeprobe.open_trace(tmp_path / "fmt")
    assert remote.manifest["format_version"] == local.manifest["format_version"] == 2
    assert remote.manifest["encoding"] == local.manifest["encoding"]
    assert remote.manifest["options"]["weights"] == weights
    rows = "select step, sequence, position, layer, k, expert, weight from routing order by step, sequence, position, layer, k"
    got, want = remote.sql(rows).to_pylist(), local.sql(rows).to_pylist()
    assert want != [] and [{**r, "weight": None} for r in got] == [{**r, "weight": None} for r in want]
    if weights == "fp16":
        assert got == want
    else:  # u8 quantises per segment, and flush timing decides which rows share a segment: each within its step
        # Each side is within (hi - lo) / 508 of the weight, hi = max(0, max(w)) and lo = min(0, min(w)) over its
        # segment (docs/trace-format.md), so the two sides are within twice that over all rows.
        weights_seen = [r["weight"] for r in want]
        bound = (max(0.0, max(weights_seen)) - min(0.0, min(weights_seen))) / 254 + 1e-6
        assert max(abs(a["weight"] - b["weight"]) for a, b in zip(got, want, strict=True)) <= bound
    # Stored per token with the k choices side by side (the object holds the compact schema, not the logical one).
    import pyarrow.parquet as pq

    key, body = next((k, b) for k, b in s3.objects("runs/fmt").items() if "/routing/" in k)
    stored = pq.read_schema(pa.BufferReader(body))
    assert stored.equals(moeprobe.open_trace(tmp_path / "fmt").reader.routing_encoding.schema()), key


def _steps(trace: moeprobe.Trace) -> dict[int, int]:
    got = trace.sql("select step, count(*)::bigint n from routing group by step order by step").to_pydict()
    return dict(zip(got["step"], got["n"], strict=True))


def test_a_shard_in_the_store_keeps_every_flush_and_counts_each_once(s3: ObjectStoreServer) -> None:
    from moeprobe.traces import ShardWriter, prepare_trace_dir
    from tests.support import layer_meta

    url = s3.url("runs/flushes")
    prepare_trace_dir(url, force=False)
    writer = ShardWriter(url, model={"name": "m"}, layers=layer_meta(1, 8, 2), options={})
    assert writer.compactor is None  # no compaction in a store (docs/scale.md)
    for step in range(20):  # more than a compaction tier (16 flushes) holds
        _flush_step(writer, step)
    writer.close()
    names = sorted(k.rsplit("/", 1)[-1] for k in s3.objects("runs/flushes") if "/routing/" in k)
    assert names == [f"{n:06d}.parquet" for n in range(20)]
    with moeprobe.open_trace(url) as trace:
        assert _steps(trace) == {step: 6 for step in range(20)}


def _flush_step(writer: Any, step: int) -> None:
    import numpy as np

    from moeprobe.traces.schema import TABLES
    from tests.support import routing_table

    writer.append("routing", routing_table(np.array([[step % 8, (step + 1) % 8]] * 3), step=np.full(3, step)))
    writer.append("steps", pa.table({"step": [step], "phase": ["prefill"], "batch": [1], "tokens": [3],
                                     "started_at": [1.0], "wall_ms": [1.0]}, schema=TABLES["steps"]))
    writer.flush()


def test_a_compacted_disk_trace_copied_into_the_store_reads_each_flush_once(s3: ObjectStoreServer, tmp_path: Path) -> None:
    """The store reader applies the disk's listing rules by name: merged segments hide the flushes they hold, at
    every point of a copy that follows a merge (merged object PUT first, merged-away objects deleted after)."""
    import boto3

    from moeprobe.traces import ShardWriter, prepare_trace_dir
    from tests.support import layer_meta

    local = tmp_path / "t"
    prepare_trace_dir(local, force=False)
    writer = ShardWriter(local, model={"name": "m"}, layers=layer_meta(1, 8, 2), options={})
    assert writer.compactor is not None
    writer.compactor.fanout = 4
    for step in range(8):
        _flush_step(writer, step)
    writer.close()
    routing = local / "rank=0" / "routing"
    merged = {p.name for p in routing.glob("*-*.parquet")}
    assert "000000-000003.parquet" in merged and (routing / "000000.parquet").exists()  # still in its grace period

    client = boto3.client("s3")
    url, prefix = s3.url("runs/copied"), "runs/copied"
    files = sorted(p for p in local.rglob("*") if p.is_file() and not p.name.startswith(".") and p.name != "writer.lock")

    def put(path: Path) -> None:
        client.put_object(Bucket=s3.bucket, Key=f"{prefix}/{path.relative_to(local).as_posix()}", Body=path.read_bytes())

    for path in files:  # the flushes as written, before any merge
        if path.name not in merged:
            put(path)
    expected = {step: 6 for step in range(8)}
    with moeprobe.open_trace(url) as trace:
        assert _steps(trace) == expected
    for name in sorted(merged):  # the merges land beside what they hold
        put(routing / name)
    with moeprobe.open_trace(url) as trace:
        assert _steps(trace) == expected
        names = [str(s.path).rsplit("/", 1)[-1] for s in trace.reader.segments("routing")]
        assert names == [str(s.path.name) for s in moeprobe.open_trace(local).reader.segments("routing")]
    client.delete_object(Bucket=s3.bucket, Key=f"{prefix}/rank=0/routing/000001.parquet")  # deletion under way
    with moeprobe.open_trace(url) as trace:
        assert _steps(trace) == expected
        full = [(s.rows, s.full_rank) for s in trace.reader.segments("routing")]
        assert full == [(s.rows, s.full_rank) for s in moeprobe.open_trace(local).reader.segments("routing")]
