"""A 2-process torch.distributed (gloo) job: one shard per rank, unioned by the reader with ``rank``."""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moeprobe

ROOT = str(Path(__file__).resolve().parents[2])


def _worker(rank: int, world_size: int, rendezvous: str, trace: str) -> None:
    sys.path.insert(0, ROOT)
    from tests.tiny_models import build

    # Loopback only: gloo otherwise picks the interface the hostname resolves to, which on some CI machines
    # is not reachable and aborts the process.
    if Path("/sys/class/net/lo").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size, timeout=timedelta(seconds=120)
    )
    try:
        model = build("qwen2_moe")
        ids = torch.randint(3, 96, (1 + rank, 4), generator=torch.Generator().manual_seed(rank))
        with moeprobe.record(model, trace) as probe:
            probe.tag(rank_of_origin=str(rank))
            model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        total = torch.tensor([1.0])
        dist.all_reduce(total)  # the job really is distributed
        assert total.item() == world_size
    finally:
        dist.destroy_process_group()
    # Leave without running C++ static destructors: under load, torch's gloo teardown at interpreter exit
    # has aborted ("terminate called without an active exception") after all the work was done. The trace
    # is closed by now, and the test checks it from the parent.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_two_gloo_ranks_write_two_shards(tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), str(trace)), nprocs=2, join=True)
    opened = moeprobe.open_trace(trace)
    manifest = opened.manifest
    assert manifest["world_size"] == 2
    assert sorted(s["rank"] for s in manifest["shards"]) == [0, 1]
    assert opened.status == "complete"
    rows = opened.sql("select rank, count(distinct sequence) seqs, count(*) n from routing group by rank order by rank").to_pylist()
    # rank r generated for 1 + r sequences: 4 prompt tokens + 2 decode steps, 2 layers, top-2
    assert rows == [{"rank": 0, "seqs": 1, "n": 1 * 6 * 2 * 2}, {"rank": 1, "seqs": 2, "n": 2 * 6 * 2 * 2}]
    tags = opened.sql("select rank, value from tags order by rank, sequence").to_pylist()
    assert tags == [{"rank": 0, "value": "0"}, {"rank": 1, "value": "1"}, {"rank": 1, "value": "1"}]
    assert manifest["counters"]["decisions"] == 24 + 48
