"""PendingContext keeps a stack call's arguments for a later read. What it keeps must be the call's values: a tensor
written after the call is refused at the read, a buffer passed again and inference tensors are copied at the call,
keyword and positional arguments alike, and the call's own arguments (what the model gets) are never replaced."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moeprobe.hooks.token_context import ContextChanged, ContextReader, PendingContext


class Stack(nn.Module):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return input_ids


def _reader() -> ContextReader:
    return ContextReader(Stack(), 0)


@pytest.mark.parametrize("positional", [False, True])
def test_a_tensor_written_after_the_call_is_refused_at_the_read(positional: bool) -> None:
    reader = _reader()
    ids = torch.tensor([[5, 6, 7]])
    args, kwargs = ((ids,), {}) if positional else ((), {"input_ids": ids})
    pending = PendingContext(reader, args, kwargs, None)
    ids.add_(1)  # the loop writes its next inputs into the same tensor
    with pytest.raises(ContextChanged):
        pending.build()
    assert reader.copy_args  # copied at the call from now on


@pytest.mark.parametrize("positional", [False, True])
def test_a_buffer_passed_again_is_copied_from_its_second_use(positional: bool) -> None:
    reader = _reader()
    buffer = torch.tensor([[5, 6, 7]])

    def call() -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor], PendingContext]:
        args, kwargs = ((buffer,), {}) if positional else ((), {"input_ids": buffer})
        return args, kwargs, PendingContext(reader, args, kwargs, None)

    call()
    assert not reader.copy_args
    args, kwargs, second = call()
    assert reader.copy_args
    buffer.fill_(9)  # the next step's input, written in place
    ctx = second.build()
    assert ctx is not None and ctx.input_ids.tolist() == [[5, 6, 7]]  # the copy taken at the call
    assert (args[0] if positional else kwargs["input_ids"]) is buffer  # what the model was given is untouched


def test_inference_tensors_are_copied_at_the_call() -> None:
    reader = _reader()
    with torch.inference_mode():
        ids = torch.tensor([[5, 6, 7]])
        pending = PendingContext(reader, (), {"input_ids": ids, "attention_mask": torch.ones(1, 3, dtype=torch.long)}, None)
        ids.fill_(0)
    ctx = pending.build()
    assert ctx is not None and ctx.input_ids.tolist() == [[5, 6, 7]]
    assert not reader.copy_args  # copying inference tensors is not a sign of buffer reuse
