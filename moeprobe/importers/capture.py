"""Sends prompts to a running engine with routed-experts return on, and writes the routing as responses arrive.

Standard library only: ``urllib`` requests on a bounded thread pool. Worker threads only talk HTTP and decode
nothing; the calling thread takes each finished response, writes it through a ``TraceSink`` and flushes, so the
trace is readable (the TUI can follow it) while requests are still in flight, and only one thread ever writes.
A request that fails (HTTP error, timeout, a payload without routing) is counted and reported, never written.

Request shapes: vLLM ``POST /v1/completions`` (or ``/v1/chat/completions`` for prompts given as ``messages``)
with ``"return_token_ids": true``, optionally ``"stream": true``; SGLang ``POST /generate`` with
``"return_routed_experts": true``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import decode, sglang, vllm
from .errors import ImportInputError
from .responses import join_stream
from .sink import TraceSink


@dataclass(frozen=True)
class Prompt:
    index: int
    body: dict[str, Any]  # "prompt" (text) or "messages" (chat)
    tags: dict[str, str]


@dataclass
class CaptureOptions:
    url: str
    engine: str  # "vllm" or "sglang"
    num_experts: int
    model: str | None = None
    max_tokens: int = 16
    stream: bool = False
    concurrency: int = 8
    timeout: float = 120.0
    num_layers: int | None = None
    top_k: int | None = None
    limit: int = decode.DEFAULT_MAX_BYTES


@dataclass
class CaptureResult:
    sent: int = 0
    written: int = 0
    failures: list[str] = field(default_factory=list)


def read_prompts(path: Path, tag_fields: list[str], limit: int) -> list[Prompt]:
    """One JSON object per line with ``prompt`` (text) or ``messages`` (chat); ``tag_fields`` become tags."""
    text = decode.read_text(path, limit)
    prompts: list[Prompt] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ImportInputError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(item, dict):
            raise ImportInputError(f"{where}: expected an object with 'prompt' or 'messages'")
        if isinstance(item.get("prompt"), str):
            body: dict[str, Any] = {"prompt": item["prompt"]}
        elif isinstance(item.get("messages"), list):
            body = {"messages": item["messages"]}
        else:
            raise ImportInputError(f"{where}: needs a 'prompt' string or a 'messages' list")
        tags = {key: str(item[key]) for key in tag_fields if key in item and item[key] is not None}
        prompts.append(Prompt(len(prompts), body, tags))
    if not prompts:
        raise ImportInputError(f"{path}: no prompts")
    return prompts


def request_for(prompt: Prompt, options: CaptureOptions) -> tuple[str, dict[str, Any]]:
    base = options.url.rstrip("/")
    if options.engine == "sglang":
        if "prompt" not in prompt.body:
            raise ImportInputError(f"prompt {prompt.index}: SGLang /generate takes a 'prompt' string, not messages")
        return f"{base}/generate", {
            "text": prompt.body["prompt"],
            "sampling_params": {"max_new_tokens": options.max_tokens},
            "return_routed_experts": True,
        }
    chat = "messages" in prompt.body
    body: dict[str, Any] = {**prompt.body, "max_tokens": options.max_tokens, "return_token_ids": True}
    if options.model:
        body["model"] = options.model
    if options.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return f"{base}/v1/{'chat/completions' if chat else 'completions'}", body


def fetch(prompt: Prompt, options: CaptureOptions) -> dict[str, Any]:
    """One request, in a worker thread: the parsed (and, for a stream, joined) response object."""
    url, body = request_for(prompt, options)
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    where = f"{url} (prompt {prompt.index})"
    try:
        with urllib.request.urlopen(request, timeout=options.timeout) as reply:  # noqa: S310 - the user's server
            data = reply.read(options.limit + 1)
    except urllib.error.HTTPError as exc:
        raise ImportInputError(f"{where}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ImportInputError(f"{where}: request failed ({reason})") from None
    if len(data) > options.limit:
        raise ImportInputError(f"{where}: response over the {options.limit:,}-byte limit")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ImportInputError(f"{where}: response is not UTF-8") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and lines[0].startswith("data:"):
        joined = join_stream(lines, where)
        if len(joined) != 1:
            raise ImportInputError(f"{where}: the stream holds {len(joined)} responses, expected one")
        return joined[0][1]
    try:
        response = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ImportInputError(f"{where}: response is not JSON ({exc.msg})") from None
    if not isinstance(response, dict):
        raise ImportInputError(f"{where}: response is not a JSON object")
    return response


def capture(sink: TraceSink, prompts: list[Prompt], options: CaptureOptions) -> CaptureResult:
    """Send every prompt with at most ``options.concurrency`` in flight; write each response as it arrives."""
    result = CaptureResult()
    step = sequence = 0
    pending: dict[Future[dict[str, Any]], Prompt] = {}
    queue = iter(prompts)
    with ThreadPoolExecutor(max_workers=options.concurrency, thread_name_prefix="moeprobe-capture") as pool:
        try:
            while True:
                # Keep the pool full but never queue more than it runs: a slow server cannot make us hold
                # thousands of pending requests in memory.
                for prompt in queue:
                    pending[pool.submit(fetch, prompt, options)] = prompt
                    result.sent += 1
                    if len(pending) >= options.concurrency:
                        break
                if not pending:
                    break
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    prompt = pending.pop(future)
                    tags = {**prompt.tags, "prompt_index": str(prompt.index)}
                    try:
                        response = future.result()
                        where = f"{options.url} (prompt {prompt.index})"
                        if options.engine == "vllm":
                            used = vllm.write_response(sink, response, where, step=step, first_sequence=sequence,
                                                       num_experts=options.num_experts, limit=options.limit, tags=tags)
                        else:
                            used = sglang.write_generate_response(
                                sink, response, where, step=step, first_sequence=sequence,
                                num_experts=options.num_experts, num_layers=options.num_layers, top_k=options.top_k,
                                limit=options.limit, tags=tags,
                            )
                    except ImportInputError as exc:
                        result.failures.append(str(exc))
                        sink.count_anomaly("request_failed")
                        continue
                    sequence += used
                    step += 1
                    result.written += 1
                    sink.flush()  # complete segments now: a reader sees this response
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    return result
