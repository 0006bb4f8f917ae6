"""``moeprobe capture-server`` against a stand-in engine on 127.0.0.1 (vLLM and SGLang response shapes)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from moeprobe import open_trace
from moeprobe.cli.main import main as cli
from tests.conftest import PYTHON, run_cli_env
from tests.engine_stand_in import StandIn

DOMAINS = ("code", "math", "prose")


def _prompts(path: Path, n: int) -> list[dict[str, str]]:
    items = [{"prompt": f"prompt number {i} about {DOMAINS[i % 3]}" + "!" * (i % 4), "domain": DOMAINS[i % 3]}
             for i in range(n)]
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return items


def _check_every_sequence(trace: Path, stand_in: StandIn, items: list[dict[str, str]], max_tokens: int) -> None:
    """Each prompt's routing is in exactly one sequence, row for row, tagged with its own prompt: none lost or mixed."""
    with open_trace(trace) as t:
        assert t.status == "complete"
        tags = t.sql("SELECT sequence, key, value FROM tags").to_pylist()
        by_sequence: dict[int, dict[str, str]] = {}
        for row in tags:
            by_sequence.setdefault(row["sequence"], {})[row["key"]] = row["value"]
        assert sorted(int(v["prompt_index"]) for v in by_sequence.values()) == list(range(len(items)))
        for sequence, seq_tags in by_sequence.items():
            item = items[int(seq_tags["prompt_index"])]
            assert seq_tags["domain"] == item["domain"]
            assert seq_tags["request_id"] == stand_in.request_id(item["prompt"])
            prompt_ids, completion_ids, rows = stand_in.expected(item["prompt"], max_tokens)
            got = t.sql(f"SELECT position, layer, k, expert, token_id FROM routing WHERE sequence = {sequence} "
                        "ORDER BY position, layer, k").to_pydict()
            pos, layer, k = np.nonzero(rows >= 0)
            np.testing.assert_array_equal(got["position"], pos)
            np.testing.assert_array_equal(got["layer"], layer)
            np.testing.assert_array_equal(got["k"], k)
            np.testing.assert_array_equal(got["expert"], rows[pos, layer, k])
        steps = t.sql("SELECT count(DISTINCT step) AS n FROM routing").to_pylist()[0]["n"]
        assert steps == len(items)  # one step per response, in arrival order


@pytest.mark.parametrize("stream", [False, True])
def test_vllm_concurrent_requests_are_neither_lost_nor_mixed(tmp_path: Path, stream: bool) -> None:
    items = _prompts(tmp_path / "prompts.jsonl", 12)
    # Every request waits until 4 are in flight together: the capture must really run 4 at once.
    with StandIn(barrier=4) as stand_in:
        argv = ["capture-server", "--url", stand_in.url, "--engine", "vllm", "--prompts", str(tmp_path / "prompts.jsonl"),
                "--tag-field", "domain", "--num-experts", "16", "--max-tokens", "5", "--concurrency", "4",
                "-o", str(tmp_path / "t")] + (["--stream"] if stream else [])
        assert cli(argv) == 0
        assert stand_in.answered == 12 and stand_in.max_in_flight == 4
    _check_every_sequence(tmp_path / "t", stand_in, items, 5)


def test_sglang_generate_capture(tmp_path: Path) -> None:
    items = _prompts(tmp_path / "prompts.jsonl", 6)
    with StandIn(barrier=3) as stand_in:
        assert cli(["capture-server", "--url", stand_in.url, "--engine", "sglang", "--prompts",
                    str(tmp_path / "prompts.jsonl"), "--tag-field", "domain", "--num-experts", "16", "--top-k", "2",
                    "--max-tokens", "4", "--concurrency", "3", "-o", str(tmp_path / "t")]) == 0
    _check_every_sequence(tmp_path / "t", stand_in, items, 4)


def test_trace_is_readable_while_requests_are_in_flight(tmp_path: Path) -> None:
    items = _prompts(tmp_path / "prompts.jsonl", 5)
    trace = tmp_path / "t"
    with StandIn(hold_after=1) as stand_in:
        process = subprocess.Popen(
            [PYTHON, "-m", "moeprobe", "capture-server", "--url", stand_in.url, "--engine", "vllm", "--prompts",
             str(tmp_path / "prompts.jsonl"), "--num-experts", "16", "--max-tokens", "3", "--concurrency", "2",
             "-o", str(trace)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=run_cli_env(),
        )
        try:
            # The first response is written and flushed while the others are held: a reader sees it now.
            deadline = time.monotonic() + 60
            rows = 0
            while time.monotonic() < deadline and process.poll() is None:
                if (trace / "manifest.json").exists():
                    with open_trace(trace) as t:
                        rows = t.sql("SELECT count(*) AS n FROM routing").to_pylist()[0]["n"]
                        status = t.status
                    if rows:
                        break
                time.sleep(0.05)
            # whichever of the first two requests (both in flight) the server answered first
            first = {(len(item["prompt"]) + 3 - 1) * 3 * 2 for item in items[:2]}
            assert rows in first and status == "running"
            assert stand_in.answered == 1
            stand_in.release.set()
            out, err = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        assert process.returncode == 0, err
    with open_trace(trace) as t:
        assert t.status == "complete" and t.manifest["source"]["kind"] == "capture-server"
        assert t.sql("SELECT count(DISTINCT sequence) AS n FROM routing").to_pylist()[0]["n"] == 5


def test_failed_requests_are_counted_and_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A server that answers some requests with an error: the others are recorded, the failures said in one line."""
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"messages": [{"role": "user", "content": "x"}]})
                    + "\n")
    with StandIn() as stand_in:  # the stand-in has no chat endpoint: the messages prompt gets HTTP 500
        assert cli(["capture-server", "--url", stand_in.url, "--engine", "vllm", "--prompts", str(path),
                    "--num-experts", "16", "--max-tokens", "2", "-o", str(tmp_path / "t")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 request(s) failed" in err[0] and "HTTP 500" in err[0]
    with open_trace(tmp_path / "t") as t:
        assert t.manifest["counters"]["anomalies"] == {"request_failed": 1}
        assert t.sql("SELECT count(DISTINCT sequence) AS n FROM routing").to_pylist()[0]["n"] == 1
