"""The writer thread: turns finished steps into Arrow rows and hands them to the trace writer.

The model's thread only calls ``submit``, which never blocks: when the pipeline holds more than its byte
budget the step is dropped and counted. The budget (``max_queue_bytes``) counts every stage that holds
memory, not only the queue (see ``Ledger``): steps queued on the model side, steps taken and collected but
not yet converted, converted rows awaiting a flush, and the tables of a flush being written. ``submit`` appends to a deque and does not wake the writer, which
runs once per flush interval (earlier only when the queue fills up): every hand-over of the GIL to the
writer delays the model's thread, so fewer, larger batches of conversion work cost the model least.
The thread flushes segments at least every ``flush_interval`` seconds, so a killed job loses at most that
much, and refreshes the manifest heartbeat even when idle.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple, overload

import numpy as np
import pyarrow as pa
import torch

from ..metrics.counts import LiveCounts
from ..traces.compact import decode
from ..traces.schema import PHASES, TABLES
from ..traces.writer import ShardWriter
from .capture import BLOCK_END, BLOCK_START, ROUTER_END, ROUTER_START, LayerCapture, StepBuffer
from .sequences import ResolvedTokens, SequenceTracker, unmatched_rows

log = logging.getLogger(__name__)


class PendingRouting(NamedTuple):
    """One layer's routing of one step on the writer thread, waiting to be emitted with the others of its top-k."""

    step: int
    layer: int
    phase: int  # PHASE_CODE
    indices: np.ndarray  # (tokens, k) expert ids
    weights: np.ndarray | None  # (tokens, k) gate weights; None when the router gives none
    rows: ResolvedTokens  # sequence, position, token id (and validity) of each token
    dropped: np.ndarray | None  # (tokens,) bool: over capacity; None when the router says nothing

STAGES = ("queued", "collected", "converted", "writing")


class Ledger:
    """Bytes held by each stage of the pipeline, against one budget; shared by the model's and the writer's thread.

    - queued: steps submitted and not yet taken by the writer (``StepBuffer.nbytes``, an estimate made on the
      model's thread, which must not walk arrays);
    - collected: steps taken by the writer, their arrays waiting in ``_pending_routing`` (measured: the arrays'
      ``nbytes``);
    - converted: encoded routing tables and other tables' rows waiting for the next flush (measured);
    - writing: the tables of the flush in progress, until the segment is on disk.

    ``submit`` admits a step only while the sum stays within the budget, so a writer stalled in a flush makes
    later steps drop (counted) instead of letting the queue grow beside what the writer already holds.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._lock = threading.Lock()
        self._bytes = dict.fromkeys(STAGES, 0)
        self.total = 0
        self.peak = 0

    def admit(self, size: int) -> bool:
        """Model's thread: charge ``size`` bytes to ``queued`` if the budget allows it."""
        with self._lock:
            if self.total + size > self.budget:
                return False
            self._bytes["queued"] += size
            self.total += size
            self.peak = max(self.peak, self.total)
            return True

    def move(self, source: str | None, size_from: int, target: str | None, size_to: int) -> None:
        """Writer thread: ``size_from`` bytes leave ``source`` and ``size_to`` bytes enter ``target`` (None:
        outside the pipeline), in one step so that the total is never seen half-moved. Entering bytes are charged
        whatever the budget: they already exist."""
        with self._lock:
            if source is not None:
                self._bytes[source] -= size_from
                self.total -= size_from
            if target is not None:
                self._bytes[target] += size_to
                self.total += size_to
            self.peak = max(self.peak, self.total)

    def stages(self) -> dict[str, int]:
        with self._lock:
            return dict(self._bytes)

    @property
    def queued(self) -> int:
        return self._bytes["queued"]  # one dict read: no lock needed for a wake-up decision


def _pending_nbytes(p: PendingRouting) -> int:
    """Host bytes one collected layer holds until it is emitted (its arrays may be views of the model's
    tensors: those stay alive because of it, so they count)."""
    rows = p.rows
    total = p.indices.nbytes + rows.sequence.nbytes + rows.position.nbytes + rows.token_id.nbytes
    for extra in (p.weights, p.dropped, rows.valid):
        if extra is not None:
            total += extra.nbytes
    return total


HEARTBEAT_S = 2.0
# How long close() waits for the writer thread before it gives up on it and marks the trace aborted.
CLOSE_TIMEOUT_S = 30.0
# Routing decisions collected before they are turned into rows. Bounded: one conversion over every queued
# step at once (tens of millions of decisions after a stall) allocates hundreds of MB of fresh temporaries,
# and measured slower per decision than batches of a few million (bench/writer_throughput.py).
EMIT_BATCH_DECISIONS = 1 << 22
PHASE_CODE = {name: code for code, name in enumerate(PHASES)}


