"""Graph-safe capture: the model's own forward writes its routing into device ring buffers.

Instead of hooks, the stack module's and the routers' ``forward`` are wrapped (instance attributes, removed on
detach, outputs returned untouched so the model is bit-identical): the stack's wrapper records the token
context (ids, positions, real-token mask) with ``moeprobe::record_step``, a router's wrapper records its top-k
ids and gate weights with ``moeprobe::record_routing`` and/or adds them to per-step expert counts with
``moeprobe::count_routing`` (:mod:`.graph_ops`). ``torch.compile(fullgraph=True)`` traces the wrappers without a
graph break, and a CUDA graph captured over a step replays the ops with the same buffers.

The host drains the rings between steps (:meth:`GraphCapture.drain`): on CUDA with asynchronous copies on a
side stream into pinned memory (the model's stream waits for the side stream only before its next write, the
host never does); the writer thread waits for the copies and turns the rows into the same StepBuffers hook
capture produces, so sequences, positions and phases are decided by the same code. Whatever did not fit in a
ring is counted and the incomplete steps are dropped and counted, never written short.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from ..traces.schema import TABLES
from . import contracts, graph_ops as ops
from .capture import LayerCapture, StepBuffer
from .wrapping import ForwardWraps
from .host_counts import DeferredCounts, Noted, apply as apply_noted
from .host_rows import Note, RoutingNotes, TokenNote, fill as fill_routing, fill_tokens
from .host_steps import cache_length, counts_call, plain_call, plain_context
from .token_context import NEW, UNKNOWN, ContextReader, TokenContext
from .discovery import LayerBinding

DEFAULT_DRAIN_EVERY = 32  # model calls between automatic drains
DEFAULT_RING_TOKENS = 1 << 16  # token rows per drain period; routing rows are this x MoE layers
DEFAULT_COUNTS_WINDOW = 64  # steps the counts buffer holds between drains (drains come every 32 calls by default)
MAX_STEP_TOKENS = 1 << 16  # largest batch x seq_len whose padding mask the counts can use


@dataclass
class Snapshot:
    """What one drain took off the device (host tensors; on CUDA valid once ``ready`` has completed)."""

    state: torch.Tensor
    steps: torch.Tensor | None
    tokens: torch.Tensor | None
    routing: torch.Tensor | None
    counts: torch.Tensor | None
    ready: Any  # torch.cuda.Event or None
    drained_at: float
    # Counts mode on the host: steps and router calls noted since the last drain, written into these copies by
    # the writer (unpack), and the step ring's capacity they are written against.
    noted: Noted | None = None
    step_capacity: int = 0
    # Graph capture on the host: routing and token rows of sampled steps noted since the last drain, filled into
    # ``routing`` and ``tokens`` by the writer (unpack).
    routing_notes: list[Note] | None = None
    token_notes: list[TokenNote] | None = None


def _from_mask_4d(mask: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(real-token mask, positions) from a 4-D mask, on the device: the writer's rule (sequences._from_mask_4d).

    The last query of a batch row is a real token and attends to its own cache slot last, which locates every
    query's slot; a query is real when it attends to its own slot and is not a padding row "unmasked" to attend
    everywhere. Where the writer's version would give up (no slot found), the query is marked padding."""
    if mask.dtype == torch.bool:
        attend = mask[:, 0]
    elif mask.is_floating_point():
        attend = mask[:, 0] == 0
    else:
        attend = mask[:, 0] != 0
    kv = attend.shape[-1]
    last = attend[:, -1, :]  # (batch, kv)
    last_slot = kv - 1 - torch.argmax(torch.flip(last, dims=[1]).to(torch.int8), dim=1)
    back = seq_len - 1 - torch.arange(seq_len, device=mask.device)
    slots = last_slot[:, None] - back[None, :]  # (batch, seq_len)
    inside = (slots >= 0) & last.any(dim=1, keepdim=True)
    at = slots.clamp(min=0)
    own = attend.gather(2, at[..., None]).squeeze(-1)
    unmasked_everywhere = attend.all(dim=2) & (slots < kv - 1)
    valid = own & ~unmasked_everywhere & inside
    positions = torch.cumsum(last.to(torch.int64), dim=1).gather(1, at) - 1
    return valid, torch.where(inside, positions, -1)


