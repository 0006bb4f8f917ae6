"""The bad-input corpus: every damaged or hostile engine file gives one line naming it, exit status 1.

Nothing here is ever unpickled except through ``torch.load(weights_only=True)``; the pickle that would run a
command proves it by leaving no marker file.
"""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moeprobe.cli.main import main as cli
from tests import engine_formats as ef
from tests.conftest import PYTHON, run_cli_env


def _vllm_response(**choice_changes: Any) -> dict[str, Any]:
    rows = ef.routing("bad", 5 + 3 - 1, 2, 2, 8)
    response = ef.vllm_completion("cmpl-bad", [1, 2, 3, 4, 5], [6, 7, 8], rows, experts=8)
    response["choices"][0].update(choice_changes)
    return response


def _npy_b64_bytes(blob: bytes) -> str:
    return base64.b64encode(blob).decode()


def _good_blob() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, ef.routing("bad", 7, 2, 2, 8).astype(np.uint8), allow_pickle=False)
    return buffer.getvalue()


class _RunsACommand:
    """Unpickling this would run a shell command: what a hostile dump does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (import arguments, text the one-line message must contain)."""
    cases: dict[str, tuple[list[str], str]] = {}

    def vllm(name: str, response: Any, needle: str, *extra: str) -> None:
        path = tmp / f"{name}.json"
        path.write_text(json.dumps(response))
        cases[name] = (["vllm", str(path), "--num-experts", "8", *extra], needle)

    good = _vllm_response()["choices"][0]["routed_experts"]
    vllm("truncated_base64", _vllm_response(routed_experts=good[:-3]), "not valid base64")
    blob = _good_blob()
    vllm("truncated_npy_data", _vllm_response(routed_experts=_npy_b64_bytes(blob[:-8])), "truncated")
    header_end = blob.index(b"\n") + 1
    broken_header = blob[:10] + b"{'descr': '<u1', 'fortran_order': False, 'shape': (7, 2" + b" " * (header_end - 65) + b"\n"
    vllm("wrong_npy_header", _vllm_response(routed_experts=_npy_b64_bytes(broken_header + blob[header_end:])),
         "bad .npy header")
    vllm("not_npy", _vllm_response(routed_experts=_npy_b64_bytes(b"PK\x03\x04" + blob[4:])), "not an .npy array")
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    vllm("npy_with_pickled_objects", _vllm_response(routed_experts=_npy_b64_bytes(obj.getvalue())), "dtype")
    vllm("mismatched_shapes", _vllm_response(token_ids=[6]), "mismatched shapes")
    vllm("expert_past_num_experts", _vllm_response(), "past the 4 experts")
    cases["expert_past_num_experts"][0][-1] = "4"
    vllm("not_a_response", {"object": "list", "data": []}, "no 'choices' list")
    vllm("no_routed_experts", _vllm_response(routed_experts=None), "enable_return_routed_experts")
    (tmp / "bad_json.jsonl").write_text('{"id": "a", "choices": [\n')
    cases["bad_json"] = (["vllm", str(tmp / "bad_json.jsonl"), "--num-experts", "8"], "not valid JSON")
    big = tmp / "oversized.json"
    big.write_text(json.dumps(_vllm_response()) + " " * 4096)
    cases["oversized_input"] = (["vllm", str(big), "--num-experts", "8", "--max-mb", "0.001"], "input limit")

    # SGLang
    raw = ef.sglang_generate("r", 3, [1, 2], ef.routing("g", 4, 2, 2, 8))
    raw["meta_info"]["routed_experts"] = base64.b64encode(base64.b64decode(raw["meta_info"]["routed_experts"])[:-2]).decode()
    (tmp / "gen_partial.json").write_text(json.dumps(raw))
    cases["sglang_partial_value"] = (["sglang", str(tmp / "gen_partial.json"), "--num-experts", "8", "--top-k", "2"],
                                     "whole number")
    marker = tmp / "pwned"
    (tmp / "evil.pt").write_bytes(pickle.dumps({"logical_count": _RunsACommand(marker)}))
    cases["pickle_with_non_tensor_object"] = (["sglang", str(tmp / "evil.pt"), "--top-k", "2"], "refusing to unpickle")
    import torch

    torch.save({"rank": 0, "logical_count": "not a tensor"}, tmp / "string_count.pt")
    cases["dump_field_not_a_tensor"] = (["sglang", str(tmp / "string_count.pt"), "--top-k", "2"], "should be a tensor")
    ef.sglang_stat_dump(tmp / "whole.pt", np.ones((2, 2, 4), dtype=int))
    data = (tmp / "whole.pt").read_bytes()
    (tmp / "truncated.pt").write_bytes(data[: len(data) // 2])
    cases["truncated_dump"] = (["sglang", str(tmp / "truncated.pt"), "--top-k", "2"], "not a readable torch.save file")
    topk = np.full((2, 3, 8), -1)
    topk[:, :, :2] = [0, 1]  # 3 tokens of routing for a pass of 2 input ids
    ef.sglang_detail_dump(tmp / "shapes.pt", [{"forward_pass_id": 0, "rank": 0, "input_ids": [1, 2], "positions": [0, 1],
                                               "extend_seq_lens": [2], "forward_mode": 1, "topk_ids_of_layer": topk}],
                          np.array([[0, 1], [1, 0]]))
    cases["per_token_mismatched_shapes"] = (["sglang", str(tmp / "shapes.pt")], "mismatched shapes")

    # Megatron
    mdir = tmp / "megatron"
    mdir.mkdir()
    record = ef.megatron_record(0, 1, 0, np.array([[0, 1], [2, 3]]))
    record["num_tokens"] = 3
    (mdir / "router_trace_rank0.jsonl").write_text(json.dumps(record) + "\n")
    cases["megatron_mismatched_shapes"] = (["megatron", str(mdir), "--num-experts", "8"], "mismatched shapes")
    sdir = tmp / "sidecar"
    sdir.mkdir()
    record = ef.megatron_record(0, 1, 0, np.array([[0, 1], [2, 3]]), logit_offset=64, logit_bytes=32, logit_shape=[2, 8])
    (sdir / "router_trace_rank0.jsonl").write_text(json.dumps(record) + "\n")
    (sdir / "logits_rank0.bin").write_bytes(b"\0" * 40)
    cases["megatron_sidecar_past_end"] = (["megatron", str(sdir), "--num-experts", "8"], "past the end of the sidecar")
    return cases


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[list[str], str]]]:
    tmp = tmp_path_factory.mktemp("bad_inputs")
    return tmp, _cases(tmp)


