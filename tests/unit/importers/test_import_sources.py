"""Each engine's documented format in, a trace out, checked row by row against the routing it was built from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moeprobe import open_trace
from moeprobe.cli.main import main as cli
from tests import engine_formats as ef


def _import(*argv: str) -> None:
    assert cli(["import", *argv]) == 0


def _rows(trace: Path, sequence: int) -> dict[str, np.ndarray]:
    with open_trace(trace) as t:
        got = t.sql(
            "SELECT position, layer, k, expert, token_id, phase, weight, step FROM routing "
            f"WHERE sequence = {sequence} ORDER BY position, layer, k"
        ).to_pydict()
    return {key: np.asarray(values) for key, values in got.items()}


def _expected(rows: np.ndarray, start: int) -> dict[str, np.ndarray]:
    """Flattened (position, layer, k, expert) of a (tokens, layers, k) routing whose first row is at ``start``,
    padding (-1) left out."""
    t, layer, k = np.nonzero(rows >= 0)
    return {"position": t + start, "layer": layer, "k": k, "expert": rows[t, layer, k]}


def _check(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    for key, values in want.items():
        np.testing.assert_array_equal(got[key], values, err_msg=key)


# -- vLLM ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("layers", "top_k", "experts"), [(3, 1, 8), (2, 2, 16), (4, 8, 300)])
@pytest.mark.parametrize("stream", [False, True])
def test_vllm_responses_row_by_row(tmp_path: Path, layers: int, top_k: int, experts: int, stream: bool) -> None:
    # Three requests; the second asked for routing from prompt position 2 on (routed_experts_prompt_start = 2).
    cases = [("cmpl-a", 5, 4, 0), ("cmpl-b", 6, 3, 2), ("cmpl-c", 1, 6, 0)]
    lines, built = [], []
    for rid, prompt, completion, start in cases:
        prompt_ids = list(range(10 * len(built) + 1, 10 * len(built) + 1 + prompt))
        completion_ids = list(range(1000 + 10 * len(built), 1000 + 10 * len(built) + completion))
        rows = ef.routing(rid, prompt + completion - 1 - start, layers, top_k, experts)
        response = ef.vllm_completion(rid, prompt_ids, completion_ids, rows, experts=experts)
        lines += ef.vllm_stream(response) if stream else [json.dumps(response)]
        built.append((rid, prompt_ids + completion_ids, prompt, start, rows))
    source = tmp_path / ("stream.txt" if stream else "responses.jsonl")
    source.write_text("\n".join(lines) + "\n")
    # the npy header says the dtype: uint8 up to 256 experts, uint16 past that
    assert ef.vllm_dtype(experts) is (np.uint16 if experts > 256 else np.uint8)
    _import("vllm", str(source), "-o", str(tmp_path / "t"), "--num-experts", str(experts), "--tag", "domain=code")

    for sequence, (_rid, ids, prompt, start, rows) in enumerate(built):
        got = _rows(tmp_path / "t", sequence)
        want = _expected(rows, start)
        _check(got, want)
        np.testing.assert_array_equal(got["token_id"], np.asarray(ids)[want["position"]])
        np.testing.assert_array_equal(got["phase"], np.where(want["position"] < prompt, "prefill", "decode"))
        assert all(w is None or np.isnan(w) for w in got["weight"])  # vLLM gives ids only: weight is null
        assert set(got["step"]) == {sequence}
    with open_trace(tmp_path / "t") as t:
        tags = t.sql("SELECT sequence, key, value FROM tags ORDER BY sequence, key").to_pylist()
        assert {"sequence": 1, "key": "request_id", "value": "cmpl-b"} in tags
        assert {"sequence": 2, "key": "domain", "value": "code"} in tags
        assert t.sql("SELECT count(*) AS n FROM routing WHERE weight IS NOT NULL").to_pylist() == [{"n": 0}]
        m = t.manifest
        assert m["source"]["engine"] == "vllm" and m["source"]["files"] == [str(source)]
        # Imports write the current format (routing one row per token); their null weights stay null.
        assert m["format_version"] == 2 and m["encoding"]["routing"]["layout"] == "per_token"
        assert m["model"]["name"] == "tiny-moe" and m["options"]["mode"] == "tokens" and t.mode == "tokens"
        assert [(layer["num_experts"], layer["top_k"]) for layer in m["layers"]] == [(experts, top_k)] * layers
        assert m["status"] == "complete"


# -- SGLang /generate ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("dtype", "with_dtype", "shape_flag"), [
    ("int32", False, ("--top-k", "2")),  # no dtype field: SGLang's int32
    ("int16", True, ("--num-layers", "3")),
    ("int64", True, ("--top-k", "2")),
])
def test_sglang_generate_row_by_row(tmp_path: Path, dtype: str, with_dtype: bool, shape_flag: tuple[str, str]) -> None:
    responses = []
    built = []
    for i, (prompt, completion) in enumerate([(4, 3), (2, 5)]):
        rows = ef.routing(f"s{i}", prompt + completion - 1, 3, 2, 12)
        output_ids = list(range(500 + 10 * i, 500 + 10 * i + completion))
        responses.append(ef.sglang_generate(f"req-{i}", prompt, output_ids, rows, dtype, with_dtype))
        built.append((rows, prompt, output_ids))
    source = tmp_path / "generate.json"
    source.write_text(json.dumps(responses))
    _import("sglang", str(source), "-o", str(tmp_path / "t"), "--num-experts", "12", *shape_flag)
    for sequence, (rows, prompt, output_ids) in enumerate(built):
        got = _rows(tmp_path / "t", sequence)
        want = _expected(rows, 0)
        _check(got, want)
        # prompt ids are not in the response (-1); position prompt + i holds generated token i
        expect_ids = np.where(want["position"] < prompt, -1, np.asarray([0] * prompt + output_ids)[want["position"]])
        np.testing.assert_array_equal(got["token_id"], expect_ids)
        np.testing.assert_array_equal(got["phase"], np.where(want["position"] < prompt, "prefill", "decode"))


# -- SGLang recorder dumps ------------------------------------------------------------------------------------
def test_sglang_stat_dump_fills_loads(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    count = rng.integers(0, 5, size=(6, 2, 8))
    count[2, 1, :] = 0  # a step with nothing in one layer: no rows
    ef.sglang_stat_dump(tmp_path / "stat.pt", count)
    _import("sglang", str(tmp_path / "stat.pt"), "-o", str(tmp_path / "t"), "--top-k", "2")
    with open_trace(tmp_path / "t") as t:
        assert t.mode == "counts" and t.manifest["options"]["mode"] == "counts"
        assert t.sql("SELECT count(*) AS n FROM routing").to_pylist() == [{"n": 0}]
        got = t.sql("SELECT step, layer, expert, tokens, phase, rank FROM loads ORDER BY step, layer, expert").to_pydict()
    step, layer, expert = np.nonzero(count)
    np.testing.assert_array_equal(got["step"], step)
    np.testing.assert_array_equal(got["layer"], layer)
    np.testing.assert_array_equal(got["expert"], expert)
    np.testing.assert_array_equal(got["tokens"], count[step, layer, expert])
    assert set(got["rank"]) == {0}


def test_sglang_per_pass_maps_physical_to_logical(tmp_path: Path) -> None:
    # 6 physical slots for 4 logical experts: slots 4 and 5 replicate experts 1 and 3 (physical != logical).
    mapping = np.array([[0, 1, 2, 3, 1, 3], [3, 2, 1, 0, 0, 2]])
    physical = [np.array([[1, 2, 0, 4, 3, 5], [0, 0, 7, 1, 2, 0]]), np.array([[0, 1, 1, 0, 0, 2], [5, 0, 0, 0, 1, 1]])]
    records = [{"forward_pass_id": i, "rank": 0, "gatherer_key": "primary", "global_physical_count": p}
               for i, p in enumerate(physical)]
    ef.sglang_detail_dump(tmp_path / "pass.pt", records, mapping)
    _import("sglang", str(tmp_path / "pass.pt"), "-o", str(tmp_path / "t"), "--top-k", "2")
    with open_trace(tmp_path / "t") as t:
        assert t.mode == "counts"
        got = t.sql("SELECT step, layer, expert, tokens FROM loads ORDER BY ALL").to_pylist()
    want = []
    for step, p in enumerate(physical):
        logical = np.zeros((2, 4), dtype=int)
        for layer in range(2):
            for slot in range(6):
                logical[layer, mapping[layer, slot]] += p[layer, slot]
        want += [{"step": step, "layer": layer, "expert": e, "tokens": int(logical[layer, e])}
                 for layer in range(2) for e in range(4) if logical[layer, e]]
    assert got == want


def test_sglang_per_token_dump_maps_ids_and_skips_padding(tmp_path: Path) -> None:
    mapping = np.array([[0, 1, 2, 3, 0, 2], [2, 3, 0, 1, 1, 3]])  # 6 physical, 4 logical
    # pass 0: prefill (EXTEND = 1) of two sequences of 3 and 2 tokens; pass 1: decode (DECODE = 2) of both
    topk0 = np.full((2, 5, 8), -1)
    topk0[:, :, :2] = np.arange(20).reshape(2, 5, 2) % 6  # top-2 in an 8-wide buffer, -1 padded
    topk1 = np.full((2, 2, 8), -1)
    topk1[:, :, :2] = [[[5, 4], [3, 2]], [[1, 0], [4, 5]]]
    records = [
        {"forward_pass_id": 0, "rank": 0, "gatherer_key": "primary", "input_ids": [11, 12, 13, 21, 22],
         "positions": [0, 1, 2, 0, 1], "extend_seq_lens": [3, 2], "forward_mode": 1, "topk_ids_of_layer": topk0},
        {"forward_pass_id": 1, "rank": 0, "gatherer_key": "primary", "input_ids": [14, 23],
         "positions": [3, 2], "extend_seq_lens": None, "forward_mode": 2, "topk_ids_of_layer": topk1},
    ]
    ef.sglang_detail_dump(tmp_path / "tok.pt", records, mapping)
    _import("sglang", str(tmp_path / "tok.pt"), "-o", str(tmp_path / "t"))
    with open_trace(tmp_path / "t") as t:
        assert t.mode == "tokens"
        # the recorder's buffer is 8 wide; the model's top-k is the most ids a token has
        assert [(m["num_experts"], m["top_k"]) for m in t.layers] == [(4, 2), (4, 2)]
        got = t.sql("SELECT step, sequence, position, token_id, phase, layer, k, expert FROM routing "
                    "ORDER BY step, sequence, position, layer, k").to_pylist()
    want = []
    for step, (record, topk, slots) in enumerate([(records[0], topk0, [0, 0, 0, 1, 1]), (records[1], topk1, [0, 1])]):
        first_sequence = 0 if step == 0 else 2
        for token in range(topk.shape[1]):
            for layer in range(2):
                for k in range(8):
                    physical = topk[layer, token, k]
                    if physical < 0:
                        continue
                    want.append({"step": step, "sequence": first_sequence + slots[token],
                                 "position": record["positions"][token], "token_id": record["input_ids"][token],
                                 "phase": "decode" if step == 1 else "prefill", "layer": layer, "k": k,
                                 "expert": int(mapping[layer, physical])})
    want.sort(key=lambda r: (r["step"], r["sequence"], r["position"], r["layer"], r["k"]))
    assert got == want


# -- Megatron-Core --------------------------------------------------------------------------------------------
def test_megatron_two_ranks_with_logits_sidecar(tmp_path: Path) -> None:
    trace_dir = tmp_path / "router_traces"
    trace_dir.mkdir()
    built: dict[tuple[int, int, int], np.ndarray] = {}
    logits: dict[tuple[int, int, int], np.ndarray] = {}
    for rank in (0, 1):
        lines, sidecar = [], b""
        for step in range(3):
            for layer in (1, 3):  # MoE layers 1 and 3 of the decoder (0 and 2 are dense)
                ids = ef.routing(f"m{rank}{step}{layer}", 4 + step, 1, 2, 8)[:, 0, :]
                built[(rank, step, layer)] = ids
                extra = {}
                if rank == 1:
                    values = np.random.default_rng(step * 10 + layer).normal(size=(len(ids), 8)).astype(np.float32)
                    raw = ef.bf16_bytes(values)
                    extra = {"logit_offset": len(sidecar), "logit_bytes": len(raw), "logit_shape": [len(ids), 8]}
                    logits[(rank, step, layer)] = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
                    sidecar += raw
                lines.append(json.dumps(ef.megatron_record(step, layer, rank, ids, **extra)))
        (trace_dir / f"router_trace_rank{rank}.jsonl").write_text("\n".join(lines) + "\n")
        if sidecar:
            (trace_dir / f"logits_rank{rank}.bin").write_bytes(sidecar)
    _import("megatron", str(trace_dir), "-o", str(tmp_path / "t"), "--num-experts", "8")
    with open_trace(tmp_path / "t") as t:
        assert [m["name"] for m in t.layers] == ["decoder.layers.1", "decoder.layers.3"]
        assert sorted(t.reader.shards) == [0, 1] and t.manifest["world_size"] == 2
        for (rank, step, layer), ids in built.items():
            got = t.sql(f"SELECT position, k, expert FROM routing WHERE rank = {rank} AND step = {step} "
                        f"AND layer = {[1, 3].index(layer)} ORDER BY position, k").to_pydict()
            t_idx, k_idx = np.nonzero(ids >= 0)
            np.testing.assert_array_equal(got["position"], t_idx)
            np.testing.assert_array_equal(got["k"], k_idx)
            np.testing.assert_array_equal(got["expert"], ids[t_idx, k_idx])
        for (rank, step, layer), values in logits.items():
            got = t.sql(f"SELECT scores FROM scores WHERE rank = {rank} AND step = {step} "
                        f"AND layer = {[1, 3].index(layer)} ORDER BY position").to_pydict()["scores"]
            np.testing.assert_array_equal(np.asarray(got, np.float32).reshape(-1), values)
        # one step's tokens counted once, not once per layer record
        assert t.manifest["counters"]["tokens"] == sum(4 + step for step in range(3)) * 2
