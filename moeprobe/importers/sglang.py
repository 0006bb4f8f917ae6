"""SGLang: ``/generate`` responses with ``return_routed_experts`` and the expert distribution recorder's dumps.

Formats (sgl-project/sglang, python/sglang/srt/eplb/expert_distribution.py and the routed-experts capturer):

- ``/generate`` with ``"return_routed_experts": true`` (server flag ``--enable-return-routed-experts``):
  ``meta_info.routed_experts`` is base64 of the raw id buffer (no header), dtype ``meta_info.routed_experts_dtype``
  (int32 when absent), read as ``reshape(-1, num_layers, top_k)`` with one row per token but the last
  (``prompt_tokens + completion_tokens - 1`` rows). The buffer carries no shape: give ``--num-layers`` or
  ``--top-k``. Token ids of the completion come from ``output_ids`` when present; prompt ids are not returned.
- ``/dump_expert_distribution_record`` files (``torch.save``; loaded with ``weights_only=True``), by
  ``--expert-distribution-recorder-mode``:
  ``stat``: ``{"rank", "logical_count": [steps, layers, logical experts], ...}`` -> the ``loads`` table;
  ``per_pass``: ``{"records": [{"forward_pass_id", "rank", "global_physical_count": [layers, physical]}, ...],
  "last_physical_to_logical_map": [layers, physical]}`` -> ``loads`` (physical counts summed per logical expert);
  ``per_token``: records with ``input_ids``, ``positions``, ``extend_seq_lens``, ``forward_mode`` and
  ``topk_ids_of_layer`` [layers, tokens, 8] physical ids, -1 padded -> ``routing`` (ids mapped to logical).

A per-token record has no request ids (the recorder leaves them out), so each batch slot of a forward pass is its
own sequence; ``forward_mode`` 2 (DECODE) is ``decode``, every other mode ``prefill``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

from . import decode
from .errors import ImportInputError
from .sink import TraceSink, layer_entries, phase_codes

FORWARD_MODE_DECODE = 2  # sglang ForwardMode: EXTEND = 1, DECODE = 2, MIXED = 3, IDLE = 4 (enum auto())


# -- /generate responses ----------------------------------------------------------------------------------
def _count(value: object) -> TypeGuard[int]:
    """A token count: a non-negative int (JSON true is an int to Python, not a count)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def write_generate_response(
    sink: TraceSink,
    response: dict[str, Any],
    where: str,
    *,
    step: int,
    first_sequence: int,
    num_experts: int,
    num_layers: int | None,
    top_k: int | None,
    limit: int,
    tags: dict[str, str] | None = None,
) -> int:
    items = response if isinstance(response, list) else [response]
    for offset, item in enumerate(items):
        meta = item.get("meta_info") if isinstance(item, dict) else None
        if not isinstance(meta, dict):
            raise ImportInputError(f"{where}: no 'meta_info' object (not an SGLang /generate response)")
        blob = meta.get("routed_experts")
        if blob is None:
            raise ImportInputError(
                f"{where}: meta_info has no routed_experts (start SGLang with --enable-return-routed-experts and "
                "request \"return_routed_experts\": true)"
            )
        prompt, completion = meta.get("prompt_tokens"), meta.get("completion_tokens")
        if not (_count(prompt) and _count(completion)):
            raise ImportInputError(f"{where}: meta_info needs integer prompt_tokens and completion_tokens")
        rows = max(prompt + completion - 1, 0)
        experts = decode.raw(
            decode.b64(blob, f"{where}: routed_experts", limit), meta.get("routed_experts_dtype", "int32"),
            f"{where}: routed_experts", tokens=rows, layers=num_layers, top_k=top_k,
        )
        _, layers, k = experts.shape
        sink.set_layers(layer_entries(layers, num_experts, k), where)
        position = np.arange(rows)
        token_id = np.full(rows, -1, dtype=np.int64)
        output_ids = item.get("output_ids")
        if isinstance(output_ids, list) and all(isinstance(v, int) for v in output_ids):
            # position prompt + i holds generated token i (the last one has no row)
            generated = np.asarray(output_ids[: max(rows - prompt, 0)], dtype=np.int64)
            token_id[prompt : prompt + len(generated)] = generated
        sequence = first_sequence + offset
        sink.add_tokens(
            rank=0, step=step, sequence=sequence, position=position, token_id=token_id,
            phase=phase_codes(position, prompt), experts=experts, where=where,
        )
        sink.add_tags(rank=0, sequence=sequence, tags={"request_id": str(meta.get("id", "")), **(tags or {})})
    return len(items)


