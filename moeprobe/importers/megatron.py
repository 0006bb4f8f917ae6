"""Megatron-Core router traces: ``router_trace_rank{r}.jsonl`` from ``--moe-routing-trace-path`` (training and
inference), with the optional bf16 logits sidecar ``logits_rank{r}.bin`` (``--moe-routing-trace-capture-logits``).

Format (NVIDIA/Megatron-LM, megatron/core/transformer/moe/router_trace.py): one JSON record per (step, block,
layer): ``step``, ``stage``, ``block`` ("decoder" or "mtp", with ``mtp_idx``), ``layer`` (from the module name
``decoder.layers.N``), ``rank``, ``num_tokens``, ``topk``, ``top_indices`` [num_tokens][topk]; with the sidecar,
``logit_offset``, ``logit_bytes`` and ``logit_shape`` [num_tokens, num_experts] into the rank's ``.bin``.

Each distinct (block, mtp_idx, layer) becomes one moeprobe layer, in that order. Records carry no sequence ids and
no phase: a step's tokens form one sequence per rank (positions are row numbers), recorded as ``prefill``. Weights
are null (the tracer keeps indices only); logits, when captured, fill the ``scores`` table. The choice order ``k``
is the order Megatron wrote (by expert id when its router returns a routing map).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from . import decode
from .errors import ImportInputError
from .sink import TraceSink, layer_entries

_RANK_FILE = re.compile(r"router_trace_rank(\d+)\.jsonl$")


def expand(paths: list[Path]) -> list[tuple[int, Path]]:
    """(rank, file) for each ``router_trace_rank{r}.jsonl``; a directory stands for the ones in it."""
    found: list[tuple[int, Path]] = []
    for path in paths:
        candidates = sorted(path.glob("router_trace_rank*.jsonl")) if path.is_dir() else [path]
        if path.is_dir() and not candidates:
            raise ImportInputError(f"{path}: no router_trace_rank*.jsonl files in this directory")
        for file in candidates:
            match = _RANK_FILE.search(file.name)
            if not match:
                raise ImportInputError(f"{file}: not a Megatron router trace (expected router_trace_rank<N>.jsonl)")
            found.append((int(match.group(1)), file))
    return sorted(found)


def _int(record: dict[str, Any], key: str, where: str, minimum: int = 0) -> int:
    value = record.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ImportInputError(f"{where}: '{key}' should be an integer >= {minimum}, found {value!r}")
    return value


def read_records(path: Path, limit: int) -> list[tuple[str, dict[str, Any]]]:
    text = decode.read_text(path, limit)
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ImportInputError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise ImportInputError(f"{where}: expected a JSON object")
        out.append((where, record))
    return out


def _key(record: dict[str, Any]) -> tuple[str, int, int]:
    mtp = record.get("mtp_idx")
    return (str(record.get("block", "decoder")), -1 if mtp is None else int(mtp), int(record["layer"]))


def _name(key: tuple[str, int, int]) -> str:
    block, mtp, layer = key
    return f"decoder.layers.{layer}" if block == "decoder" else f"{block}.layers.{mtp}.layers.{layer}"


def _indices(record: dict[str, Any], where: str) -> np.ndarray:
    tokens = _int(record, "num_tokens", where)
    topk = _int(record, "topk", where, 1)
    rows = record.get("top_indices")
    if not isinstance(rows, list) or len(rows) != tokens:
        raise ImportInputError(f"{where}: top_indices should hold num_tokens={tokens} rows (mismatched shapes)")
    try:
        arr = np.asarray(rows, dtype=np.int64)
    except (ValueError, TypeError, OverflowError):
        raise ImportInputError(f"{where}: top_indices rows should be lists of {topk} integer expert ids") from None
    if tokens == 0:
        return np.zeros((0, topk), dtype=np.int64)
    if arr.shape != (tokens, topk):
        raise ImportInputError(f"{where}: top_indices has shape {arr.shape}, expected ({tokens}, {topk}) (mismatched shapes)")
    return arr.reshape(tokens, topk)


def _logits(record: dict[str, Any], where: str, sidecar: Path, size: int, tokens: int) -> np.ndarray:
    offset, length = _int(record, "logit_offset", where), _int(record, "logit_bytes", where)
    shape = record.get("logit_shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(v, int) and v > 0 for v in shape)):
        raise ImportInputError(f"{where}: logit_shape should be [num_tokens, num_experts], found {shape!r}")
    if shape[0] != tokens or shape[0] * shape[1] * 2 != length:
        raise ImportInputError(f"{where}: logit_shape {shape} does not match {length} bytes of bf16 for {tokens} tokens")
    if offset + length > size:
        raise ImportInputError(f"{sidecar}: record {where} reads past the end of the sidecar ({offset + length:,} > {size:,} bytes)")
    with open(sidecar, "rb") as handle:
        handle.seek(offset)
        raw = handle.read(length)
    # bf16 is the top half of a float32: widen by shifting the 16 bits up.
    return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)


def import_files(sink: TraceSink, paths: list[Path], *, num_experts: int | None, limit: int) -> None:
    files = expand(paths)
    parsed = [(rank, path, read_records(path, limit)) for rank, path in files]
    keys = sorted({_key(r) for _, _, recs in parsed for _, r in recs if "layer" in r and isinstance(r["layer"], int)})
    for _, _, recs in parsed:
        for where, r in recs:
            if not isinstance(r.get("layer"), int) or isinstance(r.get("layer"), bool):
                raise ImportInputError(f"{where}: 'layer' should be an integer")
    if not keys:
        raise ImportInputError(f"{paths[0]}: no router records")
    # The expert count: --num-experts, else the logits' width (the sidecar knows it); ids alone cannot tell it.
    experts = num_experts
    if experts is None:
        widths = {r["logit_shape"][1] for _, _, recs in parsed for _, r in recs
                  if isinstance(r.get("logit_shape"), list) and len(r["logit_shape"]) == 2}
        if len(widths) != 1:
            raise ImportInputError(f"{paths[0]}: Megatron records do not say how many experts a layer has: give --num-experts")
        experts = int(widths.pop())
    topks = {r.get("topk") for _, _, recs in parsed for _, r in recs}
    top_k = next(iter(topks), None)
    if len(topks) != 1 or not isinstance(top_k, int):
        raise ImportInputError(f"{paths[0]}: records disagree on topk ({sorted(map(str, topks))})")
    sink.set_layers(layer_entries(len(keys), experts, top_k, [_name(k) for k in keys]), str(paths[0]))
    index = {key: i for i, key in enumerate(keys)}
    for rank, path, recs in parsed:
        sidecar = path.with_name(f"logits_rank{rank}.bin")
        sidecar_size = os.stat(sidecar).st_size if sidecar.is_file() else None
        for where, record in recs:
            if _int(record, "rank", where) != rank:
                raise ImportInputError(f"{where}: record of rank {record['rank']} in the file of rank {rank}")
            step = _int(record, "step", where)
            ids = _indices(record, where)
            tokens, topk = ids.shape
            layer = index[_key(record)]
            experts_3d = np.full((tokens, len(keys), topk), -1, dtype=np.int64)
            experts_3d[:, layer, :] = ids
            position = np.arange(tokens)
            scores = None
            if "logit_offset" in record:  # read and check the logits before writing anything of this record
                if sidecar_size is None:
                    raise ImportInputError(f"{where}: the record points into {sidecar}, which is missing")
                scores = _logits(record, where, sidecar, sidecar_size, tokens)
                if scores.shape[1] != experts:
                    raise ImportInputError(f"{where}: logits for {scores.shape[1]} experts, the layer has {experts}")
            sink.add_tokens(
                rank=rank, step=step, sequence=step, position=position, token_id=np.full(tokens, -1),
                phase=np.zeros(tokens, np.int8), experts=experts_3d, where=where,
                count_tokens=layer == 0,  # one record per layer: count a step's tokens once
            )
            if scores is not None:
                sink.add_scores(rank=rank, step=step, sequence=step, position=position, layer=layer, scores=scores)
