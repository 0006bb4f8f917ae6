"""Files and payloads in each engine's documented routing format, built from routing the test controls.

Every builder follows the engine source cited in docs/engines.md; the importers' tests compare the trace they
write row by row with the arrays given here.
"""

from __future__ import annotations

import base64
import io
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np


def routing(key: str, tokens: int, layers: int, top_k: int, experts: int) -> np.ndarray:
    """(tokens, layers, top_k) distinct expert ids per row, the same for the same key."""
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    out = np.empty((tokens, layers, top_k), dtype=np.int64)
    for t in range(tokens):
        for layer in range(layers):
            out[t, layer] = rng.choice(experts, size=top_k, replace=False)
    return out


def npy_b64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# -- vLLM (vllm/entrypoints/openai/protocol.py: CompletionResponseChoice.routed_experts) -----------------
def vllm_dtype(experts: int) -> type:
    return np.uint8 if experts <= 256 else np.uint16


def vllm_completion(
    rid: str, prompt_ids: list[int], completion_ids: list[int], rows: np.ndarray, *, experts: int, model: str = "tiny-moe"
) -> dict[str, Any]:
    """A non-streaming /v1/completions response; ``rows`` covers positions start .. P + C - 2."""
    return {
        "id": rid,
        "object": "text_completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": "".join(f"<{t}>" for t in completion_ids),
                "finish_reason": "length",
                "token_ids": completion_ids,
                "prompt_token_ids": prompt_ids,
                "routed_experts": npy_b64(rows.astype(vllm_dtype(experts))),
            }
        ],
        "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": len(completion_ids),
                  "total_tokens": len(prompt_ids) + len(completion_ids)},
    }