# -- recorder dumps ----------------------------------------------------------------------------------------
def load_dump(path: Path, limit: int) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` after a size check; anything else in the pickle is refused by torch."""
    data = decode.read_bytes(path, limit)  # size-checked read; torch then parses these bytes, not the path
    try:
        import io

        import torch
    except ImportError:
        raise ImportInputError(f"{path}: reading SGLang .pt dumps needs torch (pip install 'moeprobe[torch]')") from None
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr: the error says it all
            warnings.simplefilter("ignore")
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, EOFError, ValueError... for damaged files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # weights_only refuses anything but tensors and plain containers with pickle.UnpicklingError (matched by
        # name: this module does not import pickle at all)
        if type(exc).__name__ == "UnpicklingError":
            raise ImportInputError(f"{path}: not a weights-only torch file, refusing to unpickle it ({first[:200]})") from None
        raise ImportInputError(f"{path}: not a readable torch.save file ({type(exc).__name__}: {first[:200]})") from None
    if not isinstance(payload, dict):
        raise ImportInputError(f"{path}: expected the recorder's dict, found {type(payload).__name__}")
    return payload


def _array(value: Any, where: str, field: str, ndim: int) -> np.ndarray:
    import torch

    if not isinstance(value, torch.Tensor):
        raise ImportInputError(f"{where}: '{field}' should be a tensor, found {type(value).__name__}")
    if value.dim() != ndim or value.is_floating_point() or value.is_complex():
        raise ImportInputError(f"{where}: '{field}' should be a {ndim}-d integer tensor, found {value.dim()}-d {value.dtype}")
    return value.numpy()


def dump_kind(payload: dict[str, Any]) -> str:
    if "logical_count" in payload:
        return "stat"
    records = payload.get("records")
    if isinstance(records, list) and records and isinstance(records[0], dict) and "topk_ids_of_layer" in records[0]:
        return "per_token"
    if isinstance(records, list):
        return "per_pass"
    return "unknown"


def dump_layers(payload: dict[str, Any], where: str, top_k: int | None) -> tuple[list[dict[str, Any]], str, np.ndarray | None]:
    """Layer entries, the mode, and the physical -> logical map (per_pass / per_token) of one dump."""
    kind = dump_kind(payload)
    if kind in ("stat", "per_pass") and top_k is None:
        raise ImportInputError(f"{where}: a {kind} dump holds counts only and does not say top-k: give --top-k")
    if kind == "stat":
        count = _array(payload["logical_count"], where, "logical_count", 3)
        return layer_entries(count.shape[1], count.shape[2], int(top_k or 1)), kind, None
    if kind == "unknown":
        raise ImportInputError(f"{where}: not an SGLang expert distribution dump (no logical_count or records)")
    mapping = _array(payload.get("last_physical_to_logical_map"), where, "last_physical_to_logical_map", 2).astype(np.int64)
    if (mapping < 0).any():
        raise ImportInputError(f"{where}: last_physical_to_logical_map holds a negative expert id")
    logical = int(mapping.max()) + 1 if mapping.size else 0  # every logical expert has at least one physical slot
    if kind == "per_token":
        # The recorder's buffer is 8 wide (DeepSeek-V3's top-k) whatever the model's top-k; the real top-k is
        # the most non-padding ids any token has.
        k = 1
        for i, record in enumerate(payload["records"]):
            if isinstance(record, dict):
                ids = _array(record.get("topk_ids_of_layer"), where, f"records[{i}].topk_ids_of_layer", 3)
                if ids.size:
                    k = max(k, int((ids >= 0).sum(axis=2).max()))
        return layer_entries(mapping.shape[0], logical, top_k or k), kind, mapping
    return layer_entries(mapping.shape[0], logical, int(top_k or 1)), kind, mapping


def write_dump(sink: TraceSink, payload: dict[str, Any], where: str, *, first_step: int, first_sequence: int,
               top_k: int | None) -> tuple[int, int]:
    """Write one dump; returns (steps used, sequences used)."""
    layers, kind, mapping = dump_layers(payload, where, top_k)
    sink.set_layers(layers, where)
    if kind == "stat":
        count = _array(payload["logical_count"], where, "logical_count", 3)
        rank = _rank(payload.get("rank", 0), where)
        for i in range(count.shape[0]):
            sink.add_loads(rank=rank, step=first_step + i, phase="prefill", counts=count[i], where=f"{where} step {i}")
        return count.shape[0], 0
    assert mapping is not None
    records = payload["records"]
    sequences = 0
    for i, record in enumerate(records):
        at = f"{where} records[{i}]"
        if not isinstance(record, dict):
            raise ImportInputError(f"{at}: should be a dict")
        rank = _rank(record.get("rank", 0), at)
        step = first_step + i
        if kind == "per_pass":
            physical = _array(record.get("global_physical_count"), at, "global_physical_count", 2).astype(np.int64)
            if physical.shape != mapping.shape:
                raise ImportInputError(f"{at}: global_physical_count {physical.shape} does not match the map {mapping.shape}")
            logical = np.zeros((mapping.shape[0], int(layers[0]["num_experts"])), dtype=np.int64)
            np.add.at(logical, (np.arange(mapping.shape[0])[:, None], mapping), physical)
            sink.add_loads(rank=rank, step=step, phase="prefill", counts=logical, where=at)
        else:
            sequences += _write_per_token(sink, record, at, rank=rank, step=step, first_sequence=first_sequence + sequences,
                                          mapping=mapping)
    return len(records), sequences


def _rank(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 16:
        raise ImportInputError(f"{where}: 'rank' should be a small non-negative integer, found {value!r}")
    return value


def _int_list(value: Any, where: str, field: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ImportInputError(f"{where}: '{field}' should be a list of integers")
    return value


def _write_per_token(sink: TraceSink, record: dict[str, Any], where: str, *, rank: int, step: int, first_sequence: int,
                     mapping: np.ndarray) -> int:
    input_ids = _int_list(record.get("input_ids"), where, "input_ids")
    positions = _int_list(record.get("positions"), where, "positions")
    topk = _array(record.get("topk_ids_of_layer"), where, "topk_ids_of_layer", 3).astype(np.int64)  # (L, T, 8)
    tokens = len(input_ids)
    if len(positions) != tokens or topk.shape[1] != tokens or topk.shape[0] != mapping.shape[0]:
        raise ImportInputError(
            f"{where}: {tokens} input_ids, {len(positions)} positions and topk_ids_of_layer {tuple(topk.shape)} "
            f"over {mapping.shape[0]} layers do not match (mismatched shapes)"
        )
    if (topk < -1).any() or (topk >= mapping.shape[1]).any():
        raise ImportInputError(f"{where}: topk_ids_of_layer holds a physical id outside 0..{mapping.shape[1] - 1}")
    decode_mode = record.get("forward_mode") == FORWARD_MODE_DECODE
    lens = record.get("extend_seq_lens")
    if decode_mode or lens is None:
        lens = [1] * tokens if decode_mode else [tokens]
    lens = _int_list(lens, where, "extend_seq_lens")
    if sum(lens) != tokens or any(n < 0 for n in lens):
        raise ImportInputError(f"{where}: extend_seq_lens sum to {sum(lens)}, the pass has {tokens} tokens")
    slot = np.repeat(np.arange(len(lens)), lens)
    layer_index = np.arange(mapping.shape[0])[:, None, None]
    logical = np.where(topk >= 0, mapping[layer_index, np.maximum(topk, 0)], -1)  # physical -> logical, keep padding
    phase = np.full(tokens, 1 if decode_mode else 0, dtype=np.int8)
    sink.add_tokens(
        rank=rank, step=step, sequence=first_sequence + slot, position=np.asarray(positions),
        token_id=np.asarray(input_ids), phase=phase, experts=logical.transpose(1, 0, 2), where=where,
    )
    return len(lens)