@overload
def _np(t: torch.Tensor, dtype: Any = None) -> np.ndarray: ...
@overload
def _np(t: None, dtype: Any = None) -> None: ...
@overload
def _np(t: torch.Tensor | None, dtype: Any = None) -> np.ndarray | None: ...
def _np(t: torch.Tensor | None, dtype: Any = None) -> np.ndarray | None:
    if t is None:
        return None
    t = t.detach()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.to(torch.float32)
    arr = t.cpu().numpy()
    return arr if dtype is None else arr.astype(dtype, copy=False)


class _Columns:
    """Column chunks for one table, concatenated once per flush instead of once per step."""

    def __init__(self, table: str) -> None:
        self.schema = TABLES[table]
        self.chunks: dict[str, list[Any]] = {f.name: [] for f in self.schema}
        self.rows = 0

    def add(self, n: int, **columns: Any) -> int:
        """Add ``n`` rows; the bytes they hold (numpy and Arrow columns measured, lists of strings estimated)."""
        if n == 0:
            return 0
        size = 0
        for name, value in columns.items():
            self.chunks[name].append(value)
            size += _held(value)
        self.rows += n
        return size

    def add_rows(self, rows: list[tuple[Any, ...]]) -> int:
        """Add rows given as tuples in schema order (phases as their int8 codes); the bytes they hold."""
        size = 0
        for f, values in zip(self.schema, zip(*rows, strict=True), strict=True):
            if f.name == "phase":
                column: Any = np.array(values, np.int8)
            elif pa.types.is_string(f.type):
                column = list(values)
            else:
                column = np.array(values, dtype=f.type.to_pandas_dtype())
            self.chunks[f.name].append(column)
            size += _held(column)
        self.rows += len(rows)
        return size

    def take(self) -> pa.Table | None:
        if not self.rows:
            return None
        arrays = []
        for f in self.schema:
            parts = self.chunks[f.name]
            if pa.types.is_list(f.type):
                arrays.append(pa.chunked_array(parts, type=f.type))
            elif f.name == "phase":
                # Phases travel as int8 codes and become strings in one vectorised step.
                codes = pa.array(np.concatenate(parts).astype(np.int8))
                arrays.append(pa.DictionaryArray.from_arrays(codes, pa.array(PHASES)).cast(pa.string()))
            elif pa.types.is_string(f.type):
                arrays.append(pa.array(np.concatenate([np.asarray(p, dtype=object) for p in parts]), type=f.type))
            else:
                arrays.append(pa.array(np.concatenate(parts), type=f.type))
        self.chunks = {f.name: [] for f in self.schema}
        self.rows = 0
        return pa.table(arrays, schema=self.schema)


def _held(value: Any) -> int:
    """Bytes a column chunk holds: measured for arrays, estimated for a list of strings (a str object each)."""
    if isinstance(value, (np.ndarray, pa.Array, pa.ChunkedArray, pa.Table)):
        return int(value.nbytes)
    if isinstance(value, list):
        return sum(56 + len(v) for v in value if isinstance(v, str)) + 8 * len(value)
    return 0


def _warm_up() -> None:
    """Run every Arrow conversion the writer uses once, on the caller's thread at attach time.

    The first conversion makes pyarrow import optional modules lazily (pandas compatibility, when pandas is
    installed): about 0.3 s of imports that would otherwise happen on the writer thread while the model runs.
    So does the shard's first merge of segments (``pq.read_table`` imports pyarrow.dataset), imported here too.

    Such an import must not happen while the job ends on a KeyboardInterrupt either (the recording is closed,
    its last flush and merges made, then): it creates namedtuples, and CPython forgets that the KeyboardInterrupt
    went unhandled when any thread execs or evals a string before the interpreter exits, so the job exits 1
    instead of by SIGINT (130), under ``moeprobe record`` too.
    """
    import pyarrow.dataset  # noqa: F401 - imported for its side effect only (above)

    codes = pa.array(np.zeros(1, np.int8))
    pa.table(
        [
            pa.array(np.zeros(1, np.int32)),
            pa.DictionaryArray.from_arrays(codes, pa.array(PHASES)).cast(pa.string()),
            pa.array(np.array(["x"], dtype=object), type=pa.string()),
            pa.chunked_array([pa.ListArray.from_arrays(pa.array(np.array([0, 1], np.int32)), pa.array(np.zeros(1, np.float32)))]),
        ],
        names=["a", "b", "c", "d"],
    )


