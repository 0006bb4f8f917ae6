"""Which tokens a MoE layer is looking at: batch rows, positions, token ids and padding.

Built in a pre-hook on the module that receives ``input_ids`` (the "stack": the decoder of a causal LM, the
encoder and decoder of an encoder-decoder). Only references and host-side shape facts are taken here:
positions and padding are computed from the attention mask on the writer thread, so the hook launches
no kernels and never synchronises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .discovery import _parameters

_WANTED = ("input_ids", "inputs_embeds", "attention_mask", "past_key_values", "cache_position")


@dataclass
class TokenContext:
    stack_id: int
    batch: int
    seq_len: int
    phase: str  # "prefill" or "decode"
    new_sequences: bool  # the cache was empty: these rows start new sequences
    input_ids: torch.Tensor | None  # (batch, seq_len)
    attention_mask: torch.Tensor | None  # (batch, past + seq_len), 2-D masks only
    past_len: int | None  # tokens already in the cache, when known without a sync
    cache_position: torch.Tensor | None  # used for positions only when past_len is unknown
    seq_base: int = 0  # sequence id of batch row 0, assigned by the probe


def past_length(cache: Any) -> int | None:
    """Tokens already in a KV cache, if the cache can say without a device sync; None otherwise."""
    if cache is None:
        return 0
    getter = getattr(cache, "get_seq_length", None)
    if getter is None:
        return None
    try:
        value = getter()
    except Exception:  # noqa: BLE001 - an exotic cache must not break capture
        return None
    # Static caches keep the length as a device tensor; reading it would synchronise.
    return value if isinstance(value, int) else None


class ContextReader:
    """Pulls the token facts out of one stack module's forward arguments."""

    def __init__(self, stack: nn.Module, stack_id: int) -> None:
        self.stack_id = stack_id
        params = _parameters(stack)
        self._slots = {name: params.index(name) for name in _WANTED if name in params}

    def _arg(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if name in kwargs:
            return kwargs[name]
        slot = self._slots.get(name)
        if slot is not None and slot < len(args):
            return args[slot]
        return None

    def read(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> TokenContext | None:
        input_ids = self._arg("input_ids", args, kwargs)
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:
            batch, seq_len = input_ids.shape
        else:
            input_ids = None
            embeds = self._arg("inputs_embeds", args, kwargs)
            if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3:
                return None
            batch, seq_len = embeds.shape[:2]
        mask = self._arg("attention_mask", args, kwargs)
        if not (isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == batch and mask.shape[1] >= seq_len):
            mask = None
        past = past_length(self._arg("past_key_values", args, kwargs))
        cache_position = self._arg("cache_position", args, kwargs)
        if not isinstance(cache_position, torch.Tensor) or cache_position.shape != (seq_len,):
            cache_position = None
        if past is None:
            new = seq_len > 1
        else:
            new = past == 0
        phase = "prefill" if (seq_len > 1 or new) else "decode"
        return TokenContext(
            stack_id=self.stack_id,
            batch=int(batch),
            seq_len=int(seq_len),
            phase=phase,
            new_sequences=new,
            input_ids=input_ids,
            attention_mask=mask,
            past_len=past,
            cache_position=cache_position if past is None else None,
        )
