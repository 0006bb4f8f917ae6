"""Which tokens a MoE layer is looking at: what the stack module was called with, read without a sync.

Read from the arguments of the module that receives the token ids (the "stack": the decoder of a causal LM, the
encoder and decoder of an encoder-decoder, or a custom model's own forward). On the model's thread capture keeps references and
host-side facts only (shapes, dtypes, a cache's length when the cache can tell it without a device sync);
sequences, positions and padding are decided on the writer thread (:mod:`.sequences`), which sees the steps in
order.

Arguments are recognised by what they are, not only by their names (transformers renamed ``past_key_values``
to ``cache`` in 5.24, and ``cache_position`` left the stacks in 5.4):

- the KV cache is any argument with a ``get_seq_length`` method, under any name; "no cache argument" is kept
  distinct from "an empty cache";
- token ids, position ids and masks are found by their usual names and then *checked*: integer 2-D tensors of the
  batch's shape for ids and positions, a 2-D or 4-D tensor (or a dict of 4-D tensors) for the mask. A name whose
  value fails its check is ignored and counted, never trusted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .discovery import _parameters
from .spec import TokenSelector

# "new": these rows start new sequences (no cache, or an empty one); "continue": they extend the sequences of
# the stack's previous call (the cache already holds `past_len` tokens); "unknown": the cache cannot say without
# a device sync (static caches keep their length on the device): the writer decides from the positions.
NEW, CONTINUE, UNKNOWN = "new", "continue", "unknown"

_INTEGER = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


@dataclass(slots=True)  # slots: built on the model thread once per stack call
class TokenContext:
    stack_id: int
    batch: int
    seq_len: int
    continuity: str  # NEW, CONTINUE or UNKNOWN (see above)
    input_ids: torch.Tensor | None  # (batch, seq_len) integer, None when fed embeddings
    position_ids: torch.Tensor | None  # (batch or 1, seq_len) integer
    attention_mask: torch.Tensor | None  # 2-D (batch, >= seq_len): 0 = padding
    mask_4d: torch.Tensor | None  # (batch, heads or 1, seq_len, kv_len): bool (True = attend) or additive float
    past_len: int | None  # tokens already in the cache, when known without a sync
    tags: Mapping[str, Any] | None = None  # the probe's tags when this call started (an immutable snapshot)
    problems: tuple[str, ...] = ()  # arguments that failed their checks, counted as anomalies by the writer

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


def past_length(cache: Any) -> int | None:
    """Tokens already in a KV cache, if the cache can say without a device sync; None otherwise."""
    getter = getattr(cache, "get_seq_length", None)
    if not callable(getter):
        return None
    try:
        value = getter()
    except Exception:  # noqa: BLE001 - an exotic cache must not break capture
        return None
    # Static caches keep the length as a device tensor; reading it would synchronise.
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def is_cache(value: Any) -> bool:
    return not isinstance(value, torch.Tensor) and callable(getattr(value, "get_seq_length", None))


def _is_int_2d(value: Any, batch: int, seq_len: int) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and value.dim() == 2
        and value.dtype in _INTEGER
        and value.shape[1] == seq_len
        and value.shape[0] in (batch, 1)
    )


class ContextReader:
    """Pulls the token facts out of one stack module's forward arguments.

    ``tokens`` names the argument that holds the token ids (default ``input_ids``), or is a function of
    ``(args, kwargs)`` returning them, for custom models whose forward calls it something else.
    """

    def __init__(self, stack: nn.Module, stack_id: int, tokens: TokenSelector | None = None) -> None:
        self.stack_id = stack_id
        params = _parameters(stack)
        self._params = params
        self._slots = {name: i for i, name in enumerate(params)}
        self._tokens: TokenSelector = tokens or "input_ids"
        self._cache_keyword: str | None = None  # where the KV cache came last time (see _cache)
        self._cache_type: Any = None  # and its class (is_cache is not asked again for it)
        # Set (writer thread) once a kept argument was found written in place after its call: PendingContext copies
        # the arguments at the call from then on; so does the model's thread on seeing a buffer passed again.
        self.copy_args = False
        # The previous call's read tensors by data pointer, and its arguments, referenced until the next call
        # (PendingContext: a buffer passed again is found by its memory, which cannot have gone to a new tensor).
        self._last_pointers: list[int] = []
        self._last_held: Any = None

    def _arg(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if name in kwargs:
            return kwargs[name]
        slot = self._slots.get(name)
        if slot is not None and slot < len(args):
            return args[slot]
        return None

    def _token_ids(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if callable(self._tokens):
            return self._tokens(args, kwargs)
        value = self._arg(self._tokens, args, kwargs)
        if value is None and self._tokens == "input_ids" and "input_ids" not in self._slots and args:
            # A custom forward(self, ids): its first positional argument, if it is a batch of token ids.
            first = args[0]
            if isinstance(first, torch.Tensor) and first.dim() == 2 and first.dtype in _INTEGER:
                return first
        return value

    def _cache(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bool, int | None]:
        """(a cache argument was passed, its length if known without a sync)."""
        # The keyword that held the cache last time is looked at first (a stack is called the same way at every
        # step), checked like any other; a scan of every argument finds it otherwise.
        # Runs at every step on the model's thread: the class found last time needs no check again, and the
        # arguments a stack call mostly has (None, flags, tensors) are passed over without is_cache's getattr.
        value = kwargs.get(self._cache_keyword) if self._cache_keyword is not None else None
        if value is not None and (type(value) is self._cache_type or is_cache(value)):
            return True, past_length(value)
        for name, value in kwargs.items():
            if value is None or value is True or value is False or isinstance(value, torch.Tensor):
                continue
            if is_cache(value):
                self._cache_keyword, self._cache_type = name, type(value)
                return True, past_length(value)
        for value in args:
            if value is None or value is True or value is False or isinstance(value, torch.Tensor):
                continue
            if is_cache(value):
                return True, past_length(value)
        return False, None

    def read(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> TokenContext | None:
        """The call's token context, or None when it has neither token ids nor embeddings."""
        has_cache, past = self._cache(args, kwargs)
        return self.build(args, kwargs, has_cache, past)

    def build(self, args: tuple[Any, ...], kwargs: dict[str, Any], has_cache: bool, past: int | None) -> TokenContext | None:
        """:meth:`read`, given what :meth:`_cache` said at the call (a cache's length changes during the call, so
        it is read then; the rest may be read later, from the same argument references)."""
        problems: list[str] = []
        input_ids = self._token_ids(args, kwargs)
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.dtype in _INTEGER:
            batch, seq_len = int(input_ids.shape[0]), int(input_ids.shape[1])
        else:
            if input_ids is not None:
                problems.append("context:token_ids_not_2d_integer")
            input_ids = None
            embeds = self._arg("inputs_embeds", args, kwargs)
            if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3:
                return None
            batch, seq_len = int(embeds.shape[0]), int(embeds.shape[1])

        position_ids = self._arg("position_ids", args, kwargs)
        if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 3 and position_ids.shape[1] in (batch, 1):
            position_ids = position_ids[0]  # multimodal rotary (3, batch, seq): the first is the text position
        if position_ids is not None and not _is_int_2d(position_ids, batch, seq_len):
            problems.append("context:position_ids_shape")
            position_ids = None

        mask_2d: torch.Tensor | None = None
        mask_4d: torch.Tensor | None = None
        mask = self._arg("attention_mask", args, kwargs)
        if isinstance(mask, Mapping):  # per attention type (full / sliding): the full one covers all tokens
            mask = mask.get("full_attention", next(iter(mask.values()), None))
        if isinstance(mask, torch.Tensor):
            if mask.dim() == 2 and mask.shape[0] == batch and mask.shape[1] >= seq_len:
                mask_2d = mask
            elif mask.dim() == 4 and mask.shape[0] == batch and mask.shape[2] == seq_len:
                mask_4d = mask
            else:
                problems.append("context:attention_mask_shape")
        elif mask is not None:
            problems.append("context:attention_mask_unreadable")  # e.g. a flex-attention BlockMask

        if not has_cache:
            continuity = NEW  # no cache: the call sees whole sequences
        elif past is None:
            continuity = UNKNOWN
        else:
            continuity = NEW if past == 0 else CONTINUE
        return TokenContext(
            stack_id=self.stack_id,
            batch=batch,
            seq_len=seq_len,
            continuity=continuity,
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=mask_2d,
            mask_4d=mask_4d,
            past_len=past,
            problems=tuple(problems),
        )


