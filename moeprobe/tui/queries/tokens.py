"""Tokens: the sequences of a trace and, for one of them, each token with its experts and gate weights per layer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ...analysis.session import Trace

# A byte-level model's ids 0..255 are bytes; a trace whose tokens are mostly below 256 is shown as text.
BYTE_IDS = 256
BYTE_SHARE = 0.9


@dataclass(frozen=True)
class SequenceInfo:
    rank: int
    sequence: int
    tokens: int
    first_step: int
    last_step: int
    tags: str


@dataclass(frozen=True)
class Token:
    position: int
    token_id: int
    step: int
    phase: str
    # layer -> ((expert, weight), ...) in choice order (k = 0 first)
    routes: dict[int, tuple[tuple[int, float], ...]]

    def first_expert(self, layer: int) -> int | None:
        choices = self.routes.get(layer)
        return choices[0][0] if choices else None


@dataclass(frozen=True)
class SequenceTokens:
    info: SequenceInfo
    tokens: tuple[Token, ...]
    as_bytes: bool
    pieces: tuple[str, ...] | None = None  # each token's text from the trace's tokenizer, when it loads offline


def sequences(trace: Trace) -> list[SequenceInfo]:
    """Every (rank, sequence) with its token count, step range and tags, in the order they were recorded."""
    if not trace.layers:
        return []
    first_layer = min(int(m["index"]) for m in trace.layers)
    ctx = trace.context()
    got = ctx.run(
        "WITH s AS (SELECT rank, sequence, count(DISTINCT position) AS tokens, min(step) AS first_step, "
        f"max(step) AS last_step FROM {ctx.sources()['routing']} WHERE layer = {first_layer} AND k = 0 GROUP BY ALL), "
        "t AS (SELECT rank, sequence, string_agg(key || '=' || value, ' ' ORDER BY key) AS tags FROM tags GROUP BY ALL) "
        "SELECT s.*, coalesce(t.tags, '') AS tags FROM s LEFT JOIN t USING (rank, sequence) "
        "ORDER BY first_step, rank, sequence"
    )
    return [
        SequenceInfo(int(r), int(s), int(n), int(a), int(b), str(tags))
        for r, s, n, a, b, tags in zip(
            got.get("rank", []), got.get("sequence", []), got.get("tokens", []),
            got.get("first_step", []), got.get("last_step", []), got.get("tags", []), strict=True,
        )
    ]


def sequence_tokens(trace: Trace, info: SequenceInfo, decoder: Callable[[int], str] | None = None) -> SequenceTokens:
    """The sequence's tokens and routes; with ``decoder`` (see ``tui.decoding``) also each token's text."""
    ctx = trace.context()
    got = ctx.run(
        f"SELECT position, token_id, step, phase, layer, k, expert, weight FROM {ctx.sources()['routing']} "
        f"WHERE rank = {int(info.rank)} AND sequence = {int(info.sequence)} ORDER BY position, layer, k"
    )
    tokens: list[Token] = []
    if len(got.get("position", [])):
        positions = got["position"]
        # one Token per position; rows arrive sorted, so each token is a contiguous run
        starts = np.flatnonzero(np.r_[True, positions[1:] != positions[:-1]])
        ends = np.r_[starts[1:], len(positions)]
        for a, b in zip(starts, ends, strict=True):
            routes: dict[int, list[tuple[int, float]]] = {}
            for i in range(a, b):
                routes.setdefault(int(got["layer"][i]), []).append((int(got["expert"][i]), float(got["weight"][i])))
            tokens.append(
                Token(
                    position=int(positions[a]),
                    token_id=int(got["token_id"][a]),
                    step=int(got["step"][a]),
                    phase=str(got["phase"][a]),
                    routes={layer: tuple(choices) for layer, choices in routes.items()},
                )
            )
    ids = np.array([t.token_id for t in tokens])
    pieces = tuple(decoder(t.token_id) if t.token_id >= 0 else "·" for t in tokens) if decoder else None
    as_bytes = pieces is None and bool(len(ids)) and float(((ids >= 0) & (ids < BYTE_IDS)).mean()) >= BYTE_SHARE
    return SequenceTokens(info, tuple(tokens), as_bytes, pieces)


def token_text(token_id: int, as_bytes: bool) -> str:
    """How one token reads on screen: its byte when the trace is byte-level, else its id."""
    if token_id < 0:
        return "·"  # recorded with --redact-tokens, or fed embeddings
    if not as_bytes or token_id >= BYTE_IDS:
        return f"⟨{token_id}⟩"
    if token_id == 0x0A:
        return "↵\n"
    if token_id == 0x09:
        return "⇥"
    if 0x20 <= token_id < 0x7F:
        return chr(token_id)
    return f"\\x{token_id:02x}"