def vllm_stream(response: dict[str, Any], chunk_rows: int = 3) -> list[str]:
    """The same response as SSE ``data:`` lines: token ids and routed_experts delivered in chunks."""
    choice = response["choices"][0]
    blob = base64.b64decode(choice["routed_experts"])
    rows = np.load(io.BytesIO(blob), allow_pickle=False)
    ids = choice["token_ids"]
    lines = []
    pieces = max(len(ids), (len(rows) + chunk_rows - 1) // chunk_rows)
    for i in range(pieces):
        part: dict[str, Any] = {"index": 0, "text": "", "token_ids": ids[i : i + 1]}
        if i == 0:
            part["prompt_token_ids"] = choice["prompt_token_ids"]
        chunk_routing = rows[i * chunk_rows : (i + 1) * chunk_rows]
        if len(chunk_routing):
            part["routed_experts"] = npy_b64(chunk_routing)
        if i == pieces - 1:
            part["finish_reason"] = "length"
        chunk = {"id": response["id"], "object": "text_completion", "created": 0, "model": response["model"],
                 "choices": [part]}
        lines.append("data: " + json.dumps(chunk))
    lines.append("data: " + json.dumps({"id": response["id"], "object": "text_completion", "created": 0,
                                        "model": response["model"], "choices": [], "usage": response["usage"]}))
    lines.append("data: [DONE]")
    return lines


# -- SGLang /generate (meta_info.routed_experts: raw buffer, reshape(-1, layers, top_k)) -------------------
def sglang_generate(rid: str, prompt_tokens: int, output_ids: list[int], rows: np.ndarray, dtype: str = "int32",
                    with_dtype: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "id": rid,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(output_ids),
        "routed_experts": base64.b64encode(np.ascontiguousarray(rows.astype(dtype)).tobytes()).decode("ascii"),
    }
    if with_dtype:
        meta["routed_experts_dtype"] = dtype
    return {"text": "", "output_ids": output_ids, "meta_info": meta}


# -- SGLang expert distribution recorder dumps (python/sglang/srt/eplb/expert_distribution.py) -------------
def sglang_stat_dump(path: Path, logical_count: np.ndarray, rank: int = 0) -> None:
    import torch

    torch.save({"rank": rank, "logical_count": torch.tensor(logical_count, dtype=torch.int32),
                "average_utilization_rate_over_window": None}, path)


def sglang_detail_dump(path: Path, records: list[dict[str, Any]], physical_to_logical: np.ndarray) -> None:
    """per_pass / per_token dump: tensors in records stay tensors, as ``_DetailAccumulator.append`` keeps them."""
    import torch

    def tensors(record: dict[str, Any]) -> dict[str, Any]:
        return {k: torch.tensor(v, dtype=torch.int32) if isinstance(v, np.ndarray) else v for k, v in record.items()}

    torch.save({"records": [tensors(r) for r in records],
                "last_physical_to_logical_map": torch.tensor(physical_to_logical, dtype=torch.int64)}, path)


# -- Megatron-Core router trace (megatron/core/transformer/moe/router_trace.py) -----------------------------
def megatron_record(step: int, layer: int, rank: int, ids: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {"step": step, "stage": "pre_dispatch", "block": "decoder", "layer": layer, "rank": rank,
            "num_tokens": int(ids.shape[0]), "topk": int(ids.shape[1]), "top_indices": ids.tolist(), **extra}


def bf16_bytes(values: np.ndarray) -> bytes:
    """float32 -> bf16 by truncation (the top 16 bits), little-endian, as the tracer's int16 view writes them."""
    return (np.asarray(values, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()


# -- one imported trace per source, for the report / TUI / simulate tests ------------------------------------
def imported_traces(root: Path) -> dict[str, Path]:
    """Import a small file of every source through ``moeprobe import``; name -> trace directory."""
    from moeprobe.cli.main import main as cli

    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}

    def run(name: str, *argv: str) -> None:
        out[name] = root / name
        assert cli(["import", *argv, "-o", str(out[name])]) == 0, name

    lines = []
    for i in range(6):
        prompt = list(range(1, 6 + i))
        rows = routing(f"v{i}", len(prompt) + 4 - 1, 2, 2, 8)
        lines.append(json.dumps(vllm_completion(f"cmpl-{i}", prompt, [100, 101, 102, 103], rows, experts=8)))
    (root / "vllm.jsonl").write_text("\n".join(lines) + "\n")
    run("vllm", "vllm", str(root / "vllm.jsonl"), "--num-experts", "8", "--tag", "domain=code")

    gens = [sglang_generate(f"g{i}", 5, [7, 8, 9], routing(f"g{i}", 7, 2, 2, 8)) for i in range(5)]
    (root / "generate.jsonl").write_text("".join(json.dumps(g) + "\n" for g in gens))
    run("sglang_generate", "sglang", str(root / "generate.jsonl"), "--num-experts", "8", "--top-k", "2")

    rng = np.random.default_rng(3)
    count = rng.integers(0, 9, size=(12, 2, 8))
    count[:, :, 0] *= 4  # expert 0 hot: a placement has something to fix
    sglang_stat_dump(root / "stat.pt", count)
    run("sglang_stat", "sglang", str(root / "stat.pt"), "--top-k", "2")

    mapping = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 0, 3], [7, 6, 5, 4, 3, 2, 1, 0, 1, 2]])
    records = [{"forward_pass_id": i, "rank": 0, "gatherer_key": "primary",
                "global_physical_count": rng.integers(0, 6, size=(2, 10))} for i in range(8)]
    sglang_detail_dump(root / "per_pass.pt", records, mapping)
    run("sglang_per_pass", "sglang", str(root / "per_pass.pt"), "--top-k", "2")

    topk = np.full((2, 6, 8), -1)
    topk[:, :, :2] = np.stack([rng.permutation(10)[:2] for _ in range(12)]).reshape(2, 6, 2)
    token_records = [{"forward_pass_id": 0, "rank": 0, "gatherer_key": "primary", "input_ids": [3, 4, 5, 6, 7, 8],
                      "positions": [0, 1, 2, 0, 1, 2], "extend_seq_lens": [3, 3], "forward_mode": 1,
                      "topk_ids_of_layer": topk}]
    sglang_detail_dump(root / "per_token.pt", token_records, mapping)
    run("sglang_per_token", "sglang", str(root / "per_token.pt"))

    mdir = root / "megatron_input"
    mdir.mkdir(exist_ok=True)
    for rank in (0, 1):
        recs = [megatron_record(step, layer, rank, routing(f"mg{rank}{step}{layer}", 6, 1, 2, 8)[:, 0, :])
                for step in range(4) for layer in (1, 2)]
        (mdir / f"router_trace_rank{rank}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    run("megatron", "megatron", str(mdir), "--num-experts", "8")
    return out