class CapturePipeline:
    def __init__(
        self,
        writer: ShardWriter,
        *,
        clock: Any,
        flush_interval: float = 1.0,
        max_queue_bytes: int = 256 << 20,
        redact_tokens: bool = False,
        counters: Callable[[], dict[str, int]] | None = None,
        primary_stack: int | None = 0,
        close_timeout: float = CLOSE_TIMEOUT_S,
        live: LiveCounts | None = None,
    ) -> None:
        self.writer = writer
        self.close_timeout = close_timeout
        # Metrics endpoint counts (moeprobe.metrics): fed in _flush with the tables being written, on this
        # thread, so the endpoint costs the model's thread nothing.
        self.live = live
        self.clock = clock
        self.flush_interval = flush_interval
        self.max_queue_bytes = max_queue_bytes
        self.redact_tokens = redact_tokens
        self._anomalies = counters or (lambda: {})
        self._queue: collections.deque[Any] = collections.deque()
        # The writer wakes once per flush interval, or early when the queued steps pass a quarter of the budget.
        # Waking it more often (every 50 ms) measured 8% slower decode steps on CPU than once a second: each
        # wake-up's Python work takes the GIL from the model's thread, and the cost is per hand-over.
        self._wake = threading.Event()
        self._wake_bytes = max_queue_bytes // 4
        # Every stage's bytes against the one budget (see Ledger). Converted rows are flushed early once they
        # pass a quarter of it, so that rows waiting for the flush interval never crowd out new steps.
        self._ledger = Ledger(max_queue_bytes)
        self._flush_bytes = max(1, max_queue_bytes // 4)
        self._collected_bytes = 0  # writer thread: what _pending_routing holds (also in the ledger)
        self._converted_bytes = 0  # writer thread: rows awaiting the next flush (also in the ledger)
        # CPU seconds of the writer thread (time.thread_time, refreshed at every wake-up and at the end): its
        # own work, apart from any work Arrow hands to its thread pools.
        self.cpu_seconds = 0.0
        self._lock = threading.Lock()
        # Routing rows are encoded per batch in the trace's compact form (format v2, traces/compact.py).
        self._routing_parts: list[pa.Table] = []
        self._routing_rows = 0
        self._steps = _Columns("steps")
        self._latency = _Columns("latency")
        self._tags = _Columns("tags")
        self._scores = _Columns("scores")
        self._bias = _Columns("bias")
        self._last_bias: dict[int, np.ndarray] = {}
        # Collected per step, turned into arrays once per batch (see _emit).
        self._pending_routing: dict[int, list[PendingRouting]] = {}
        self._pending_decisions = 0
        self._step_rows: list[tuple[Any, ...]] = []
        self._latency_rows: list[tuple[Any, ...]] = []
        self._warned_drops: set[str] = set()
        self._sequences = SequenceTracker(_np, writer.count_anomaly, primary_stack=primary_stack, redact_tokens=redact_tokens)
        self._warned_bad_step = False
        # Drops are counted here by the model's thread (reason -> decisions) and moved into the writer's counters
        # by the writer thread: constant memory however many steps are dropped (a queued record per drop grew
        # without bound when the writer was stuck).
        self._dropped: dict[str, int] = {}
        # Expert ids each layer may name (the routing table stores them as int16).
        layers: list[dict[str, Any]] = writer._header.get("layers", [])  # type: ignore[assignment]  # the writer's JSON header
        self._num_experts = {int(m["index"]): int(m["num_experts"]) for m in layers}
        self.failure: BaseException | None = None
        _warm_up()
        self._thread = threading.Thread(target=self._run, name="moeprobe-writer", daemon=True)
        self._thread.start()

    # -- model thread -------------------------------------------------------------------------------
    def submit_call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the writer thread, in queue order (graph capture: unpack a drained ring there)."""
        self._queue.append(("call", fn))

    def submit(self, step: StepBuffer, move: Callable[[StepBuffer], None] | None = None) -> bool:
        """Queue a finished step; drop and count it if the pipeline is over budget. Never blocks. ``move`` (the
        device-to-host transfer) runs only for a step that is queued."""
        size = step.nbytes()
        failed = self.failure is not None
        if failed or not self._ledger.admit(size):
            reason = "writer_failed" if failed else "queue_full"
            self.count_dropped(reason, step.decisions)
            return False
        if move is not None:
            move(step)
        self._queue.append(("step", step, size))
        if self._ledger.queued > self._wake_bytes and not self._wake.is_set():
            self._wake.set()
        return True

    def count_dropped(self, reason: str, decisions: int) -> None:
        """Model's thread (or any): count ``decisions`` lost for ``reason``; the writer moves them into the
        manifest's counters. Warns once."""
        with self._lock:
            self._dropped[reason] = self._dropped.get(reason, 0) + decisions
        if reason not in self._warned_drops:  # once per reason: each says something else about the recording
            self._warned_drops.add(reason)
            if reason == "step_over_budget":
                log.warning("moeprobe: a step's router outputs hold more than max_queue_mb; dropping such steps and counting "
                            "them in the manifest (step_over_budget)")
            else:
                log.warning("moeprobe: the trace writer is behind (%s); dropping records and counting them in the manifest", reason)

    @property
    def queued_bytes(self) -> int:
        """Bytes of steps submitted but not yet taken by the writer thread."""
        return self._ledger.queued

    @property
    def held_bytes(self) -> int:
        """Bytes held by every stage of the pipeline together: what the budget bounds."""
        return self._ledger.total

    def stage_bytes(self) -> dict[str, int]:
        """Bytes held per stage (queued, collected, converted, writing)."""
        return self._ledger.stages()

    def flush(self, timeout: float = 30.0) -> bool:
        """Write everything submitted so far (segments and manifest); True once it is on disk, False on timeout.

        For callers that must see what was captured (tests, a notebook reading its own trace): wait on this event,
        never on a sleep. Not for the model's thread in a loop: it wakes the writer at once.
        """
        done = threading.Event()
        self._queue.append(("flush", done))
        self._wake.set()
        return done.wait(timeout) and self.failure is None

    def close(self, status: str, error: str | None = None, timeout: float | None = None) -> None:
        """Stop the writer thread, which flushes and writes the final status. A writer that does not finish within
        ``timeout`` (a sink that hangs) is left behind: the trace is marked ``aborted`` with the reason from here,
        so that close() returns in bounded time and the trace does not stay ``running``."""
        timeout = self.close_timeout if timeout is None else timeout
        self._queue.append(("stop", status, error))
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._take_dropped()
            reason = f"the trace writer did not finish within {timeout:g} s (a stuck disk or sink); records still queued are lost"
            self.writer.abandon(reason)
            log.error("moeprobe: %s; the trace is marked aborted", reason)

    def _take_dropped(self) -> None:
        with self._lock:
            dropped, self._dropped = self._dropped, {}
        for reason, decisions in dropped.items():
            self.writer.count_dropped(reason, decisions)

    # -- writer thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        last_flush = time.monotonic()
        last_beat = last_flush
        while True:
            # Sleep until the next flush is due, or until woken early (queue filling up, or close).
            due = max(0.0, self.flush_interval - (time.monotonic() - last_flush))
            self._wake.wait(due)
            self._wake.clear()
            if self.writer.closed:
                return  # close() gave up on this thread and marked the trace aborted: nothing left to do
            try:
                self._take_dropped()
                while self._queue:
                    item = self._queue.popleft()
                    kind = item[0]
                    if kind == "stop":
                        self._stop(item[1], item[2])
                        return
                    if kind == "flush":
                        try:
                            self._flush()
                        finally:
                            item[1].set()
                        continue
                    if kind == "call":
                        try:
                            item[1]()
                        except Exception as exc:  # noqa: BLE001 - one bad drain must not end the recording
                            self._bad_call(exc)
                    elif kind == "step":
                        step, size = item[1], item[2]
                        # The estimate leaves as the step's arrays are charged to `collected` (measured) while
                        # they are collected: the same memory, never counted twice.
                        self._ledger.move("queued", size, None, 0)
                        del item
                        self.take_step(step)
                        del step
                    if self._converted_bytes >= self._flush_bytes:
                        self._flush()  # a long queue (after a stall) is written in bounded batches
                        last_flush = last_beat = time.monotonic()
                self._emit()
                now = time.monotonic()
                if now - last_flush >= self.flush_interval or self._converted_bytes >= self._flush_bytes:
                    if self._has_rows() or now - last_beat >= HEARTBEAT_S:
                        self._flush()
                        last_beat = now
                    last_flush = now
            except Exception as exc:  # noqa: BLE001 - the writer must outlive a bad record
                self.writer.count_anomaly(f"writer:{type(exc).__name__}")
                if self.failure is None:
                    self.failure = exc
                    log.error("moeprobe: trace writer error (%s: %s); records are being dropped", type(exc).__name__, exc)
            finally:
                self.cpu_seconds = time.thread_time()

    def _stop(self, status: str, error: str | None) -> None:
        """Final flush and status. Always ends in ``writer.close`` (a no-op after abandon), so the thread exits
        even when the last flush fails."""
        try:
            if not self.writer.closed:
                self._flush()
        except Exception as exc:  # noqa: BLE001 - the final status must still be written
            self.writer.count_anomaly(f"writer:{type(exc).__name__}")
        finally:
            self._take_dropped()
            self.writer.close(status, error)
            self.cpu_seconds = time.thread_time()

    def _check_step(self, step: StepBuffer) -> None:
        """Refuse a step whose captures break the shapes the rows are built from, before any of it is collected,
        so that a malformed router output costs that step only (and never leaves half a step behind)."""
        for capture in step.layers:
            shape = tuple(capture.indices.shape)
            if not shape:
                raise ValueError(f"layer {capture.layer}: expert indices of shape {shape}")
            if capture.indices.dtype.is_floating_point or capture.indices.dtype == torch.bool:
                raise ValueError(f"layer {capture.layer}: expert indices of type {capture.indices.dtype}")
            k = shape[-1] if len(shape) >= 2 else 1
            tokens = capture.indices.numel() // max(k, 1)
            if capture.weights is not None and capture.weights.numel() != tokens * k:
                raise ValueError(f"layer {capture.layer}: gate weights of shape {tuple(capture.weights.shape)} for "
                                 f"{tokens} tokens x top-{k} expert indices")
            if capture.dropped is not None and capture.dropped.numel() != tokens:
                raise ValueError(f"layer {capture.layer}: a dropped mask of shape {tuple(capture.dropped.shape)} for {tokens} tokens")
            if capture.scores is not None and (tokens == 0 or capture.scores.numel() % tokens):
                raise ValueError(f"layer {capture.layer}: router scores of shape {tuple(capture.scores.shape)} for {tokens} tokens")
            if k > 127:
                raise ValueError(f"layer {capture.layer}: top-{k} is more choices than the routing table stores")

    def take_step(self, step: StepBuffer) -> None:
        """Writer thread: check and collect one step; a malformed step is dropped and counted alone. (Graph
        capture's drains call this too, so its steps obey the same contract as hook capture's.)"""
        try:
            # Hook capture's stack arguments and router calls kept by reference, read and checked here
            # (noted_routing.py); a step left with nothing to write was counted there.
            if step.resolve is not None and not step.resolve(step):
                return
            self._check_step(step)
            self._convert(step)
        except Exception as exc:  # noqa: BLE001 - one malformed step must not end the recording
            self._drop_bad_step(step, exc)

    def _bad_call(self, exc: BaseException) -> None:
        """A queued call (a graph capture drain) failed: counted where the user sees it; later ones still run."""
        self.writer.count_anomaly(f"bad_drain:{type(exc).__name__}")
        if not self._warned_bad_step:
            self._warned_bad_step = True
            log.warning("moeprobe: could not write a drained batch of steps (%s: %s); later steps are still recorded, the "
                        "failure is counted in the manifest", type(exc).__name__, exc)

    def _drop_bad_step(self, step: StepBuffer, exc: BaseException) -> None:
        self.writer.count_dropped("bad_step", step.decisions)
        self.writer.count_anomaly(f"bad_step:{type(exc).__name__}")
        if not self._warned_bad_step:
            self._warned_bad_step = True
            log.warning("moeprobe: dropped a step the writer could not use (%s: %s); later steps are still recorded, "
                        "drops are counted in the manifest", type(exc).__name__, exc)

    def _has_rows(self) -> bool:
        return bool(self._routing_rows) or any(c.rows for c in (self._steps, self._latency, self._tags, self._scores, self._bias))

    def _sync_counters(self) -> None:
        for kind, n in self._anomalies().items():
            self.writer.counters["anomalies"][kind] = n

    def _flush(self) -> None:
        self._emit()
        # The rows leave `converted` for `writing` until the segments are on disk (or their write failed).
        writing, self._converted_bytes = self._converted_bytes, 0
        self._ledger.move("converted", writing, "writing", writing)
        try:
            if self._routing_parts:
                parts, self._routing_parts, self._routing_rows = self._routing_parts, [], 0
                stored = pa.concat_tables(parts)
                del parts
                if self.live is not None:  # the endpoint counts logical rows (one per decision)
                    self.live.add("routing", decode(stored, self.writer.routing_encoding, ["step", "layer", "k", "expert", "dropped"]))
                self.writer.append("routing", stored)
                del stored
            for name, columns in (
                ("steps", self._steps),
                ("latency", self._latency),
                ("tags", self._tags),
                ("scores", self._scores),
                ("bias", self._bias),
            ):
                table = columns.take()
                if table is not None:
                    if self.live is not None:
                        self.live.add(name, table)
                    self.writer.append(name, table)
            self._sync_counters()
            self.writer.flush()
        finally:
            self._ledger.move("writing", writing, None, 0)

    def _hold(self, size: int) -> None:
        """Writer thread: ``size`` bytes of rows now wait for the next flush."""
        if size:
            self._converted_bytes += size
            self._ledger.move(None, 0, "converted", size)

    def _convert(self, step: StepBuffer) -> None:
        """Collect one step's captures; the array work happens once per batch of steps in ``_emit``."""
        if step.ready is not None:
            # Poll rather than synchronize(): the writer sleeps without holding the GIL and never counts
            # as a host sync under torch's sync debug mode.
            while not step.ready.query():
                time.sleep(0.0002)
        # Token context first, in call order: it decides sequences even for a call no MoE layer saw.
        resolved: dict[int, ResolvedTokens] = {}
        tag_rows: list[tuple[int, str, str]] = []
        for ctx in step.contexts:
            tokens_of_call, started = self._sequences.resolve(ctx)
            resolved[id(ctx)] = tokens_of_call
            tag_rows.extend(started)
        first_tokens: ResolvedTokens | None = None
        for capture in step.layers:
            rows = self._collect_routing(step, capture, resolved)
            if first_tokens is None:
                first_tokens = rows
        first_ctx = resolved.get(id(step.contexts[0])) if step.contexts else None
        tokens = first_tokens.count() if first_tokens is not None else 0
        phase = first_ctx.phase if first_ctx is not None else (first_tokens.phase if first_tokens else "prefill")
        batch = step.contexts[0].batch if step.contexts else 0
        self._step_rows.append((step.step, PHASE_CODE[phase], batch, tokens, step.started_at, step.wall_ms))
        counters = self.writer.counters
        counters["steps"] += 1
        counters["tokens"] += tokens
        for layer, m in step.marks.items():
            router = self.clock.elapsed_ms(m[ROUTER_START], m[ROUTER_END])
            block = self.clock.elapsed_ms(m[BLOCK_START], m[BLOCK_END])
            self.clock.release(m)
            self._latency_rows.append(
                (step.step, layer, np.nan if router is None else router, np.nan if block is None else block, self.clock.name)
            )
        self.add_bias(step.step, step.bias)
        if tag_rows:
            self._hold(self._tags.add(
                len(tag_rows),
                sequence=np.array([t[0] for t in tag_rows], np.int64),
                key=[t[1] for t in tag_rows],
                value=[t[2] for t in tag_rows],
            ))
        if self._pending_decisions >= EMIT_BATCH_DECISIONS:
            self._emit()

    def add_bias(self, step: int, bias: dict[int, Any]) -> None:
        """Writer thread: bias vectors (layer -> tensor) in effect from ``step`` on, written only when they change."""
        for layer, tensor in bias.items():
            values = _np(tensor, np.float32)
            previous = self._last_bias.get(layer)
            if previous is not None and previous.shape == values.shape and np.array_equal(previous, values):
                continue
            self._last_bias[layer] = values.copy()
            self._hold(self._bias.add(
                1,
                step=np.array([step], np.int32),
                layer=np.array([layer], np.int16),
                bias=pa.array([values], type=pa.list_(pa.float32())),
            ))

    def _collect_routing(self, step: StepBuffer, capture: LayerCapture, resolved: dict[int, ResolvedTokens]) -> ResolvedTokens:
        indices = _np(capture.indices)
        if indices.ndim != 2:
            indices = indices.reshape(-1, indices.shape[-1]) if indices.ndim > 2 else indices.reshape(-1, 1)
        tokens, k = indices.shape
        rows = resolved.get(id(capture.context)) if capture.context is not None else None
        if rows is None or len(rows.sequence) != tokens:
            # A layer whose token count does not match its stack's inputs (or a model whose token ids moeprobe
            # cannot see): its rows are kept, with unknown positions, and the mismatch is counted.
            phase = rows.phase if rows is not None else "prefill"
            rows = unmatched_rows(tokens, phase, rows.seq_base if rows is not None else 0)
            self.writer.count_anomaly("token_count_mismatch")
        weights = _np(capture.weights, np.float32)
        dropped = _np(capture.dropped)
        self._pending_decisions += tokens * k
        pending = PendingRouting(
            step=step.step,
            layer=capture.layer,
            phase=PHASE_CODE[rows.phase],
            indices=indices,
            weights=None if weights is None else weights.reshape(tokens, k),
            rows=rows,
            dropped=None if dropped is None else dropped.reshape(tokens).astype(bool),
        )
        self._pending_routing.setdefault(k, []).append(pending)
        # Layers of one stack call share their rows: counted once per layer all the same, an over-estimate
        # of at most the token columns (12-17 bytes a token) per layer.
        size = _pending_nbytes(pending)
        self._collected_bytes += size
        self._ledger.move(None, 0, "collected", size)
        if capture.scores is not None:
            valid = rows.valid
            scores = _np(capture.scores, np.float32).reshape(tokens, -1)
            token_keep = valid if valid is not None else slice(None)
            kept = scores[token_keep]
            m = kept.shape[0]
            flat = pa.array(kept.reshape(-1), pa.float32())
            offsets = pa.array(np.arange(0, (m + 1) * kept.shape[1], kept.shape[1], dtype=np.int32))
            self._hold(self._scores.add(
                m,
                step=np.full(m, step.step, np.int32),
                sequence=rows.sequence[token_keep],
                position=rows.position[token_keep],
                layer=np.full(m, capture.layer, np.int16),
                scores=pa.ListArray.from_arrays(offsets, flat),
            ))
        return rows

    def _emit(self) -> None:
        """Turn the captures collected since the last call into rows, with one set of array operations for
        the whole batch: per-step numpy calls held the GIL often enough to slow the model's thread."""
        if self._step_rows:
            rows, self._step_rows = self._step_rows, []
            self._hold(self._steps.add_rows(rows))
        if self._latency_rows:
            rows, self._latency_rows = self._latency_rows, []
            self._hold(self._latency.add_rows(rows))
        pending, self._pending_routing = self._pending_routing, {}
        self._pending_decisions = 0
        collected, self._collected_bytes = self._collected_bytes, 0
        try:
            for k, parts in pending.items():
                self._emit_routing(k, parts)
        finally:
            del pending
            self._ledger.move("collected", collected, None, 0)

    def _emit_routing(self, k: int, parts: list[PendingRouting]) -> None:
        counts = np.array([p.indices.shape[0] for p in parts])
        valid = None
        if any(p.rows.valid is not None for p in parts):
            valid = np.concatenate([p.rows.valid if p.rows.valid is not None else np.ones(len(p.indices), bool) for p in parts])
        encoding = self.writer.routing_encoding
        if k > encoding.top_k:
            # More choices than the layers' declared top-k: the trace has no columns for them.
            lost = int(valid.sum()) if valid is not None else int(counts.sum())
            self.writer.count_anomaly("top_k_mismatch", lost)
            self.writer.count_dropped("top_k_mismatch", lost * k)
            return
        # Expert ids must be 0..num_experts-1 of their layer (and fit the trace's expert type): -1 or 300 of 8
        # would be wrong rows and 40000 would wrap to another expert.
        limits = [min(self._num_experts.get(int(p.layer), 1 << 15), 1 << encoding.expert_type.bit_width) for p in parts]
        in_range = all(not p.indices.size or (int(p.indices.min()) >= 0 and int(p.indices.max()) < limit) for p, limit in zip(parts, limits, strict=True))
        if in_range:
            self._emit_in_range(k, parts, counts, valid)
        else:
            self._emit_out_of_range(k, parts, counts, valid, limits)

    def _emit_in_range(self, k: int, parts: list[PendingRouting], counts: np.ndarray, valid: np.ndarray | None) -> None:
        """The usual batch: every expert id in range. Choices are gathered straight into the stored layout (one
        row per rank, in the trace's expert type) and ranked block by block: no (tokens, k) int64 copy and no
        whole-batch temporaries (fresh memory at prefill sizes cost more than the arithmetic)."""
        encoding = self.writer.routing_encoding
        total = int(counts.sum())
        experts = np.empty((k, total), encoding.expert_type.to_pandas_dtype())
        weights = np.empty((k, total), np.float32)
        offset = 0
        for p, n in zip(parts, counts.tolist(), strict=True):
            np.copyto(experts[:, offset : offset + n], p.indices.T, casting="unsafe")  # checked in range above
            if p.weights is None:
                weights[:, offset : offset + n] = np.nan
            else:
                np.copyto(weights[:, offset : offset + n], p.weights.T, casting="unsafe")
            offset += n
        if k > 1:
            _rank_by_weight(experts, weights)
        if valid is not None:
            experts, weights = experts[:, valid], weights[:, valid]
        kept = experts.shape[1]
        if kept:
            # The transposed views are C-contiguous in the stored layout already: encode_tokens copies nothing.
            self._add_routing(encoding.encode_tokens(self._token_columns(parts, counts, valid), experts.T, weights.T, checked=True), kept)
        self.writer.counters["decisions"] += kept * k

    def _emit_out_of_range(
        self, k: int, parts: list[PendingRouting], counts: np.ndarray, valid: np.ndarray | None, limits: list[int]
    ) -> None:
        """A batch with expert ids outside their layer: such choices are left out and counted, never written;
        the token keeps its other choices (with their ranks), a token with none is left out."""
        indices = np.concatenate([p.indices for p in parts])
        weights = np.concatenate([p.weights if p.weights is not None else np.full((len(p.indices), k), np.nan, np.float32) for p in parts])
        if k > 1 and not bool((weights[:, :-1] >= weights[:, 1:]).all()):
            order = np.argsort(-weights, axis=1, kind="stable")  # see _rank_by_weight
            indices = np.take_along_axis(indices, order, axis=1)
            weights = np.take_along_axis(weights, order, axis=1)
        limit = np.repeat(np.array(limits, np.int64), counts)
        bad = (indices < 0) | (indices >= limit[:, None])
        self.writer.count_anomaly("expert_out_of_range", int(bad.sum()))
        good = ~bad
        # Good choices first, in rank order; `choices` says how many a row uses, explicit ranks say which.
        order = np.argsort(bad, axis=1, kind="stable")
        indices = np.take_along_axis(np.where(good, indices, 0), order, axis=1)
        weights = np.take_along_axis(weights, order, axis=1)
        ranks = order.astype(np.int8)
        choices = good.sum(axis=1)
        valid = choices > 0 if valid is None else valid & (choices > 0)
        token_columns = self._token_columns(parts, counts, valid)
        kept = len(token_columns["step"])
        if kept:
            encoding = self.writer.routing_encoding
            part = encoding.encode_tokens(token_columns, indices[valid], weights[valid], choices[valid], ranks[valid], checked=True)
            self._add_routing(part, kept)
        self.writer.counters["decisions"] += int(choices[valid].sum())

    @staticmethod
    def _token_columns(parts: list[PendingRouting], counts: np.ndarray, valid: np.ndarray | None) -> dict[str, np.ndarray]:
        def per_token(values: np.ndarray) -> np.ndarray:
            return values[valid] if valid is not None else values

        return {
            "step": per_token(np.repeat(np.array([p.step for p in parts], np.int32), counts)),
            "sequence": per_token(np.concatenate([p.rows.sequence for p in parts])),
            "position": per_token(np.concatenate([p.rows.position for p in parts])),
            "token_id": per_token(np.concatenate([p.rows.token_id for p in parts])),
            "phase": per_token(np.repeat(np.array([p.phase for p in parts], np.int8), counts)),
            "layer": per_token(np.repeat(np.array([p.layer for p in parts], np.int16), counts)),
            "dropped": per_token(np.concatenate([p.dropped if p.dropped is not None else np.zeros(len(p.indices), bool) for p in parts])),
        }

    def _add_routing(self, part: pa.Table, rows: int) -> None:
        self._routing_parts.append(part)
        self._routing_rows += rows
        self._hold(part.nbytes)


_RANK_BLOCK = 1 << 15  # tokens per block of _rank_by_weight: its temporaries stay in the CPU cache


def _rank_by_weight(experts: np.ndarray, weights: np.ndarray) -> None:
    """(k, tokens) choices in place in rank order: rank 0 = the largest gate weight.

    Some routers (DeepSeek-V3's topk(sorted=False)) hand their choices over in no particular order; most give
    them in rank order, and those tokens are left as they are. The others are ordered as a stable argsort of
    the negated weights would (equal weights, +0.0 and -0.0 included, keep the model's order; missing, NaN,
    weights go last), by sorting one packed 64-bit key per choice: the weight's bits mapped to an order-
    reversing integer, then the choice's position (the tie-break), then the expert id. A plain sort of keys
    measured 3x faster than argsort plus two gathers (bench/writer_throughput.py --unsorted).
    """
    for start in range(0, weights.shape[1], _RANK_BLOCK):
        w = weights[:, start : start + _RANK_BLOCK]
        ordered = np.logical_and.reduce(w[:-1] >= w[1:], axis=0)
        if ordered.all():
            continue
        columns = slice(start, start + _RANK_BLOCK) if not ordered.any() else np.flatnonzero(~ordered) + start
        unsorted = weights[:, columns]  # a view for a block that is all out of order (read before written below)
        keys = _descending_keys(unsorted)
        k = keys.shape[0]
        keys <<= np.uint64(32)
        keys |= np.arange(k, dtype=np.uint64)[:, None] << np.uint64(16)
        keys |= experts[:, columns].astype(np.uint64)
        keys.sort(axis=0)
        experts[:, columns] = (keys & np.uint64(0xFFFF)).astype(experts.dtype)
        position = ((keys >> np.uint64(16)) & np.uint64(0xFF)).astype(np.intp)
        weights[:, columns] = np.take_along_axis(unsorted, position, axis=0)


def _descending_keys(w: np.ndarray) -> np.ndarray:
    """float32 weights -> uint64 keys (in the low 32 bits) whose ascending order is the weights' descending
    order, -0.0 equal to +0.0, every NaN after -inf."""
    bits = w.view(np.uint32).copy()
    bits[bits == np.uint32(0x80000000)] = 0  # -0.0 ranks as +0.0 (a tie, as -w compares)
    negative = (bits & np.uint32(0x80000000)) != 0
    ascending = np.where(negative, ~bits, bits | np.uint32(0x80000000))
    keys = (~ascending).astype(np.uint64)
    keys[np.isnan(w)] = 0xFFFFFFFF
    return keys
