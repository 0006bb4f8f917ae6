"""Token context: for every family and the generic path, the trace's phase, position, token id and sequence
equal what ``generate`` (or a hand-written decode loop) fed the model.

The expected rows come from the inputs and outputs of ``generate`` alone, never from moeprobe: a prompt row's
real tokens at positions 0.. in the prefill step, then each generated token at the next position in one decode
step each. Cases: left-padded and unpadded batches, dynamic and static caches, two ``generate`` calls under one
probe (4 sequences for 2 rows), and manual loops that pass only ``inputs_embeds`` or only ``position_ids``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import moeprobe
from tests.tiny_models import FAMILIES, GENERIC, VOCAB, build

DECODER_ONLY = sorted(set(FAMILIES) - {"switch_transformers"}) + sorted(GENERIC)
PROMPT = 6
NEW = 4

Row = tuple[int, int, int, int, str]  # step, sequence, position, token_id, phase


def _prompt(padded: bool, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :2] = 0  # decoder-only batches are left-padded
        ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def _expected(ids: torch.Tensor, mask: torch.Tensor, out: torch.Tensor, step0: int, seq0: int) -> list[Row]:
    rows: list[Row] = []
    for b in range(ids.shape[0]):
        for p, t in enumerate(ids[b][mask[b].bool()].tolist()):
            rows.append((step0, seq0 + b, p, t, "prefill"))
    for i in range(1, NEW):
        for b in range(ids.shape[0]):
            rows.append((step0 + i, seq0 + b, int(mask[b].sum()) + i - 1, int(out[b, ids.shape[1] + i - 1]), "decode"))
    return sorted(rows)


def _recorded(path: Path, layer: int = 0) -> list[Row]:
    trace = moeprobe.open_trace(path)
    assert trace.status == "complete"
    rows = trace.sql(
        f"select step, sequence, position, token_id, phase from routing where layer = {layer} and k = 0 "
        "order by step, sequence, position"
    ).to_pylist()
    return [(r["step"], r["sequence"], r["position"], r["token_id"], r["phase"]) for r in rows]


def _generate(model: Any, ids: torch.Tensor, mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    return model.generate(
        ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0, **kwargs
    )


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("padded", [True, False], ids=["left-padded", "unpadded"])
@pytest.mark.parametrize("family", DECODER_ONLY)
def test_generate_context(family: str, padded: bool, cache: str, tmp_path: Path) -> None:
    model = build(family)
    ids, mask = _prompt(padded)
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    with moeprobe.record(model, tmp_path / "t") as probe:
        out = _generate(model, ids, mask, **extra)
    assert probe.anomalies == {}
    assert moeprobe.open_trace(tmp_path / "t").manifest["counters"]["anomalies"] == {}
    assert _recorded(tmp_path / "t") == _expected(ids, mask, out, 0, 0)


@pytest.mark.parametrize("family", DECODER_ONLY + ["switch_transformers"])
def test_two_generate_calls_make_four_sequences(family: str, tmp_path: Path) -> None:
    model = build(family)
    first, second = _prompt(True, seed=1), _prompt(True, seed=2)
    if family == "switch_transformers":  # encoder inputs: right padding
        first = (first[0], torch.ones_like(first[1]))
        second = (second[0], torch.ones_like(second[1]))
    with moeprobe.record(model, tmp_path / "t") as probe:
        probe.tag(run="a")
        _generate(model, *first)
        probe.tag(run="b")
        _generate(model, *second)
    trace = moeprobe.open_trace(tmp_path / "t")
    sequences = trace.sql("select list(distinct sequence order by sequence) from routing").column(0)[0].as_py()
    assert sequences == [0, 1, 2, 3]
    tags = trace.sql("select sequence, value from tags where key = 'run' order by sequence").to_pylist()
    assert [(t["sequence"], t["value"]) for t in tags] == [(0, "a"), (1, "a"), (2, "b"), (3, "b")]
    if family != "switch_transformers":
        out_rows = _recorded(tmp_path / "t")
        assert {r[1] for r in out_rows if r[0] < NEW} == {0, 1}
        assert {r[1] for r in out_rows if r[0] >= NEW} == {2, 3}
    assert probe.anomalies == {}


def _cache_of(output: Any) -> Any:
    for name in ("cache", "past_key_values"):
        value = getattr(output, name, None)
        if value is not None and hasattr(value, "get_seq_length"):
            return value
    raise AssertionError("the model returned no cache")


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "qwen3_moe", "glm4_moe"])
def test_manual_loop_with_inputs_embeds_only(family: str, tmp_path: Path) -> None:
    model = build(family)
    ids, _ = _prompt(False)
    embed = model.get_input_embeddings()
    generated: list[torch.Tensor] = []
    with moeprobe.record(model, tmp_path / "t") as probe, torch.no_grad():
        out = model(inputs_embeds=embed(ids), use_cache=True)
        for _ in range(NEW - 1):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            generated.append(nxt)
            out = model(inputs_embeds=embed(nxt), past_key_values=_cache_of(out), use_cache=True)
    assert probe.anomalies == {}
    expected = sorted(
        [(0, b, p, -1, "prefill") for b in range(2) for p in range(PROMPT)]
        + [(i, b, PROMPT + i - 1, -1, "decode") for i in range(1, NEW) for b in range(2)]
    )
    assert _recorded(tmp_path / "t") == expected


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "qwen3_moe", "glm4_moe"])
def test_manual_loop_with_position_ids_only(family: str, tmp_path: Path) -> None:
    """No attention mask and no cache length to lean on for positions: the given position ids are recorded (here
    starting at 10, as a caller continuing a longer context would)."""
    model = build(family)
    ids, _ = _prompt(False)
    start = 10
    tokens = [ids]
    with moeprobe.record(model, tmp_path / "t") as probe, torch.no_grad():
        positions = torch.arange(start, start + PROMPT).expand(2, -1)
        out = model(input_ids=ids, position_ids=positions, use_cache=True)
        for i in range(NEW - 1):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt)
            pos = torch.full((2, 1), start + PROMPT + i)
            out = model(input_ids=nxt, position_ids=pos, past_key_values=_cache_of(out), use_cache=True)
    assert probe.anomalies == {}
    expected = sorted(
        [(0, b, start + p, int(ids[b, p]), "prefill") for b in range(2) for p in range(PROMPT)]
        + [(i, b, start + PROMPT + i - 1, int(tokens[i][b, 0]), "decode") for i in range(1, NEW) for b in range(2)]
    )
    assert _recorded(tmp_path / "t") == expected


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "glm4_moe"])
def test_chunked_prefill_continues_its_sequences(family: str, tmp_path: Path) -> None:
    """A prompt fed in two chunks through one cache, the second with the whole 2-D mask and no position ids:
    one sequence per row, positions continuing where the first chunk ended, both chunks prefill."""
    model = build(family)
    ids, mask = _prompt(True)
    with moeprobe.record(model, tmp_path / "t") as probe, torch.no_grad():
        out = model(input_ids=ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
        model(input_ids=ids[:, 4:], attention_mask=mask, past_key_values=_cache_of(out), use_cache=True)
    assert probe.anomalies == {}
    trace = moeprobe.open_trace(tmp_path / "t")
    assert trace.manifest["counters"]["anomalies"] == {}
    expected = sorted(
        (0 if p < 4 else 1, b, int(mask[b, : p + 1].sum()) - 1, int(ids[b, p]), "prefill")
        for b in range(2)
        for p in range(PROMPT)
        if mask[b, p]
    )
    assert _recorded(tmp_path / "t") == expected


def _buffer_loop(model: torch.nn.Module, reuse: bool, steps: int = 6) -> list[list[int]]:
    """Prefill, then greedy decode steps; ``reuse``: the next token goes into one input buffer in place (as loops
    with static buffers do). Returns the token ids each decode step was given."""
    from transformers import DynamicCache

    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    cache = DynamicCache()
    buffer = torch.zeros(2, 1, dtype=torch.long)
    given = []
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    for _ in range(steps):
        token = out.logits[:, -1:].argmax(-1)
        given.append(token[:, 0].tolist())
        if reuse:
            buffer.copy_(token)
            token = buffer
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
    return given


def _decode_tokens(path: Path) -> dict[int, list[int]]:
    rows = moeprobe.open_trace(path).sql(
        "select step, sequence, token_id from routing where layer = 0 and k = 0 and step > 0 order by step, sequence"
    ).to_pylist()
    by_step: dict[int, list[int]] = {}
    for row in rows:
        by_step.setdefault(row["step"], []).append(row["token_id"])
    return by_step


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_a_loop_that_reuses_its_input_buffer_is_never_recorded_wrong(mode: str, tmp_path: Path) -> None:
    """Hook capture reads a step's token context on the writer thread, from the call's tensors kept by reference.
    A loop that writes the next token into the same buffer must not have every step recorded with the last token:
    a tensor written in place after its call is found by its version counter (the step dropped and counted), the
    buffer passed again switches to copies at the call, and inference tensors (no version counter) are copied."""
    model = build("qwen3_moe").eval()
    guard = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with guard():
        with moeprobe.record(model, tmp_path / "fresh") as fresh:
            truth = _buffer_loop(model, reuse=False)
        assert fresh.anomalies == {}
        with moeprobe.record(model, tmp_path / "reused") as probe:
            assert _buffer_loop(model, reuse=True) == truth
    recorded = _decode_tokens(tmp_path / "reused")
    assert _decode_tokens(tmp_path / "fresh") == {step: tokens for step, tokens in enumerate(truth, start=1)}
    # Every step recorded carries the tokens it was given; at most the first decode step is lost, and counted.
    assert recorded == {step: truth[step - 1] for step in recorded}
    lost = probe.anomalies.get("context:changed_after_call", 0)
    assert len(recorded) + lost == len(truth) and lost <= 1
    assert any(reader.copy_args for reader in probe._readers.values())  # copies from the buffer's second use on
    if mode == "inference_mode":
        assert lost == 0  # copied at the call: nothing to lose


def test_a_loop_with_fresh_inputs_is_not_copied(tmp_path: Path) -> None:
    """The buffer check must not fire on fresh tensors (e.g. one freed and its memory handed to the next token)."""
    model = build("qwen3_moe").eval()
    with torch.no_grad(), moeprobe.record(model, tmp_path / "t") as probe:
        _buffer_loop(model, reuse=False, steps=12)
    assert probe.anomalies == {}
    assert probe._readers and not any(reader.copy_args for reader in probe._readers.values())