class ContextChanged(Exception):
    """A stack argument was written in place between the call and the read of its kept reference."""


class PendingContext:
    """A stack call's arguments, kept by reference on the model's thread and read into a :class:`TokenContext` later
    (hook capture on the host: on the writer thread; with CUDA: at the step's end). Only the KV cache's length is
    read at the call (the cache grows during it). Holding the arguments keeps their tensors alive until then: they
    count against the byte budget (:meth:`nbytes`).

    A loop that reuses its input buffers (``ids.copy_(next_token)``, static buffers as CUDA graphs need them) writes
    the next step's values into the kept tensors before they are read. So the version counter of every tensor the
    context is read from (token ids, positions, masks: everything but float embeddings) is noted at the call and
    compared at the read: a changed one raises :class:`ContextChanged` (the caller drops the step and counts it) and
    sets ``reader.copy_args``, from which on those tensors are copied at the call. So does a call that passes a
    tensor whose data the previous call passed too (the same buffer again: found at the second step, before its
    values can be lost). Inference tensors (``torch.inference_mode``) carry no version counter: they are copied at
    the call, always."""

    __slots__ = ("reader", "args", "kwargs", "has_cache", "past", "tags", "versions", "size")

    def __init__(
        self, reader: ContextReader, args: tuple[Any, ...], kwargs: dict[str, Any], tags: Mapping[str, Any] | None, *, later: bool = True
    ) -> None:
        # Model's thread, every step: one pass over the arguments (the byte count, the versions and the buffer check
        # together), plain reads, no Python call per tensor. ``later=False``: read at this step's end on this thread
        # (CUDA), before the next step can write anything: nothing to check or copy.
        self.reader = reader
        self.has_cache, self.past = reader._cache(args, kwargs)
        self.tags = tags
        versions: list[tuple[torch.Tensor, int]] = []
        size = 0
        last = reader._last_pointers
        pointers: list[int] = []  # this call's read tensors, by data pointer: the next call compares its own
        copy = reader.copy_args
        kept: dict[str, Any] | None = None  # the kwargs with copies, made at the first copy (the call's own dict goes on to the model)
        listed: list[Any] | None = None  # the positional arguments with copies, likewise
        arguments: Any = kwargs.items() if not args else [*kwargs.items(), *enumerate(args)]
        for key, value in arguments:
            if not isinstance(value, torch.Tensor):
                continue
            size += value.nbytes
            if not later or (value.dim() == 3 and value.is_floating_point()):
                continue  # embeddings: only their shape is read
            pointer = value.data_ptr()
            pointers.append(pointer)
            if pointer and pointer in last:
                # The same memory as a tensor of the previous call, which is still referenced (so not handed to a new
                # tensor): the loop passes the same buffer again and writes its inputs in place.
                copy = reader.copy_args = True
            if not copy:
                try:
                    versions.append((value, value._version))
                    continue
                except RuntimeError:
                    pass  # an inference tensor: no version counter, copied
            if isinstance(key, str):
                kept = dict(kwargs) if kept is None else kept
                kept[key] = value.clone()
            else:
                listed = list(args) if listed is None else listed
                listed[key] = value.clone()
        if kept is not None:
            kwargs = kept
        if listed is not None:
            args = tuple(listed)
        reader._last_pointers = pointers
        reader._last_held = (args, kwargs)  # keeps those tensors' memory from being reused until the next call
        self.args = args
        self.kwargs = kwargs
        self.versions = versions
        self.size = size

    def build(self) -> TokenContext | None:
        """The context, from copies of the kept tensors taken while their versions were the call's (checked before
        and after the copies: the model's thread may write them at any time)."""
        self._check()
        ctx = self.reader.build(self.args, self.kwargs, self.has_cache, self.past)
        if ctx is not None:
            ctx.tags = self.tags
            if self.versions:
                for name in ("input_ids", "position_ids", "attention_mask", "mask_4d"):  # capture.CONTEXT_TENSORS
                    value = getattr(ctx, name)
                    if value is not None:
                        setattr(ctx, name, value.clone())
                self._check()
        return ctx

    def _check(self) -> None:
        for tensor, version in self.versions:
            if tensor._version != version:
                self.reader.copy_args = True  # from the next call on: copied at the call
                raise ContextChanged("a stack argument was written in place after the call")

    def nbytes(self) -> int:
        """Bytes of the argument tensors held (a superset of what the context keeps), counted at the call."""
        return self.size
