"""counts_call decides a stack call's step on the host (batch, tokens, new sequences) without building its token
context. It must agree with the general path (ContextReader.read, _positions_and_valid, record_step's rule: new
sequences when every row's first real position is 0) on every call it answers, and answer None whenever one of the
call's own tokens is padding (the general path leaves those out of the counts)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from transformers import DynamicCache

from moeprobe.hooks.graph_capture import _positions_and_valid
from moeprobe.hooks.host_steps import cache_length, counts_call, plain_call
from moeprobe.hooks.token_context import ContextReader
from tests.tiny_models import build

BATCH = 3


def _cache(past: int) -> DynamicCache:
    cache = DynamicCache()
    if past:
        kv = torch.zeros(BATCH, 2, past, 8)
        cache.update(kv, kv.clone(), 0)
    return cache


def _general(reader: ContextReader, kwargs: dict[str, Any]) -> tuple[int, int, bool, bool]:
    """(batch, seq_len, new sequences, every token real) as the general path decides them."""
    ctx = reader.read((), kwargs)
    assert ctx is not None
    positions, valid = _positions_and_valid(ctx, cache_length((), kwargs))
    starts = torch.where(valid, positions, torch.iinfo(torch.int64).max).amin(dim=1)
    return ctx.batch, ctx.seq_len, bool((starts == 0).all()), bool(valid.all())


def _calls() -> list[tuple[str, dict[str, Any]]]:
    """Stack calls as causal LMs and generate() make them: prefill and decode, with and without cache, mask
    (all real, left padding in history, padding in the call) and positions."""
    calls = []
    for past, seq_len in [(0, 4), (0, 1), (5, 1), (5, 3)]:
        ids = torch.randint(3, 90, (BATCH, seq_len), generator=torch.Generator().manual_seed(past * 10 + seq_len))
        for with_cache, mask_kind, with_positions in itertools.product([True, False], ["none", "ones", "history_pad", "history_all_pad", "call_pad", "bool"], [False, True, "shared"]):
            if not with_cache and past:
                continue
            kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": with_cache}
            if with_cache:
                kwargs["cache"] = _cache(past)
            total = past + seq_len
            mask = torch.ones((BATCH, total), dtype=torch.int64)
            if mask_kind == "history_pad" and past:
                mask[1, :2] = 0  # row 1 left-padded in the cache: its positions run 2 behind
            if mask_kind == "history_all_pad":
                mask[:, :past] = 0  # nothing real before this call: positions from the mask start at 0 (new)
            if mask_kind == "call_pad":
                mask[2, past] = 0  # a padded token in this call: the general path's business
            if mask_kind == "bool":
                mask = mask.bool()
            if mask_kind != "none":
                kwargs["attention_mask"] = mask
            if with_positions:
                real = mask.to(torch.int64)
                kwargs["position_ids"] = ((real.cumsum(1) - 1).clamp(min=0))[:, -seq_len:]
                if with_positions == "shared":
                    kwargs["position_ids"] = kwargs["position_ids"][1:2]  # one row for the batch (broadcast)
            calls.append((f"past{past}-len{seq_len}-cache{with_cache}-{mask_kind}-pos{with_positions}", kwargs))
    return calls


CALLS = _calls()


@pytest.mark.parametrize("name,kwargs", CALLS, ids=[n for n, _ in CALLS])
def test_counts_call_agrees_with_the_general_path(name: str, kwargs: dict[str, Any]) -> None:
    stack = build("qwen3_moe").model
    reader = ContextReader(stack, 0)
    batch, seq_len, new, all_real = _general(reader, kwargs)
    got = counts_call(ContextReader(stack, 0), (), kwargs)
    if not all_real:
        assert got is None
        return
    assert got == (batch, seq_len, new)
    plain = plain_call(ContextReader(stack, 0), (), kwargs)
    if plain is not None:  # plain_call answers the maskless, positionless calls: the same step
        assert plain[:3] == got


def test_what_counts_call_leaves_to_the_general_path() -> None:
    stack = build("qwen3_moe").model
    ids = torch.randint(3, 90, (BATCH, 1))
    mask = torch.ones((BATCH, 6), dtype=torch.int64)

    def answer(**kwargs: Any) -> Any:
        return counts_call(ContextReader(stack, 0), (), {"input_ids": ids, "cache": _cache(5), **kwargs})

    assert answer(attention_mask=mask) == (BATCH, 1, False)
    assert answer(attention_mask=mask.float()) is None  # a float mask: read on the general path
    assert answer(attention_mask=mask[:, None, None, :].expand(BATCH, 1, 1, 6)) is None  # 4-D
    assert answer(attention_mask={"full_attention": mask}) is None  # per attention type
    assert answer(attention_mask=mask[:2]) is None  # not one row per batch row
    assert answer(position_ids=torch.full((3, BATCH, 1), 5)) is None  # multimodal rotary positions
    assert answer(position_ids=torch.full((BATCH, 2), 5)) is None  # not one per token
    assert answer(inputs_embeds=torch.zeros(BATCH, 1, 8), input_ids=None) is None  # no token ids
