"""Saved HTTP responses: one JSON response, a JSON array of them, JSONL (one per line), or a saved SSE stream.

A stream (``data: {...}`` lines, ``data: [DONE]`` at the end, as OpenAI-compatible servers send with
``"stream": true``) is joined into one response per ``id``: choices are matched by ``index``, their ``text`` and
``token_ids`` concatenated, and ``routed_experts`` kept as the list of chunks in arrival order (each chunk is a
separate ``np.save`` blob covering the next tokens; the vLLM importer stacks them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .decode import read_text
from .errors import ImportInputError


def _parse(line: str, where: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise ImportInputError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise ImportInputError(f"{where}: JSON nested too deeply") from None


def load_responses(path: Path, limit: int) -> list[tuple[str, dict[str, Any]]]:
    """(where, response object) pairs in file order; ``where`` names the file and line for messages."""
    text = read_text(path, limit)
    stripped = text.strip()
    if not stripped:
        raise ImportInputError(f"{path}: empty file")
    lines = [line for line in text.splitlines() if line.strip()]
    if any(line.startswith("data:") for line in lines):
        return join_stream(lines, str(path))
    if len(lines) == 1 or stripped[0] == "[":
        try:
            whole = json.loads(stripped)
        except json.JSONDecodeError:
            whole = None
        except RecursionError:
            raise ImportInputError(f"{path}: JSON nested too deeply") from None
        if isinstance(whole, list):
            return [(f"{path}[{i}]", _object(item, f"{path}[{i}]")) for i, item in enumerate(whole)]
        if isinstance(whole, dict):
            return [(str(path), whole)]
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            where = f"{path}:{number}"
            out.append((where, _object(_parse(line, where), where)))
    return out


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ImportInputError(f"{where}: expected a JSON object (one response), found {type(value).__name__}")
    return value


def join_stream(lines: list[str], name: str) -> list[tuple[str, dict[str, Any]]]:
    """Join SSE chunks into whole responses, one per response ``id``, in order of first appearance."""
    joined: dict[str, dict[str, Any]] = {}
    first_line: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        if not line.startswith("data:"):
            continue  # SSE comments, event names and blank keep-alives
        payload = line[len("data:"):].strip()
        if payload == "[DONE]":
            continue
        where = f"{name}:{number}"
        chunk = _object(_parse(payload, where), where)
        rid = str(chunk.get("id", ""))
        whole = joined.setdefault(rid, {k: v for k, v in chunk.items() if k != "choices"} | {"choices": {}})
        first_line.setdefault(rid, where)
        for key in ("usage", "prompt_token_ids", "model"):
            if chunk.get(key) is not None:
                whole[key] = chunk[key]
        choices = chunk.get("choices") or []
        if not isinstance(choices, list):
            raise ImportInputError(f"{where}: 'choices' should be a list")
        for part in choices:
            part = _object(part, where)
            merge_choice(whole["choices"], part, where)
    return [(first_line[rid], {**r, "choices": list(r["choices"].values())}) for rid, r in joined.items()]


def merge_choice(choices: dict[int, dict[str, Any]], part: dict[str, Any], where: str) -> None:
    index = part.get("index", 0)
    if not isinstance(index, int):
        raise ImportInputError(f"{where}: choice 'index' should be an integer")
    into = choices.setdefault(index, {"index": index, "text": "", "token_ids": [], "routed_experts": []})
    delta: dict[str, Any] = part["delta"] if isinstance(part.get("delta"), dict) else {}
    into["text"] += str(part.get("text") or delta.get("content") or "")
    for source in (part, delta):
        ids = source.get("token_ids")
        if ids is not None:
            if not isinstance(ids, list):
                raise ImportInputError(f"{where}: 'token_ids' should be a list")
            into["token_ids"] = into["token_ids"] + ids
    if part.get("prompt_token_ids") is not None:
        into["prompt_token_ids"] = part["prompt_token_ids"]
    if part.get("routed_experts") is not None:
        into["routed_experts"].append(part["routed_experts"])
    if part.get("finish_reason") is not None:
        into["finish_reason"] = part["finish_reason"]
