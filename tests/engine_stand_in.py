"""A stand-in for a serving engine we cannot run here: an HTTP server on 127.0.0.1 that answers in vLLM's or
SGLang's documented response shape (see tests/engine_formats.py), with routing derived from the prompt text.

``expected(prompt, max_tokens)`` gives the routing the server returns for a prompt, so a test can check every
row the capture wrote. ``barrier`` makes each request wait until that many are in flight together (proof of
concurrency); ``hold_after`` holds every request after the first N until ``release`` is set.
"""

from __future__ import annotations

import json
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from tests import engine_formats as ef


class StandIn:
    def __init__(self, *, layers: int = 3, top_k: int = 2, experts: int = 16, barrier: int | None = None,
                 hold_after: int | None = None, wait_s: float = 30.0) -> None:
        self.layers, self.top_k, self.experts = layers, top_k, experts
        self.barrier = threading.Barrier(barrier) if barrier else None
        self.hold_after = hold_after
        self.release = threading.Event()
        self.wait_s = wait_s
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.answered = 0
        self.arrived = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.stand_in = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> StandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        if self.barrier is not None:
            self.barrier.abort()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    # -- the routing a prompt gets --------------------------------------------------------------------
    def expected(self, prompt: str, max_tokens: int) -> tuple[list[int], list[int], np.ndarray]:
        """(prompt ids, completion ids, routing rows (P + C - 1, layers, top_k)) for this prompt."""
        prompt_ids = list(prompt.encode())
        seed = zlib.crc32(prompt.encode())
        completion_ids = [(seed + i) % 30000 for i in range(max_tokens)]
        rows = ef.routing(prompt, len(prompt_ids) + max_tokens - 1, self.layers, self.top_k, self.experts)
        return prompt_ids, completion_ids, rows

    @staticmethod
    def request_id(prompt: str) -> str:
        return f"cmpl-{zlib.crc32(prompt.encode()):08x}"

    def answer(self, path: str, body: dict[str, Any]) -> tuple[str, bytes]:
        if path == "/v1/completions":
            prompt, max_tokens = body["prompt"], int(body["max_tokens"])
            prompt_ids, completion_ids, rows = self.expected(prompt, max_tokens)
            response = ef.vllm_completion(self.request_id(prompt), prompt_ids, completion_ids, rows, experts=self.experts)
            if body.get("stream"):
                return "text/event-stream", "".join(line + "\n\n" for line in ef.vllm_stream(response)).encode()
            return "application/json", json.dumps(response).encode()
        if path == "/generate":
            assert body.get("return_routed_experts") is True
            prompt, max_tokens = body["text"], int(body["sampling_params"]["max_new_tokens"])
            prompt_ids, completion_ids, rows = self.expected(prompt, max_tokens)
            response = ef.sglang_generate(self.request_id(prompt), len(prompt_ids), completion_ids, rows)
            return "application/json", json.dumps(response).encode()
        raise KeyError(path)


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        stand_in: StandIn = self.server.stand_in  # type: ignore[attr-defined]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with stand_in.lock:
            stand_in.in_flight += 1
            stand_in.arrived += 1
            arrival = stand_in.arrived
            stand_in.max_in_flight = max(stand_in.max_in_flight, stand_in.in_flight)
        try:
            if stand_in.barrier is not None:
                stand_in.barrier.wait(timeout=stand_in.wait_s)
            held = stand_in.hold_after is not None and arrival > stand_in.hold_after
            if held and not stand_in.release.wait(timeout=stand_in.wait_s):
                raise TimeoutError("held request never released")
            kind, payload = stand_in.answer(self.path, body)
        except (KeyError, threading.BrokenBarrierError, TimeoutError) as exc:
            with stand_in.lock:
                stand_in.in_flight -= 1
            self.send_error(500, f"stand-in: {type(exc).__name__}")
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        with stand_in.lock:
            stand_in.in_flight -= 1
            stand_in.answered += 1