def _positions_and_valid(ctx: TokenContext, past: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, real-token mask), both (batch, seq_len), computed on the device from what the stack was given.

    The writer's sources (:mod:`.sequences`), in its order, restricted to what needs no host sync:
    ``position_ids``; a 2-D mask covering the whole sequence; the cache length when it is an int; a 4-D mask; the
    cache length as a device tensor (static caches); ``0..seq_len-1`` without a cache; else -1 (the writer counts
    unknown positions)."""
    batch, seq_len = ctx.batch, ctx.seq_len
    known = next((t for t in (ctx.input_ids, ctx.position_ids, ctx.attention_mask, ctx.mask_4d) if t is not None), None)
    dev = known.device if known is not None else torch.device("cpu")
    mask = ctx.attention_mask
    from_4d = _from_mask_4d(ctx.mask_4d, seq_len) if ctx.mask_4d is not None and mask is None else None
    if mask is not None:
        valid = mask[:, -seq_len:] != 0
    elif from_4d is not None:
        valid = from_4d[0]
    else:
        valid = torch.ones((batch, seq_len), dtype=torch.bool, device=dev)
    arange = torch.arange(seq_len, device=dev, dtype=torch.int64)
    if ctx.position_ids is not None:
        positions = ctx.position_ids.to(torch.int64).expand(batch, seq_len)
    elif mask is not None and (past is None or isinstance(past, torch.Tensor) or mask.shape[1] == past + seq_len):
        positions = (torch.cumsum((mask != 0).to(torch.int64), dim=1) - 1)[:, -seq_len:]
    elif isinstance(past, int):
        positions = (past + arange).expand(batch, seq_len)
    elif from_4d is not None:
        positions = from_4d[1]
    elif isinstance(past, torch.Tensor):
        positions = (past.to(torch.int64).reshape(()) + arange).expand(batch, seq_len)
    elif ctx.continuity == NEW:
        positions = arange.expand(batch, seq_len)
    else:
        positions = torch.full((batch, seq_len), -1, dtype=torch.int64, device=dev)
    return positions, valid


class _Route:
    """Where one layer's routing is read in graph capture: the router's output, or, once its first call returned
    bare logits, the experts module's inputs."""

    __slots__ = ("via_experts",)

    def __init__(self) -> None:
        self.via_experts = False


