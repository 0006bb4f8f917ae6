"""vLLM: ``routed_experts`` of OpenAI-compatible (``/v1/completions``, ``/v1/chat/completions``) and generate
responses, with routed-experts return on (``--aux-output-config '{"enable_return_routed_experts": true}'``).

Format (vllm/entrypoints/openai/protocol.py, ``CompletionResponseChoice.routed_experts``): base64 of an ``np.save``
blob of shape (num_tokens - 1, num_layers, top_k), dtype uint8 or uint16 as the header says; ids only, no gate
weights. ``num_tokens`` is prompt + completion; the last sampled token was never forwarded, so it has no row.
With ``routed_experts_prompt_start = p`` the rows start at position p, so p = (prompt + completion - 1) - rows;
a streamed response carries the blob in chunks, stacked in arrival order.

Each choice becomes one sequence (tags ``request_id`` and, for n > 1, ``choice``); prompt positions are ``prefill``,
generated ones ``decode``. The response gives no batching, so each response is one step, numbered in the order
the responses were recorded (or, for capture-server, arrived). Weights are null: vLLM returns ids only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import decode
from .errors import ImportInputError
from .sink import TraceSink, layer_entries, phase_codes


@dataclass(frozen=True)
class ChoiceRouting:
    experts: np.ndarray  # (rows, layers, top_k)
    start: int  # position of the first row (routed_experts_prompt_start)
    prompt_tokens: int
    token_ids: np.ndarray | None  # prompt + completion ids, when the response has them


def _ids(value: Any, where: str, field: str) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ImportInputError(f"{where}: '{field}' should be a list of token ids")
    return value


def choice_routing(response: dict[str, Any], choice: dict[str, Any], where: str, limit: int) -> ChoiceRouting:
    blobs = choice.get("routed_experts")
    if blobs is None or blobs == []:
        raise ImportInputError(
            f"{where}: choice {choice.get('index', 0)} has no routed_experts (start vLLM with "
            "--aux-output-config '{\"enable_return_routed_experts\": true}')"
        )
    parts = [decode.npy(decode.b64(b, f"{where}: routed_experts", limit), f"{where}: routed_experts")
             for b in (blobs if isinstance(blobs, list) else [blobs])]
    if len({p.shape[1:] for p in parts}) > 1:
        raise ImportInputError(f"{where}: streamed routed_experts chunks disagree on (layers, top_k): "
                               f"{sorted({p.shape[1:] for p in parts})}")
    experts = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]

    prompt_ids = _ids(choice.get("prompt_token_ids", response.get("prompt_token_ids")), where, "prompt_token_ids")
    completion_ids = _ids(choice.get("token_ids") or None, where, "token_ids")
    usage: dict[str, Any] = response["usage"] if isinstance(response.get("usage"), dict) else {}
    single = len(response.get("choices") or []) == 1
    prompt = len(prompt_ids) if prompt_ids is not None else (usage.get("prompt_tokens") if single else None)
    completion = len(completion_ids) if completion_ids is not None else (usage.get("completion_tokens") if single else None)
    if not isinstance(prompt, int) or isinstance(prompt, bool) or prompt < 0:
        raise ImportInputError(
            f"{where}: cannot tell prompt from completion tokens (no prompt_token_ids, no usage.prompt_tokens); "
            "request with \"return_token_ids\": true"
        )
    rows = experts.shape[0]
    if isinstance(completion, int) and not isinstance(completion, bool):
        start = prompt + completion - 1 - rows
    else:
        start = 0  # without the completion length the rows can only start at the prompt's beginning
        completion = rows + 1 - prompt
    if start < 0 or (prompt > 0 and start >= prompt + max(completion, 1)) or completion < 0:
        raise ImportInputError(
            f"{where}: routed_experts has {rows} rows but prompt {prompt} + completion {completion} tokens "
            f"allow at most {max(prompt + completion - 1, 0)} (mismatched shapes)"
        )
    token_ids = None
    if prompt_ids is not None and completion_ids is not None:
        token_ids = np.asarray(prompt_ids + completion_ids, dtype=np.int64)
    return ChoiceRouting(experts, start, prompt, token_ids)


def write_response(
    sink: TraceSink,
    response: dict[str, Any],
    where: str,
    *,
    step: int,
    first_sequence: int,
    num_experts: int,
    limit: int,
    tags: dict[str, str] | None = None,
) -> int:
    """Write every choice of one response; returns how many sequences (choices) it used."""
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices:
        raise ImportInputError(f"{where}: no 'choices' list (not a vLLM completion or generate response)")
    decoded = []
    for choice in choices:
        if not isinstance(choice, dict):
            raise ImportInputError(f"{where}: a choice should be an object")
        decoded.append((choice, choice_routing(response, choice, where, limit)))
    for offset, (choice, routing) in enumerate(decoded):
        rows, layers, top_k = routing.experts.shape
        sink.set_layers(layer_entries(layers, num_experts, top_k), where)
        sequence = first_sequence + offset
        position = np.arange(routing.start, routing.start + rows)
        token_id = routing.token_ids[position] if routing.token_ids is not None else np.full(rows, -1)
        sink.add_tokens(
            rank=0, step=step, sequence=sequence, position=position, token_id=token_id,
            phase=phase_codes(position, routing.prompt_tokens), experts=routing.experts, where=where,
        )
        request_tags = {"request_id": str(response.get("id", "")), **(tags or {})}
        if len(decoded) > 1:
            request_tags["choice"] = str(choice.get("index", offset))
        sink.add_tags(rank=0, sequence=sequence, tags=request_tags)
    return len(decoded)
