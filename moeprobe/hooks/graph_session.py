"""A probe's graph-safe capture: attaching it, draining it from the model's thread, writing it on the writer's.

The rings are drained every ``drain_every`` eager calls of the model. A forward post-hook on the model the user
calls counts them (inside a traced or captured graph it does nothing) until a call shows the token stack's wrapper
running eagerly inside it; from then on the stack's wrapper counts them and the hook is removed (see
:meth:`GraphSession.after_call`). A drain
is queued to the writer thread as a call, so the rows go through the same sequence and phase rules as hook
capture (:meth:`CapturePipeline._convert`); steps that only have counts get their ``steps`` row here.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..traces.schema import TABLES
from . import graph_ops as ops
from .token_context import ContextReader
from .bias_watch import BiasWatch
from .graph_capture import DEFAULT_DRAIN_EVERY, DEFAULT_RING_TOKENS, GraphCapture, Snapshot, phase_of, unpack, wait_ready
from .spec import UnsupportedModelError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .probe import Probe


class GraphSession:
    def __init__(self, probe: Probe, capture: GraphCapture, drain_every: int) -> None:
        self.probe = probe
        self.capture = capture
        self.drain_every = drain_every
        # Router correction biases (DeepSeek-V3): no op can see them change, so they are read between steps, at
        # attach and at each drain, and take effect from the step after the last one drained (exact at
        # drain_every=1 and for a bias that does not change, as in inference; otherwise up to drain_every late).
        self._biases = BiasWatch(probe.layers)
        self._bias_pending: list[tuple[int | None, dict[int, torch.Tensor]]] = []  # writer thread only
        self._initial_bias = self._changed_bias()
        self.hook: RemovableHandle | None = None  # the drain hook on the model, while it counts the calls

    def _changed_bias(self) -> dict[int, torch.Tensor]:
        """Model thread, between steps: copies of the biases whose version changed since the last read."""
        copies, versions = self._biases.changed()
        self._biases.commit(versions)  # always written: held on the writer thread until their step is drained
        return copies

    def write_bias(self, pipeline: Any, last_step: int, drained: list[int], changed: dict[int, torch.Tensor]) -> None:
        """Writer thread: write the biases whose first step has now been drained; hold the rest."""
        if self._initial_bias:
            self._bias_pending.append((0, self._initial_bias))
            self._initial_bias = {}
        if changed:
            self._bias_pending.append((last_step + 1, changed))
        newest = max(drained, default=-1)
        keep = []
        for step, bias in self._bias_pending:
            if step is not None and step <= newest:
                pipeline.add_bias(step, bias)
            else:
                keep.append((step, bias))
        self._bias_pending = keep

    def after_call(self, module: nn.Module, args: Any, output: Any) -> None:
        """The drain hook on the model the user calls: counts its eager calls, draining every ``drain_every``, until
        a call shows that the token stack's wrapper runs eagerly inside it. Then the count goes to the stack's
        wrapper (:meth:`GraphCapture.hand_over`; it calls :meth:`drain_due`) and the hook is removed: a module with a
        hook takes torch's slower call path, about 14 us a call measured in the demo decode loop, more than the
        hook's own work. While the stack runs compiled inside an eager call (``torch.compile(model)``, a compiled
        ``model.forward`` given to ``record()``) the hook stays. A forward compiled after the model's first eager
        call under ``record()`` gets the hook back at the next eager drain (:meth:`drain`: ``flush()``, ``tag()``);
        until then what overflows the rings is counted, never silent."""
        probe = self.probe
        # detect.tracing_now, inlined: this runs once per model call
        if torch.compiler.is_compiling() or (probe._cuda and torch.cuda.is_current_stream_capturing()):
            return
        probe._graph_calls += 1
        if probe._graph_calls % self.drain_every == 0:
            self.drain()
        capture = self.capture
        ran, capture.stack_ran = capture.stack_ran, False
        if ran and self.hook is not None:
            self.hook.remove()
            self.hook = None
            capture.drain_due = self.drain_due
            capture.hand_over(self.drain_every - probe._graph_calls % self.drain_every)

    def add_hook(self) -> None:
        """The drain hook on the model the user calls (see :meth:`after_call`), removed with the probe's hooks."""
        self.hook = self.probe._outer.register_forward_hook(self.after_call, always_call=True)
        self.probe._hook(self.hook)

    def drain_due(self) -> int:
        """The stack's wrapper, after the eager call that completes a drain period: drain; the calls to the next."""
        probe = self.probe
        probe._graph_calls += self.drain_every - probe._graph_calls % self.drain_every  # the calls up to this drain
        self.drain()
        return self.drain_every

    def drain(self) -> None:
        """Model thread: check the wrappers' contract notes, take the rings off the device, queue the rows."""
        probe = self.probe
        if probe.refusal is None and self.capture.contract_failures:
            index, reason = next(iter(self.capture.contract_failures.items()))
            where = f"MoE layer {index} from {probe.layers[index].source_name!r}" if index >= 0 else "the token context"
            probe.refusal = UnsupportedModelError(f"cannot capture {where}: {reason}")
            log.error("moeprobe: %s; nothing more is recorded, the model is unaffected", probe.refusal)
            if probe.pipeline is not None:
                probe.pipeline.close("aborted", str(probe.refusal))
                probe.pipeline = None
        pipeline = probe.pipeline
        if pipeline is None or probe.refusal is not None:
            return
        capture = self.capture
        if capture.stack_traced:
            capture.stack_traced = False
            if self.hook is None and not probe.closed and not torch.compiler.is_compiling():
                # The stack counted the drains, and now runs compiled (a forward compiled after the first call):
                # the hook on the model counts them again from here.
                log.info("moeprobe: the token stack now runs compiled; drains go back to the hook on the model")
                capture.hand_over(0)
                self.add_hook()
        snapshot = capture.drain()
        bias = self._changed_bias() if self._biases.layers else {}
        tags = probe._tags
        layers = probe.layers
        pipeline.submit_call(lambda: write_snapshot(pipeline, snapshot, layers, tags, self, bias))