class GraphCapture:
    """Device buffers, the wrapped forwards, and the drain, for one probe."""

    def __init__(
        self,
        layers: list[LayerBinding],
        stack: nn.Module,
        reader: ContextReader,
        *,
        device: torch.device,
        tokens: bool,
        counts: bool,
        sample: int,
        ring_tokens: int = DEFAULT_RING_TOKENS,
        counts_window: int = DEFAULT_COUNTS_WINDOW,
    ) -> None:
        self.layers = layers
        self.stack = stack
        self.reader = reader
        self.device = device
        self.tokens = tokens
        self.counts = counts
        self.sample = max(1, int(sample))
        top_ks = {int(layer.meta["top_k"]) for layer in layers}
        if len(top_ks) != 1:
            raise ValueError(f"graph-safe capture needs one top-k for all MoE layers, found {sorted(top_ks)}")
        k = top_ks.pop()
        experts = max(int(layer.meta["num_experts"]) for layer in layers)
        self.state = torch.zeros(ops.STATE_SIZE, dtype=torch.int64, device=device)
        self.state[ops.STEP] = -1
        # +1: the trash row where writes past the capacity land.
        self.step_ring = torch.zeros((max(counts_window, ring_tokens // 8) + 1, ops.STEP_COLUMNS), dtype=torch.int32, device=device)
        rows = ring_tokens if tokens else 0
        self.token_ring = torch.zeros((rows + 1, ops.TOKEN_COLUMNS), dtype=torch.int32, device=device)
        self.routing_ring = torch.zeros((rows * len(layers) + 1, ops.ROUTING_FIXED + 2 * k), dtype=torch.int32, device=device)
        self.valid_now = torch.zeros(MAX_STEP_TOKENS, dtype=torch.int32, device=device)
        self.counts_buf = (
            # +1 slot: the trash slot of steps outside the window; +1 column: expert ids outside 0..experts-1.
            torch.zeros((counts_window + 1, len(layers), experts + 1), dtype=torch.int32, device=device) if counts else None
        )
        self.contract_failures: dict[int, str] = {}  # layer -> why its wrapper could not read the routing
        # Counts mode, eagerly on the host: steps without mask or positions are noted and counted at the drain.
        self.deferred = (
            DeferredCounts(self.state, self.step_ring, self.counts_buf, self.valid_now, k)
            if self.counts_buf is not None and not tokens and device.type == "cpu"
            else None
        )
        # Token rows on the host, eagerly: routing rows and plain steps' token rows noted, filled in by the writer.
        self.routing_notes = RoutingNotes(self.routing_ring, k) if tokens and device.type == "cpu" else None
        self._wraps = ForwardWraps()
        # Drains are counted by a hook on the model the user calls until its first call shows the stack's wrapper
        # running eagerly inside it; from then on the stack's wrapper counts them (graph_session.after_call).
        self.stack_ran = False
        self.stack_traced = False  # set when the stack's wrapper ran inside a traced graph (GraphSession.drain reads it)
        self.hand_over: Callable[[int], None] = lambda calls_to_drain: None  # set by the stack's wrapper (attach)
        self.drain_due: Callable[[], int] = lambda: 0  # the session's: drain now, return the calls to the next drain
        self._side = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.steps_drained = 0

    # -- attaching ----------------------------------------------------------------------------------
    def attach(self) -> None:
        self._wraps.wrap(self.stack, self._stack_forward)
        for layer in self.layers:
            record, route = self._recorder(layer), _Route()
            self._wraps.wrap(layer.source_module, functools.partial(self._layer_forward, layer=layer, record=record, route=route))
            if layer.source == "router" and layer.experts_fallback is not None:
                # A router that may return bare logits (DeepSeek-V3 before transformers 5.13 routes in the block):
                # then the routing is read from the experts module's inputs, as hook capture does.
                self._wraps.wrap(layer.experts_fallback, functools.partial(self._experts_forward, layer=layer, record=record, route=route))

    def detach(self) -> None:
        self._wraps.restore()

    def _stack_forward(self, original: Callable[..., Any]) -> Callable[..., Any]:
        reader = self.reader
        sample = self.sample if self.tokens else 0  # counts mode: no token rows to build
        counts = self.counts_buf
        window = counts.shape[0] - 1 if counts is not None else 0
        row = counts.shape[1] * counts.shape[2] if counts is not None else 0

        deferred = self.deferred  # set exactly when counts mode runs on the host without token rows
        plain_ok = deferred is not None and not ops.FORCE_DEVICE_PATH
        # Token rows on the host (tokens mode, sampling): a call without mask or positions skips the tensors too.
        plain_tokens_ok = self.tokens and self.device.type == "cpu" and not ops.FORCE_DEVICE_PATH
        note_tokens = self.routing_notes.note_tokens if self.routing_notes is not None else None  # rows by the writer
        noted_steps = deferred.steps if deferred is not None else []
        compiling = torch.compiler.is_compiling
        cuda = self.device.type == "cuda"
        # Eager calls left to the next drain once the session handed the drain count to this wrapper (0: not yet,
        # GraphSession.after_call). Kept here, not on an object: measured inside the decode loop, after the model's
        # own work, every attribute and call read costs microseconds (a method call to count cost 9 us a step).
        left = 0

        def hand_over(calls_to_drain: int) -> None:
            nonlocal left
            left = calls_to_drain

        self.hand_over = hand_over

        def forward(*args: Any, **kwargs: Any) -> Any:
            nonlocal left
            if plain_ok and not compiling():
                step = counts_call(reader, args, kwargs)
                if step is not None:
                    # Counts mode, eager on the host, every token of the call real: all the step needs is
                    # integers, noted here and written at the drain (host_counts; DeferredCounts.note_step,
                    # inlined: a frame less a step).
                    if deferred.tokens >= deferred.max_tokens:  # type: ignore[union-attr]
                        deferred.flush()  # type: ignore[union-attr]  # at most max_tokens and one step's router outputs alive
                    noted_steps.append(step)
                    deferred.tokens += step[0] * step[1]  # type: ignore[union-attr]
                    deferred.active = True  # type: ignore[union-attr]
                    output = original(*args, **kwargs)
                    if left:  # the stack counts the drains (_eager_end, inlined)
                        left -= 1
                        if not left:
                            left = self.drain_due()
                    else:
                        self.stack_ran = True
                    return output
            elif plain_tokens_ok and not compiling():
                plain = plain_call(reader, args, kwargs)
                if plain is not None:
                    ops.record_plain_tokens_host(
                        self.step_ring, self.token_ring, self.state, plain[4], plain[3], plain[2], sample, window, row, note_tokens
                    )
                    output = original(*args, **kwargs)
                    left = self._eager_end(left)
                    return output
            if deferred is not None and deferred.active:
                deferred.stop()  # this step takes the per-call path: the state must be current first
            ctx = reader.read(args, kwargs)
            if ctx is None:
                # Without token ids or embeddings there is no step to file this call's routing under: refused at
                # the next drain rather than mixed into the previous step.
                self.contract_failures[-1] = "the token stack was called without token ids or embeddings moeprobe can read"
            elif plain_ok and not torch.compiler.is_compiling() and plain_context(ctx, past := cache_length(args, kwargs)):
                # Counts mode, eager on the host, no mask and no positions given: all the step needs is integers.
                ops.record_plain_step_host(self.step_ring, self.state, ctx.batch, ctx.seq_len, past == 0 if past is not None else ctx.continuity == NEW, window, row)
            else:
                positions, valid = _positions_and_valid(ctx, cache_length(args, kwargs))
                ids = ctx.input_ids if ctx.input_ids is not None else torch.full_like(positions, -1)
                record = torch.ops.moeprobe.record_step if torch.compiler.is_compiling() else ops.record_step_impl
                record(
                    self.step_ring, self.token_ring, self.valid_now, self.state,
                    ids.expand(ctx.batch, ctx.seq_len), positions, valid.to(torch.int64), sample, window, row,
                )
            output = original(*args, **kwargs)
            if compiling():
                # In a graph: the drain hook counts the model's eager calls. The store is replayed by dynamo after
                # each run of the graph: the next eager drain puts the hook back if the stack had taken over.
                self.stack_traced = True
                return output
            if cuda and torch.cuda.is_current_stream_capturing():
                return output  # captured into a CUDA graph: its replays are not eager calls
            left = self._eager_end(left)
            return output

        return forward

    def _eager_end(self, left: int) -> int:
        """The stack's wrapper after an eager call: count it towards the next drain once the session handed the
        count to the stack (``left`` > 0: calls to the next drain; returns the new count), else note that the stack
        ran eagerly (:meth:`.graph_session.GraphSession.after_call` hands the count over on seeing it)."""
        if not left:
            self.stack_ran = True
            return 0
        left -= 1
        return left if left else self.drain_due()

    def _recorder(self, layer: LayerBinding) -> Callable[[Any, Any, Any], None]:
        """``record(indices, weights, seen)``: one layer call's routing into the rings and counts (``seen``, what the
        indices were read from, names a contract failure)."""
        k, index = int(layer.meta["top_k"]), layer.index
        ring = self.routing_ring
        tokens = self.tokens
        counts_buf = self.counts_buf  # allocated exactly when counts mode is on
        # Counts on the host, eagerly: straight to the count's host path (graph_ops.count_host) with the buffer's
        # row view and the state's numpy view bound here, not looked up per call.
        host_counts = counts_buf is not None and self.device.type == "cpu"
        rows = ops._rows(counts_buf) if host_counts and counts_buf is not None else None
        state_view = ops._view(self.state) if host_counts else None
        valid_now = self.valid_now
        deferred = self.deferred
        notes = self.routing_notes
        notes_state = ops._view(self.state) if notes is not None else None
        compiling = torch.compiler.is_compiling

        def record(indices: Any, weights: Any, seen: Any) -> None:
            if not isinstance(indices, torch.Tensor) or not contracts.is_integer(indices) or indices.shape[-1] != k:
                # Read at trace time (shapes and dtypes only): the host sees it at the next drain and refuses.
                self.contract_failures[index] = f"expected integer indices with last dimension {k}, got {contracts.describe(seen)}"
                return
            traced = compiling()  # in a graph: the ops; eagerly: their implementations
            if deferred is not None and deferred.active and not traced and indices.is_cpu:
                deferred.note_call(index, indices)  # a noted step: counted with the others at the drain
                return
            if rows is not None and not traced and not ops.FORCE_DEVICE_PATH and not tokens:
                n = indices.numel()
                if n:
                    ops.count_host(rows, state_view, valid_now, indices, n // k, k, index)  # type: ignore[arg-type]
                return
            flat = indices.reshape(-1, k)
            if (
                notes is not None and notes_state is not None and not traced and not ops.FORCE_DEVICE_PATH and flat.is_cpu
                and (weights is None or (isinstance(weights, torch.Tensor) and weights.numel() == flat.numel()))
            ):
                notes.note(notes_state, index, flat, weights)  # rows filled by the writer at the drain (host_rows)
            elif tokens:
                w = weights if weights is not None else torch.full(flat.shape, float("nan"), device=flat.device)
                record_routing = torch.ops.moeprobe.record_routing if traced else ops.record_routing_impl
                record_routing(ring, self.state, flat, w.reshape(flat.shape), index)
            if counts_buf is not None:
                count = torch.ops.moeprobe.count_routing if traced else ops.count_routing_impl
                count(counts_buf, self.state, valid_now, flat, index)

        return record

    def _layer_forward(
        self, original: Callable[..., Any], layer: LayerBinding, record: Callable[[Any, Any, Any], None], route: _Route
    ) -> Callable[..., Any]:
        index, num_experts = layer.index, int(layer.meta["num_experts"])
        from_router = layer.source == "router"
        may_route_in_block = from_router and layer.experts_fallback is not None

        slots: list[tuple[int, int, int]] = []  # where in the router's output tuple the last call found indices, weights; and the tuple length they need
        at, need = 0, 1 << 30  # slots[0]'s index place and tuple length, once found (no tuple is that long before)
        deferred = self.deferred
        noted_steps = deferred.steps if deferred is not None else []
        note = deferred.calls.append if deferred is not None else None
        k = int(layer.meta["top_k"])
        integer = contracts.INTEGER_DTYPES
        compiling = torch.compiler.is_compiling

        def forward(*args: Any, **kwargs: Any) -> Any:
            nonlocal at, need
            output = original(*args, **kwargs)
            if note is not None and isinstance(output, tuple) and len(output) > need and deferred.active:  # type: ignore[union-attr]
                # Counts mode, a noted step (host_counts): only the indices matter, at the place the first call
                # found them, checked as record() checks them; noted by reference (DeferredCounts.note_call,
                # inlined: a frame less, three times a step). Anything else: the general path.
                i = output[at]
                if isinstance(i, torch.Tensor) and i.dtype in integer and i.shape[-1:] == (k,) and not compiling():
                    try:
                        version = i._version
                    except RuntimeError:
                        version = -1  # an inference tensor: no version counter to check
                    note((len(noted_steps) - 1, index, version, i))
                    return output
            if route.via_experts:
                return output
            indices = weights = None
            if slots and isinstance(output, tuple) and len(output) > slots[0][2]:
                # Same places as last time, re-checked by dtype and shape (cheaper than identifying every part).
                i, w = output[slots[0][0]], output[slots[0][1]]
                if isinstance(i, torch.Tensor) and contracts.is_integer(i) and isinstance(w, torch.Tensor) and w.is_floating_point() and w.shape == i.shape:
                    indices, weights = i, w
            if indices is None:
                if may_route_in_block and not slots and contracts.logits_only(output, num_experts) is not None:
                    route.via_experts = True  # decided once, on the first call: the experts' wrapper records from now on
                    return output
                try:
                    parts = layer.extract(output, args[0] if args else None) if from_router else layer.extract(args, kwargs)
                except Exception as exc:  # noqa: BLE001 - a contract failure: refused at the next drain, never raised into the model
                    self.contract_failures[index] = f"{type(exc).__name__}: {exc}"
                    return output
                indices, weights = parts[0], parts[1]
                if from_router and isinstance(output, tuple) and not slots:
                    found = [next((n for n, t in enumerate(output) if t is part), -1) for part in (indices, weights)]
                    if min(found) >= 0:
                        slots.append((found[0], found[1], max(found)))
                        at, need = found[0], max(found)
                        if may_route_in_block and not compiling():
                            # The router returns its top-k (the experts' wrapper would never record, see above):
                            # the experts' forward goes back to the model now, a frame less per call. Traced, the
                            # wrapper stays (no side effects in a trace); it passes the call through.
                            self._wraps.unwrap(layer.experts_fallback)  # type: ignore[arg-type]
            record(indices, weights, output)
            return output

        return forward

    def _experts_forward(
        self, original: Callable[..., Any], layer: LayerBinding, record: Callable[[Any, Any, Any], None], route: _Route
    ) -> Callable[..., Any]:
        k, index = int(layer.meta["top_k"]), layer.index

        def forward(*args: Any, **kwargs: Any) -> Any:
            if route.via_experts:
                try:
                    indices, weights = contracts.experts_parts((*args, *kwargs.values()), k)
                except contracts.ContractError as exc:
                    self.contract_failures[index] = str(exc)
                else:
                    record(indices, weights, indices)
            return original(*args, **kwargs)

        return forward

    # -- draining -----------------------------------------------------------------------------------
    def drain(self) -> Snapshot:
        """Take the rings' contents off the device and reset their cursors. Never synchronises the host on CUDA."""
        now = time.time()
        noted = self.deferred.take() if self.deferred is not None else None  # written by the writer (unpack)
        routing_notes, token_notes = self.routing_notes.take() if self.routing_notes is not None else (None, None)  # likewise
        buffers = [self.state, self.step_ring]
        if self.tokens:
            buffers += [self.token_ring, self.routing_ring]
        if self.counts_buf is not None:
            buffers.append(self.counts_buf)
        if self._side is None:
            # On the host the cursors can be read for free: copy only the rows in use (and the trash row's place).
            copies = [self.state.clone()]
            s: Any = ops._view(self.state) if self.state.is_cpu else self.state  # element reads without a tensor op each
            cursors = [int(s[ops.STEP_CURSOR])]
            if self.tokens:
                cursors += [int(s[ops.TOKEN_CURSOR]), int(s[ops.ROUTING_CURSOR])]
            for b, cursor in zip(buffers[1:], cursors, strict=False):
                used = min(cursor, b.shape[0] - 1)
                copies.append(torch.cat([b[:used], b[-1:]]))  # the last row stands for the trash row
            if self.counts_buf is not None:
                copies.append(self.counts_buf.clone())
            if noted is not None and self.deferred is not None:
                self.deferred.advance(noted)  # before the reset: the next window starts after the noted steps
            self._reset()
            ready = None
        else:
            main = torch.cuda.current_stream(self.device)
            self._side.wait_stream(main)
            with torch.cuda.stream(self._side):
                copies = [torch.empty(b.shape, dtype=b.dtype, pin_memory=True) for b in buffers]
                for host, b in zip(copies, buffers, strict=True):
                    host.copy_(b, non_blocking=True)
                self._reset()
                ready = torch.cuda.Event()
                ready.record(self._side)
            main.wait_stream(self._side)  # the model's next write waits for the copies and the reset, on the device
        state, step_ring = copies[0], copies[1]
        rest = copies[2:]
        tokens = routing = counts = None
        if self.tokens:
            tokens, routing, rest = rest[0], rest[1], rest[2:]
        if self.counts_buf is not None:
            counts = rest[0]
        return Snapshot(
            state=state, steps=step_ring, tokens=tokens, routing=routing, counts=counts, ready=ready, drained_at=now,
            noted=noted, step_capacity=self.step_ring.shape[0] - 1, routing_notes=routing_notes, token_notes=token_notes,
        )

    def _reset(self) -> None:
        # On the host through the numpy view (the same memory; a scalar write there instead of a tensor op each);
        # on a GPU as device ops on the side stream.
        s: Any = ops._view(self.state) if self.state.is_cpu else self.state
        for slot in (ops.STEP_CURSOR, ops.TOKEN_CURSOR, ops.ROUTING_CURSOR):
            s[slot] = 0
        s[ops.COUNTS_BASE] = s[ops.STEP] + 1
        s[ops.COUNTS_LOST] = 0
        s[ops.MASK_MISMATCH] = 0
        s[ops.COUNTS_IDS_CHANGED] = 0
        if self.counts_buf is not None:
            self.counts_buf.zero_()


def wait_ready(snapshot: Snapshot) -> None:
    """Writer thread: wait for a drain's copies by polling (never a host sync under the sync debug mode)."""
    if snapshot.ready is not None:
        while not snapshot.ready.query():
            time.sleep(0.0002)


@dataclass
class DrainedSteps:
    """A snapshot turned into per-step objects on the writer thread."""

    steps: list[StepBuffer]  # sampled steps, complete, as hook capture would have produced them
    headers: list[tuple[int, int, int, bool, int]]  # every step: (step, batch, seq_len, new sequences, real tokens)
    loads: pa.Table | None
    lost: dict[str, int]  # anomaly kind -> count
    dropped_decisions: int  # decisions of sampled steps left out because a ring overflowed


def unpack(snapshot: Snapshot, layers: list[LayerBinding], stack_id: int, tags: Any, phase_of: Callable[[int, int, bool], str]) -> DrainedSteps:
    """Rows of a drained snapshot -> StepBuffers (token context + per-layer captures) and a loads table."""
    if snapshot.noted is not None:
        _write_noted(snapshot)
    state = snapshot.state.numpy()
    lost: dict[str, int] = {}
    changed = 0
    if snapshot.routing_notes and snapshot.routing is not None:
        ring = snapshot.routing.numpy()
        changed += fill_routing(snapshot.routing_notes, ring, (ring.shape[1] - ops.ROUTING_FIXED) // 2)
    if snapshot.token_notes and snapshot.tokens is not None:
        changed += fill_tokens(snapshot.token_notes, snapshot.tokens.numpy())
    if changed:
        lost["graph_rows_changed"] = changed  # router outputs or token ids written in place before the writer read them
    snapshot.routing_notes = snapshot.token_notes = None
    assert snapshot.steps is not None  # every drain takes the step ring
    headers_arr = _used(snapshot.steps, int(state[ops.STEP_CURSOR]), "graph_ring_overflow:steps", lost)
    headers = [(int(r[0]), int(r[1]), int(r[2]), bool(r[3]), int(r[4])) for r in headers_arr]
    steps: list[StepBuffer] = []
    dropped = 0
    if snapshot.tokens is not None and snapshot.routing is not None:
        tokens = _used(snapshot.tokens, int(state[ops.TOKEN_CURSOR]), "graph_ring_overflow:tokens", lost)
        routing = _used(snapshot.routing, int(state[ops.ROUTING_CURSOR]), "graph_ring_overflow:routing", lost)
        steps, dropped = _steps_from_rows(headers, tokens, routing, layers, stack_id, tags, lost, snapshot.drained_at)
    loads = None
    if snapshot.counts is not None:
        base = int(state[ops.COUNTS_BASE])
        counts = snapshot.counts.numpy()[:-1]
        invalid = int(counts[:, :, -1].sum())
        if invalid:
            lost["graph_counts_invalid_expert"] = invalid  # choices of an expert id the layer does not have
        counts = counts[:, :, :-1]
        if int(state[ops.COUNTS_LOST]):
            lost["graph_counts_window_overflow"] = int(state[ops.COUNTS_LOST])
        loads = _loads_table(counts, base, headers, phase_of)
    if int(state[ops.MASK_MISMATCH]):
        lost["graph_counts_mask_mismatch"] = int(state[ops.MASK_MISMATCH])
    if int(state[ops.COUNTS_IDS_CHANGED]):
        lost["graph_counts_ids_changed"] = int(state[ops.COUNTS_IDS_CHANGED])
    return DrainedSteps(steps=steps, headers=headers, loads=loads, lost=lost, dropped_decisions=dropped)


def _write_noted(snapshot: Snapshot) -> None:
    """Writer thread: the steps and calls counts mode noted on the host (host_counts) into the drain's copies, as
    the per-call path would have written them into the buffers before the copy."""
    noted, state = snapshot.noted, snapshot.state.numpy()
    assert noted is not None and snapshot.steps is not None and snapshot.counts is not None  # counts mode
    used = min(int(state[ops.STEP_CURSOR]), snapshot.step_capacity)
    ring = np.zeros((snapshot.step_capacity + 1, ops.STEP_COLUMNS), dtype=np.int32)  # the ring at full size
    ring[:used] = snapshot.steps.numpy()[:used]
    apply_noted(noted, state, ring, snapshot.counts)
    snapshot.steps, snapshot.noted = torch.from_numpy(ring), None


def _used(ring: torch.Tensor, cursor: int, kind: str, lost: dict[str, int]) -> np.ndarray:
    arr = ring.numpy()[:-1]  # without the trash row
    if cursor > len(arr):
        lost[kind] = lost.get(kind, 0) + cursor - len(arr)
        cursor = len(arr)
    return arr[:cursor]


def _steps_from_rows(
    headers: list[tuple[int, int, int, bool, int]],
    tokens: np.ndarray,
    routing: np.ndarray,
    layers: list[LayerBinding],
    stack_id: int,
    tags: Any,
    lost: dict[str, int],
    drained_at: float,
) -> tuple[list[StepBuffer], int]:
    by_step_tokens = _group(tokens)
    by_step_routing = _group(routing)
    out: list[StepBuffer] = []
    dropped = 0
    for step, batch, seq_len, _new, _real in headers:
        if step not in by_step_tokens and step not in by_step_routing:
            continue  # not sampled
        n = batch * seq_len
        tok = by_step_tokens.get(step)
        part = by_step_routing.get(step, routing[:0])
        per_layer = {int(layer): part[part[:, 1] == layer] for layer in np.unique(part[:, 1])}
        # Complete: every token, and every MoE layer once (a layer routes all the step's tokens, like hook capture
        # sees them). A ring that overflowed mid-step leaves it short: dropped and counted, never written short.
        complete = tok is not None and len(tok) == n and all(layer.index in per_layer for layer in layers)
        if not complete or tok is None:
            dropped += len(part) * (part.shape[1] - ops.ROUTING_FIXED) // 2
            lost["graph_incomplete_step"] = lost.get("graph_incomplete_step", 0) + 1
            continue
        ids = torch.from_numpy(tok[:, 1].reshape(batch, seq_len).copy())
        ctx = TokenContext(
            stack_id=stack_id,
            batch=batch,
            seq_len=seq_len,
            continuity=UNKNOWN,
            input_ids=None if (ids < 0).all() else ids,
            position_ids=None if (tok[:, 2] < 0).any() else torch.from_numpy(tok[:, 2].reshape(batch, seq_len).copy()),
            attention_mask=torch.from_numpy(tok[:, 3].reshape(batch, seq_len).copy()),
            mask_4d=None,
            past_len=None,
            tags=tags,
        )
        buffer = StepBuffer(step=step, started_at=drained_at, wall_ms=float("nan"))
        buffer.contexts.append(ctx)
        for layer in layers:
            rows = per_layer[layer.index]
            rows = rows[np.argsort(rows[:, 2], kind="stable")]
            k = (rows.shape[1] - ops.ROUTING_FIXED) // 2
            indices = torch.from_numpy(rows[:, ops.ROUTING_FIXED : ops.ROUTING_FIXED + k].copy())
            weights = torch.from_numpy(rows[:, ops.ROUTING_FIXED + k :].astype(np.int32).view(np.float32).copy())
            buffer.layers.append(LayerCapture(layer=layer.index, context=ctx, indices=indices, weights=weights, scores=None, dropped=None))
        out.append(buffer)
    return out, dropped


def _group(rows: np.ndarray) -> dict[int, np.ndarray]:
    """Rows grouped by their step column (rows of a step are contiguous: the ring is written in order)."""
    if len(rows) == 0:
        return {}
    steps = rows[:, 0]
    cuts = np.flatnonzero(np.diff(steps)) + 1
    groups: dict[int, np.ndarray] = {}
    for part in np.split(rows, cuts):
        step = int(part[0, 0])
        groups[step] = np.concatenate([groups[step], part]) if step in groups else part
    return groups


def _loads_table(counts: np.ndarray, base: int, headers: list[tuple[int, int, int, bool, int]], phase_of: Callable[[int, int, bool], str]) -> pa.Table | None:
    """One row per (step, layer, expert) with a non-zero count: the ``loads`` table."""
    phases = {h[0]: phase_of(h[1], h[2], h[3]) for h in headers}
    slot, layer, expert = np.nonzero(counts)
    if len(slot) == 0:
        return None
    step = slot + base
    return pa.table(
        {
            "step": pa.array(step.astype(np.int32)),
            "phase": pa.array([phases.get(int(s), "prefill") for s in step], pa.string()),
            "layer": pa.array(layer.astype(np.int16)),
            "expert": pa.array(expert.astype(np.int16)),
            "tokens": pa.array(counts[slot, layer, expert].astype(np.int64)),
        },
        schema=TABLES["loads"],
    )


def phase_of(batch: int, seq_len: int, new: bool) -> str:
    """The writer's rule (:mod:`.sequences`): a call of several tokens per row, or one starting new sequences, is
    prefill; one token per row continuing sequences is decode."""
    return "prefill" if (seq_len > 1 or new) else "decode"