CASES = [
    "truncated_base64", "truncated_npy_data", "wrong_npy_header", "not_npy", "npy_with_pickled_objects",
    "mismatched_shapes", "expert_past_num_experts", "not_a_response", "no_routed_experts", "bad_json",
    "oversized_input", "sglang_partial_value", "pickle_with_non_tensor_object", "dump_field_not_a_tensor",
    "truncated_dump", "per_token_mismatched_shapes", "megatron_mismatched_shapes", "megatron_sidecar_past_end",
]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_line_exit_1(name: str, corpus: Any, capsys: pytest.CaptureFixture[str]) -> None:
    tmp, cases = corpus
    argv, needle = cases[name]
    out = tmp / f"trace_{name}"
    assert cli(["import", *argv, "-o", str(out)]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("moeprobe import: ") and needle in lines[0], lines[0]
    assert "Traceback" not in err
    # the message names the file (or directory) at fault
    assert Path(argv[1]).name in lines[0]
    # nothing was written: no half-made trace left behind
    assert not out.exists()
    if name == "pickle_with_non_tensor_object":
        assert not (tmp / "pwned").exists()


def test_bad_input_in_a_subprocess_is_one_line(corpus: Any) -> None:
    """The same through the installed entry point: stderr one line, status 1, no traceback."""
    tmp, cases = corpus
    for name in ("wrong_npy_header", "pickle_with_non_tensor_object"):
        argv, needle = cases[name]
        result = subprocess.run([PYTHON, "-m", "moeprobe", "import", *argv, "-o", str(tmp / "sub")],
                                capture_output=True, text=True, env=run_cli_env(), timeout=120)
        assert result.returncode == 1
        assert len(result.stderr.strip().splitlines()) == 1 and needle in result.stderr, result.stderr
    assert not (tmp / "pwned").exists()


def test_a_bad_file_after_good_ones_leaves_an_aborted_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Rows from the files read before the bad one stay readable; the manifest says the import was aborted."""
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(_vllm_response()))
    bad.write_text(json.dumps(_vllm_response(token_ids=[6])))
    assert cli(["import", "vllm", str(good), str(bad), "-o", str(tmp_path / "t"), "--num-experts", "8"]) == 1
    assert "mismatched shapes" in capsys.readouterr().err
    from moeprobe import open_trace

    with open_trace(tmp_path / "t") as t:
        assert t.status == "aborted" and "mismatched shapes" in t.manifest["shards"][0]["error"]
        assert t.sql("SELECT count(*) AS n FROM routing").to_pylist() == [{"n": 7 * 2 * 2}]