def check_graph(model: nn.Module, layers: list[Any], *, logits: bool, live_loads: bool) -> None:
    """Refuse, in one line and before a trace directory exists, what graph capture cannot record."""
    stacks = {id(layer.stack) for layer in layers if layer.stack is not None}
    if len(stacks) != 1:
        raise UnsupportedModelError(
            f"graph-safe capture handles models with one token stack (a causal LM, not an encoder-decoder); "
            f"{type(model).__name__} has {len(stacks)}: use capture='hooks' on an uncompiled model"
        )
    if live_loads:
        raise ValueError("live_loads=True needs hook capture; graph capture counts on the device with mode='counts'")
    if logits:
        raise ValueError("graph-safe capture does not record router scores; drop logits=True or use capture='hooks'")
    top_ks = {int(layer.meta["top_k"]) for layer in layers}
    if len(top_ks) != 1:
        raise UnsupportedModelError(f"graph-safe capture needs one top-k for all MoE layers, found {sorted(top_ks)}")


def attach_graph(probe: Probe, device: torch.device, *, ring_tokens: int | None, drain_every: int | None) -> GraphSession:
    check_graph(probe.model, probe.layers, logits=probe.logits, live_loads=probe._loads is not None)
    stack = next(layer.stack for layer in probe.layers if layer.stack is not None)
    tokens = next((layer.tokens for layer in probe.layers if layer.tokens is not None), None)
    sample = probe.sample or 1
    capture = GraphCapture(
        probe.layers,
        stack,
        ContextReader(stack, 0, tokens),
        device=device,
        tokens=probe.mode == "tokens",
        counts=probe.mode == "counts" or probe.sample is not None,
        sample=sample,
        ring_tokens=ring_tokens or DEFAULT_RING_TOKENS,
    )
    # Each drain costs a copy (of the used rows on the host, of whole rings from a GPU) and Python work on both
    # threads; every 32 calls keeps that off the decode loop's critical path. Rings hold what 32 calls produce.
    session = GraphSession(probe, capture, drain_every or DEFAULT_DRAIN_EVERY)
    capture.attach()
    session.add_hook()
    return session


def write_snapshot(
    pipeline: Any, snapshot: Snapshot, layers: list[Any], tags: Any, session: GraphSession | None = None, bias: dict[int, Any] | None = None
) -> None:
    """Writer thread: the drained rows -> steps, routing (through the hook path's conversion), loads."""
    wait_ready(snapshot)
    writer = pipeline.writer
    drained = unpack(snapshot, layers, 0, tags, phase_of)
    for kind, n in drained.lost.items():
        writer.count_anomaly(kind, n)
    if drained.dropped_decisions:
        writer.count_dropped("ring_overflow", drained.dropped_decisions)
    converted = set()
    for step in drained.steps:
        pipeline.take_step(step)  # checked like a hook step: a malformed one is dropped and counted alone
        converted.add(step.step)
    rows = [h for h in drained.headers if h[0] not in converted]
    if rows:
        counters = writer.counters
        counters["steps"] += len(rows)
        counters["tokens"] += sum(h[4] for h in rows)
        writer.append(
            "steps",
            pa.table(
                {
                    "step": pa.array(np.array([h[0] for h in rows], np.int32)),
                    "phase": pa.array([phase_of(h[1], h[2], h[3]) for h in rows], pa.string()),
                    "batch": pa.array(np.array([h[1] for h in rows], np.int32)),
                    "tokens": pa.array(np.array([h[4] for h in rows], np.int32)),
                    "started_at": pa.array(np.full(len(rows), snapshot.drained_at)),
                    "wall_ms": pa.array(np.full(len(rows), np.nan)),
                },
                schema=TABLES["steps"],
            ),
        )
    if drained.loads is not None:
        writer.append("loads", drained.loads)
    if session is not None and session._biases.layers:
        session.write_bias(pipeline, int(snapshot.state[ops.STEP]), [h[0] for h in drained.headers], bias or {})


