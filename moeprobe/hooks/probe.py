"""The probe: wraps a model's stack, MoE blocks and routers and records its routing into a trace.

    with moeprobe.record(model, "traces/run1") as probe:
        probe.tag(domain="code")
        model.generate(input_ids, max_new_tokens=64)

Capture discipline (docs/architecture.md, "Capture rules"): the wrapped forwards ("hook capture", the name of the
mode) keep references and clock marks only, never synchronise the host, never raise into the model (anomalies are
counted), and every wrapper and hook is removed on exit, also when the model raised.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..metrics.endpoint import MetricsEndpointError
from ..metrics.live import MetricsLink as _MetricsLink
from ..metrics.options import MetricsOptions
from ..traces.compact import DEFAULT_WEIGHTS, WEIGHT_MODES
from ..traces.writer import ShardWriter
from .capture import BLOCK_END, ROUTER_END, ROUTER_START, LayerCapture, StepBuffer, move_to_host
from .token_context import ContextReader, PendingContext, TokenContext
from .wrapping import ForwardWraps
from .noted_routing import COPIED, UNCHECKABLE, copied_parts, versions_of, NotedLayer, at_slots, resolve as resolve_noted, slots_of
from .discovery import LayerBinding, RouterDecls, find_layers
from . import compat, contracts
from .adapters import transformers_version
from .bias_watch import BiasWatch
from .destination import TraceDestination, job_rank, trace_location
from .pipeline import CLOSE_TIMEOUT_S, CapturePipeline
from .spec import RouterSpec, UnsupportedModelError
from .timing import CpuClock, CudaClock
from . import detect

log = logging.getLogger(__name__)


def _model_info(model: nn.Module, layers: list[LayerBinding], name: str | None) -> dict[str, Any]:
    config = getattr(model, "config", None)
    first = next(model.parameters(), None)
    families = sorted({layer.family for layer in layers})
    return {
        "name": name or getattr(config, "_name_or_path", None) or type(model).__name__,
        "class": type(model).__name__,
        "family": families[0] if len(families) == 1 else ",".join(families),
        "model_type": getattr(config, "model_type", None),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
        "device": str(first.device) if first is not None else None,
        "moe_layers": len(layers),
        # Where the tokenizer comes from (hub id or directory), so that viewers can show token text; None
        # for a model built from a config.
        "tokenizer": _tokenizer_name(model, config),
    }


def _tokenizer_name(model: nn.Module, config: Any) -> str | None:
    for value in (getattr(config, "_name_or_path", None), getattr(model, "name_or_path", None)):
        if isinstance(value, str) and value.strip():
            return value
    return None


def _detached(t: Any) -> Any:
    """``t`` cut from autograd; as is when it has no autograd history (inference: no new tensor per call)."""
    return t.detach() if t is not None and t.requires_grad else t


class Probe:
    """Captures routing from a model. Use :func:`record` to create one.

    ``writer_class`` is the class that writes this process's shard (default :class:`ShardWriter`). It is the one
    seam for replacing the sink: a subclass may send segments elsewhere, and the fault tests use one whose
    writes are slow to prove that a sink which cannot keep up never blocks the model. ``close_timeout`` bounds
    how long closing waits for a writer that hangs before the trace is marked ``aborted`` without it.
    """

    def __init__(
        self,
        model: nn.Module,
        path: str | os.PathLike[str] | None,
        *,
        logits: bool = False,
        force: bool = False,
        routers: RouterDecls | None = None,
        flush_interval: float = 1.0,
        max_queue_mb: float = 256,
        redact_tokens: bool = False,
        live_loads: bool = False,
        name: str | None = None,
        weights: str = DEFAULT_WEIGHTS,
        rank: int | None = None,
        world_size: int | None = None,
        check_sync: bool = False,
        writer_class: type[ShardWriter] = ShardWriter,
        raise_on_refusal: bool = True,
        close_timeout: float = CLOSE_TIMEOUT_S,
        metrics_port: int | None = None,
        metrics: MetricsOptions | None = None,
        metrics_optional: bool = False,
        mode: str = "tokens",
        capture: str = "auto",
        sample: int | None = None,
        ring_tokens: int | None = None,
        drain_every: int | None = None,
        clock: Any = None,
    ) -> None:
        if weights not in WEIGHT_MODES:
            raise ValueError(f"weights must be one of {', '.join(WEIGHT_MODES)}, not {weights!r}")
        # Hook or graph-safe capture (see detect.py): decided before anything is attached or written.
        self.capture, why = detect.choose_capture(model, capture, mode, sample)
        # mode="counts" with sample=N is what sample=N alone records (docs/scale.md): the counts of every step and the
        # tokens of 1 step in N. Kept as "counts" it wrote no token rows at all while its manifest said sample=N.
        self.mode = "tokens" if sample is not None else mode
        self.sample = sample
        self._outer = model  # what the user calls (may be an OptimizedModule); the drain hook goes there
        model = getattr(model, "_orig_mod", model) if isinstance(model, torch._dynamo.eval_frame.OptimizedModule) else model
        self.model = model
        compat.check_transformers(model)
        self.layers = find_layers(model, routers)
        self._traced_hooks = False  # set (by dynamo's side-effect replay) when a hook ran inside a traced graph
        self._graph: Any = None
        self._readers: dict[int, ContextReader] = {}  # hook capture: the token stacks' readers, by stack id
        self._graph_calls = 0  # graph capture: eager model calls counted towards drains (up to the last drain once the stack counts)
        if why:
            log.info("moeprobe: %s", why)
        # A contract failure on a layer's first call (see _extract): capture stops, the trace is marked aborted,
        # and close() raises it unless the probe was attached to an unmodified job (moeprobe record).
        self.refusal: UnsupportedModelError | None = None
        self.raise_on_refusal = raise_on_refusal
        self._experts_forwards: dict[int, Any] = {}  # layer -> its experts wrapper's maker (see _route_through_experts)
        self._wraps = ForwardWraps()  # hook capture's wrapped forwards (see _attach)
        self._entries: dict[int, ContextReader | None] = {}  # id(entry module) -> its context reader (see join_call)
        self._pending_scores: dict[int, Any] = {}
        if metrics_port is not None and path is None:
            raise ValueError("metrics_port needs a trace path: the endpoint counts the rows the trace writer writes")
        if metrics_port is not None and (mode == "counts" or sample is not None):
            # The endpoint counts per-token routing rows: with counts only, or 1 step in N, it would show too little.
            raise ValueError("metrics_port counts per-token routing rows; it cannot be combined with mode='counts' or sample=")
        if self.capture == "graph":
            from .graph_session import check_graph

            check_graph(model, self.layers, logits=logits, live_loads=live_loads)
        self.logits = logits
        self.redact_tokens = redact_tokens
        self.path: Path | str | None = None if path is None else trace_location(path)
        self.rank, self.world_size = job_rank(rank, world_size)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.clock = clock if clock is not None else (CudaClock() if device.type == "cuda" else CpuClock())
        self._cuda = device.type == "cuda"
        # No CUDA in this process: no captured tensor can be on a GPU, so a finished step skips move_to_host's
        # per-tensor device checks (a CPU model on a CUDA machine still goes through them).
        self._may_cuda = torch.cuda.is_available()
        # Debug aid (and the GPU test's proof): run every hook under torch's sync debug mode "error", so a
        # host synchronisation inside capture raises there and is counted as an anomaly.
        self._check_sync = check_sync and device.type == "cuda"
        self._handles: list[RemovableHandle] = []
        self._step: StepBuffer | None = None
        self._depth = 0
        self._next_step = 0
        self._primary_stack: int | None = None
        self._current: dict[int, TokenContext | PendingContext] = {}  # stack id -> context of its latest forward call
        self._tags: dict[str, Any] = {}
        self._model_anomalies: dict[str, int] = {}  # counted on the model's thread (see anomalies)
        # Contract failures found on the writer thread, reading noted router calls (noted_routing.py): its own dict,
        # so that the two threads never update one counter.
        self._writer_anomalies: dict[str, int] = {}
        self._limit = 0  # the pipeline's byte budget, which a step's noted captures count against (set with it)
        # Steps note validated router calls for the writer thread to read, when there is one and nothing needs the
        # parts during the step (live_loads counts them on the device).
        self._resolver: Any = self._resolve_noted if path is not None and not live_loads else None
        # Layers whose router outputs are copied at the call: found written in place after a call (by the writer
        # thread, noted_routing.resolve). Inference tensors are always copied (no version counter to check).
        self._copy_routing: set[int] = set()
        self._warned_anomaly = False
        self._biases = BiasWatch(self.layers)  # correction biases, read at each step's end
        self._loads: list[torch.Tensor] | None = None
        if live_loads:
            self._loads = [torch.zeros(layer.meta["num_experts"], dtype=torch.int64, device=device) for layer in self.layers]
        self.closed = False
        self.pipeline: CapturePipeline | None = None
        self.metrics_url: str | None = None
        self._metrics: _MetricsLink | None = None
        if self.path is not None:
            TraceDestination(self.path, self.rank, self.world_size).prepare(force=force)
            options = {
                "logits": logits,
                "flush_interval_s": flush_interval,
                "max_queue_mb": max_queue_mb,
                "redact_tokens": redact_tokens,
                "weights": weights,  # how gate weights are stored: fp16 (default), fp32 or u8 (docs/trace-format.md)
                "clock": self.clock.name,
                "routers": {str(getattr(k, "__name__", k)): v.describe() for k, v in (routers or {}).items()},
                "mode": self.mode,
                "capture": self.capture,
                "sample": sample,
            }
            writer = writer_class(
                self.path,
                model=_model_info(model, self.layers, name),
                layers=[layer.manifest_entry() for layer in self.layers],
                options=options,
                rank=self.rank,
                world_size=self.world_size,
                on_warning=log.warning,
            )
            writer._shard["host"] = socket.gethostname()
            self.pipeline = CapturePipeline(
                writer,
                clock=self.clock,
                flush_interval=flush_interval,
                max_queue_bytes=int(max_queue_mb * (1 << 20)),
                redact_tokens=redact_tokens,
                close_timeout=close_timeout,
                counters=self._counters,
            )
            self._limit = self.pipeline.max_queue_bytes
        if metrics_port is not None:
            self._start_metrics(metrics_port, metrics or MetricsOptions(), optional=metrics_optional)
        try:
            if self.capture == "graph":
                from .graph_session import attach_graph

                self._graph = attach_graph(self, device, ring_tokens=ring_tokens, drain_every=drain_every)
            else:
                self._attach()
        except BaseException:
            self._detach()
            if self.pipeline is not None:
                self.pipeline.close("aborted", "failed to attach hooks")
            if self._metrics is not None:
                self._metrics.close()
            raise

    def _start_metrics(self, port: int, options: MetricsOptions, *, optional: bool) -> None:
        """Serve this probe's counts; before any hook is attached, so no step can miss the counts.

        ``optional`` (``moeprobe record``): if the endpoint cannot start, say so and record without it.
        """
        assert self.pipeline is not None and self.path is not None
        try:
            self._metrics = _MetricsLink(port, options, self.layers)
        except MetricsEndpointError as exc:
            if not optional:
                self._abandon_new_trace()
                raise
            log.warning("moeprobe: not serving metrics: %s", exc)
            return
        except BaseException:
            self._abandon_new_trace()
            raise
        self.pipeline.live = self._metrics.counts
        self._metrics.connect(self.pipeline, lambda: self.anomalies)
        self.metrics_url = self._metrics.url

    def _abandon_new_trace(self) -> None:
        """Close and remove the trace this probe created a moment ago (it holds no record yet)."""
        assert self.pipeline is not None and self.path is not None
        self.pipeline.close("aborted", "the metrics endpoint could not start")
        TraceDestination(self.path, self.rank, self.world_size).abandon()

    # -- public -------------------------------------------------------------------------------------
    def tag(self, **tags: Any) -> None:
        """Label the sequences that start from now on. A value may be a list, one entry per batch row of
        the next batch; ``None`` removes a key; ``tag()`` with no arguments clears all tags."""
        # A new dict each time: steps already queued keep the tags they started with.
        if self._graph is not None:
            self._graph.drain()  # graph capture: the steps run so far take the tags they ran under
        if not tags:
            self._tags = {}
            return
        updated = dict(self._tags)
        for key, value in tags.items():
            if value is None:
                updated.pop(key, None)
            else:
                updated[key] = list(value) if isinstance(value, (list, tuple)) else value
        self._tags = updated

    def take_loads(self) -> list[torch.Tensor]:
        """Tokens routed to each expert, per MoE layer, since the last call (needs ``live_loads=True``).

        The counts stay on the model's device; reading them is the caller's choice of sync point.
        """
        if self._loads is None:
            raise RuntimeError("take_loads() needs record(..., live_loads=True)")
        loads = [t.clone() for t in self._loads]
        for t in self._loads:
            t.zero_()
        return loads

    @property
    def anomalies(self) -> dict[str, int]:
        """What capture counted instead of recording (kind -> count): on the model's thread and, for noted router
        calls, on the writer thread. A new dict each time."""
        counts = dict(self._model_anomalies)
        for kind, n in dict(self._writer_anomalies).items():  # a copy first: the writer thread adds to it
            counts[kind] = counts.get(kind, 0) + n
        return counts

    @property
    def stats(self) -> dict[str, Any]:
        counters = self.pipeline.writer.counters if self.pipeline is not None else {}
        return {"steps": self._next_step, "anomalies": self._counters(), **counters}

    def flush(self, timeout: float = 30.0) -> bool:
        """Finish the step in flight, then wait (at most ``timeout`` seconds) until everything captured so far is
        written and readable; True when it is. A probe that records nothing to disk returns True at once."""
        if self._step is not None and self._depth == 0:
            self._finish_step()
        if self._graph is not None:
            self._graph.drain()
        return self.pipeline.flush(timeout) if self.pipeline is not None else True

    def close(self, status: str = "complete", error: str | None = None) -> None:
        """Remove every hook, write what was captured and mark the trace ``status``."""
        if self.closed:
            return
        self.closed = True
        try:
            self._detach()
            if self._traced_hooks:
                self._refuse_traced()
            if self._step is not None:
                self._finish_step()
            if self._graph is not None:
                self._graph.drain()
        finally:
            if self.pipeline is not None:
                self.pipeline.close(status, error)
            if self._metrics is not None:
                self._metrics.close()
        if self.refusal is not None and self.raise_on_refusal and status == "complete":
            raise self.refusal

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None:
            self.close("complete")
        else:
            self.close("aborted", f"{exc_type.__name__}: {exc}")

    # -- attaching ----------------------------------------------------------------------------------
    def _hook(self, handle: RemovableHandle) -> None:
        self._handles.append(handle)

    def _counters(self) -> dict[str, int]:
        """Anomalies for the manifest: the hooks' own, and CUDA event marks the pool could not supply."""
        counters = self.anomalies
        exhausted = getattr(self.clock, "exhausted", 0)
        if exhausted:
            counters["latency:events_exhausted"] = exhausted
        return counters

    def _resolve_noted(self, step: StepBuffer) -> bool:
        """Writer thread: read what a host step kept by reference (noted_routing.py); False: nothing to write."""
        return resolve_noted(step, self._count_writer_anomaly, self._copy_routing.add)

    def _count_writer_anomaly(self, kind: str) -> None:
        self._writer_anomalies[kind] = self._writer_anomalies.get(kind, 0) + 1

    def _refuse_traced(self) -> None:
        """A hook ran while dynamo traced it or a CUDA graph was captured: what it saw is not recorded, so the
        trace stops here, loudly, rather than going on short."""
        if self.refusal is not None:
            return
        self._stop(UnsupportedModelError(
            "the model was compiled (torch.compile) or captured in a CUDA graph after record() attached its hooks; "
            "hook capture cannot see inside a graph: call record() after compiling, or pass capture='graph'"
        ))

    def _sync_checked(self, fn: Any) -> Any:
        """``fn`` as is; under ``check_sync`` (CUDA), run inside torch's sync debug mode "error", so that a host
        synchronisation in capture's own code raises there (and is counted as an anomaly). The model's own forward
        runs outside it: only capture's parts are wrapped."""
        if not self._check_sync:
            return fn

        def checked(*args: Any) -> Any:
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*args)
            finally:
                torch.cuda.set_sync_debug_mode(previous)

        return checked

    # Each wrapper starts with the same guard: inside a graph being traced (torch.compile after record() attached)
    # capture must do nothing with side effects on the host (a clock read breaks fullgraph compiles); it only notes
    # that it was there (dynamo replays the store) and the probe refuses at the step's end. CUDA graph capture is
    # checked once per step, in the entry wrapper (a driver call per layer would cost the model).

    def _attach(self) -> None:
        stacks: dict[int, int] = {}  # id(module) -> stack id
        readers: dict[int, ContextReader] = {}
        for layer in self.layers:
            if layer.stack is not None and id(layer.stack) not in stacks:
                stack_id = len(stacks)
                stacks[id(layer.stack)] = stack_id
                tokens = next((other.tokens for other in self.layers if other.stack is layer.stack and other.tokens is not None), None)
                readers[stack_id] = ContextReader(layer.stack, stack_id, tokens)
                if self._primary_stack is None:
                    self._primary_stack = stack_id
        self._readers = readers  # kept for inspection (copy_args: whether a stack's arguments are copied at the call)
        # Layers first, then blocks, then the entries: a module that is both a router and its block (or a stack and
        # a block) is entered in the order the hooks ran in before (entry, block start, router start).
        for layer in self.layers:
            self._attach_layer(layer, stacks.get(id(layer.stack)) if layer.stack is not None else None)
        for layer in self.layers:
            self._wraps.wrap(layer.block, self._block_forward(layer))
        # A step is one outermost call of the entries. One token stack that holds every MoE layer (a causal LM) is
        # the only entry, as in graph capture: the model's own call around it adds a wrapper and nothing to record.
        # Several stacks (an encoder-decoder: both run in one step) or a MoE layer outside any stack: the model too.
        entries: dict[int, tuple[nn.Module, int | None]] = {}
        if len(stacks) != 1 or any(layer.stack is None for layer in self.layers):
            entries[id(self.model)] = (self.model, None)
        for layer in self.layers:
            if layer.stack is not None:
                entries[id(layer.stack)] = (layer.stack, stacks[id(layer.stack)])
        for module, entry_stack in reversed(entries.values()):
            reader = readers.get(entry_stack) if entry_stack is not None else None
            self._entries[id(module)] = reader
            self._wraps.wrap(module, self._entry_forward(reader))

    def join_call(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        """Attached from inside ``module``'s own forward pre-hook (``moeprobe record`` finds a model at its first
        call): torch looked up that call's forward before the probe wrapped it, so when ``module`` is an entry its
        wrapper misses the call. Its two parts run here and at the call's end instead, as the wrapper would."""
        if id(module) not in self._entries or self.capture != "hooks":
            return
        reader = self._entries[id(module)]
        self._sync_checked(self._begin_call)(reader, args, kwargs)
        end = self._sync_checked(self._end_call)
        handles: list[RemovableHandle] = []

        def finish(_module: nn.Module, _args: Any, _output: Any) -> None:
            for handle in handles:
                handle.remove()
            end()

        handles.append(module.register_forward_hook(finish, always_call=True))  # torch reads these after forward

    def _entry_forward(self, reader: ContextReader | None) -> Any:
        """The wrapper of the model and of each token stack: a step is one outermost call; a stack's call also
        notes its token context."""
        begin = self._sync_checked(self._begin_call)
        end = self._sync_checked(self._end_call)
        compiling = torch.compiler.is_compiling  # bound once: the guard runs on every call

        def make(original: Any) -> Any:
            def forward(*args: Any, **kwargs: Any) -> Any:
                if compiling():
                    self._traced_hooks = True
                    return original(*args, **kwargs)
                begin(reader, args, kwargs)
                try:
                    return original(*args, **kwargs)
                finally:
                    end()  # also when the model raised: the step ends with the outermost call

            return forward

        return make

    def _block_forward(self, layer: LayerBinding) -> Any:
        """The MoE block's wrapper: its clock marks (block latency)."""
        i = layer.index
        # Bound once, and the only part here that could synchronise (a CUDA event's record): sync-checked itself,
        # so that the marks are taken inline (every MoE layer at every step: no Python call beyond the clock's).
        mark = self._sync_checked(self.clock.mark)
        compiling = torch.compiler.is_compiling

        def make(original: Any) -> Any:
            def forward(*args: Any, **kwargs: Any) -> Any:
                if compiling():
                    self._traced_hooks = True
                    return original(*args, **kwargs)
                step = self._step
                marks = None
                if step is not None:
                    try:
                        marks = step.marks[i] = [mark(), None, None, None]  # see capture.BLOCK_START
                    except Exception as exc:  # noqa: BLE001
                        self._anomaly("block_pre", exc)
                output = original(*args, **kwargs)
                if marks is not None:
                    try:
                        marks[BLOCK_END] = mark()
                    except Exception as exc:  # noqa: BLE001
                        self._anomaly("block_post", exc)
                return output

            return forward

        return make

    def _attach_layer(self, layer: LayerBinding, stack_id: int | None) -> None:
        i = layer.index
        mark = self._sync_checked(self.clock.mark)  # bound once, taken inline at the router's call (see _block_forward)
        k, num_experts = int(layer.meta["top_k"]), int(layer.meta["num_experts"])
        check_parts = contracts.check_parts
        capture = self._capture
        compiling = torch.compiler.is_compiling
        # Where in the router's output tuple the extractor found its parts (when it returned them as they are):
        # later calls take them from there, re-checked (see at_slots), instead of identifying every part again.
        slots: list[tuple[int, int, int, int]] = []
        # Once slots are known, on the host and without autograd: calls are noted by reference and read on the
        # writer thread (noted_routing.py). The layer's entry is made from its first call read here.
        noted: list[NotedLayer] = []
        grad_enabled = torch.is_grad_enabled
        copy_routing = self._copy_routing
        # Read on the writer thread, later: what may be written meanwhile is copied at the call. (A CUDA process
        # reads its steps at their end, on this thread, before the device copy: nothing to copy there.)
        host_read = not self._may_cuda

        def router_end(args: Any, output: Any) -> None:
            step = self._step
            if self.refusal is not None:
                return
            if step is None:
                self._anomaly("outside_step", None)
                return
            try:
                marks = step.marks.get(i)
                if marks is not None:
                    marks[ROUTER_END] = mark()
                if layer.validated and layer.source == "router":
                    # Every call after the first. (slots is set only for an extractor that reads by structure, and
                    # only while the router is the source: _route_through_experts changes the source, never back.)
                    if noted and step.resolve is not None and type(output) is tuple and len(output) == noted[0].length and not grad_enabled():
                        # Noted by reference, read and checked on the writer thread (noted_routing.resolve); an
                        # output of another length takes the checked path below.
                        entry = noted[0]
                        places = entry.places
                        indices = output[places[0]]
                        if isinstance(indices, torch.Tensor):
                            weights = output[places[1]]
                            n = indices.numel()
                            # Only what is recorded is kept (NotedLayer.places): the rest is the model's to free.
                            kept: tuple[Any, ...] = (indices, weights) if len(places) == 2 else (indices, weights, output[places[2]])
                            versions: tuple[int, ...]
                            try:
                                # Checked by the writer (noted_routing.resolve); versions_of, inlined.
                                versions = (indices._version, weights._version) if len(places) == 2 else (indices._version, weights._version, kept[2]._version)
                            except (RuntimeError, AttributeError):
                                versions = UNCHECKABLE  # an inference tensor: no version counter, copied below
                            if host_read and (versions is UNCHECKABLE or (copy_routing and i in copy_routing)):
                                kept, versions = copied_parts(kept), COPIED
                            step.note(
                                (entry, kept, self._current.get(stack_id) if stack_id is not None else None, versions),
                                n, int(n * entry.held_per_decision), int(n * entry.queued_per_decision), self._limit,
                            )
                            return
                    # The same reading and checks as _extract, without its closure; a failure now is counted, the
                    # call's routing left out (the first call refuses, see _extract).
                    parts = at_slots(output, slots[0], k, num_experts) if slots else None
                    if parts is None:
                        try:
                            parts = layer.extract(output, args[0] if args else None)
                            check_parts(parts, k, num_experts)
                        except Exception:  # noqa: BLE001 - a selector may fail in any way; each is a contract failure
                            self._anomaly(f"contract:layer{i}", None)
                            return
                        if not slots and getattr(layer.extract, "by_structure", False):
                            found = slots_of(output, parts)
                            if found is not None:
                                slots.append(found)
                    first = capture(step, layer, stack_id, parts)
                    if slots and not noted and first is not None:
                        noted.append(NotedLayer(i, slots[0], k, num_experts, layer.extract, self.logits, first))
                    return
                if not layer.validated and layer.source == "router" and layer.experts_fallback is not None:
                    if contracts.logits_only(output, layer.meta["num_experts"]) is not None:
                        self._route_through_experts(layer, stack_id)
                if layer.source == "router":
                    parts = self._extract(layer, lambda: layer.extract(output, args[0] if args else None), output)
                    if parts is not None:
                        capture(step, layer, stack_id, parts)
                elif self.logits:
                    self._pending_scores[i] = contracts.logits_only(output, layer.meta["num_experts"])
            except Exception as exc:  # noqa: BLE001
                self._anomaly("router", exc)

        def experts_start(args: Any, kwargs: Any) -> None:
            step = self._step
            if self.refusal is not None:
                return
            if step is None:
                self._anomaly("outside_step", None)
                return
            try:
                parts = self._extract(layer, lambda: layer.extract(args, kwargs), (*args, *kwargs.values()))
                if parts is not None:
                    scores = self._pending_scores.pop(i, None)
                    if scores is not None:
                        parts = (parts[0], parts[1], scores, parts[3])
                    self._capture(step, layer, stack_id, parts)
            except Exception as exc:  # noqa: BLE001
                self._anomaly("experts", exc)

        router_end = self._sync_checked(router_end)
        experts_start = self._sync_checked(experts_start)

        def router_forward(original: Any) -> Any:
            def forward(*args: Any, **kwargs: Any) -> Any:
                if compiling():
                    self._traced_hooks = True
                    return original(*args, **kwargs)
                step = self._step
                if step is not None:
                    try:
                        marks = step.marks.get(i)
                        if marks is not None:
                            marks[ROUTER_START] = mark()
                    except Exception as exc:  # noqa: BLE001
                        self._anomaly("router_pre", exc)
                output = original(*args, **kwargs)
                router_end(args, output)
                return output

            return forward

        def experts_forward(original: Any) -> Any:
            def forward(*args: Any, **kwargs: Any) -> Any:
                if compiling():
                    self._traced_hooks = True
                    return original(*args, **kwargs)
                experts_start(args, kwargs)
                return original(*args, **kwargs)

            return forward

        self._experts_forwards[i] = experts_forward
        if layer.router is not None:
            self._wraps.wrap(layer.router, router_forward)
        if layer.source == "experts":
            self._wraps.wrap(layer.source_module, experts_forward)

    def _route_through_experts(self, layer: LayerBinding, stack_id: int | None) -> None:
        """The router returned bare logits (the block routes): read the routing from the experts' inputs."""
        experts = layer.experts_fallback
        assert experts is not None
        k = int(layer.meta["top_k"])

        def extract(args: Any, kwargs: Any) -> Any:
            indices, weights = contracts.experts_parts((*args, *kwargs.values()), k)
            return indices, weights, None, None

        layer.source = "experts"
        layer.source_module = experts
        layer.extract = extract
        self._wraps.wrap(experts, self._experts_forwards[layer.index])

    def _extract(self, layer: LayerBinding, read: Any, raw: Any) -> Any:
        """Read one layer call's routing and check its contract: a failure refuses the model on the layer's first
        call, and is counted (the call's routing left out) on any later one."""
        k, num_experts = int(layer.meta["top_k"]), int(layer.meta["num_experts"])
        try:
            parts = read()
            contracts.check_parts(parts, k, num_experts)
        except Exception as exc:  # noqa: BLE001 - a selector may fail in any way; each is a contract failure
            if not layer.validated:
                self._refuse(layer, exc, raw)
            else:
                self._anomaly(f"contract:layer{layer.index}", None)
            return None
        layer.validated = True
        return parts

    def _refuse(self, layer: LayerBinding, exc: BaseException, raw: Any) -> None:
        """Stop capturing for good: the model's outputs do not have the structure moeprobe relies on."""
        what = f"{layer.source_name!r} ({type(layer.source_module).__name__}"
        if compat.is_transformers_model(self.model):
            what += f", transformers {transformers_version()}"
        reason = str(exc) if isinstance(exc, contracts.ContractError) else f"{type(exc).__name__}: {exc}"
        self._stop(UnsupportedModelError(
            f"cannot capture MoE layer {layer.index} from {what}): {reason}; output was {contracts.describe(raw)}"
        ))

    def _stop(self, refusal: UnsupportedModelError) -> None:
        """Refuse for good: record nothing more, say so once, and close the trace as aborted with the reason."""
        self.refusal = refusal
        self._step = None
        self._depth = 0
        log.error("moeprobe: %s; nothing more is recorded, the model is unaffected", self.refusal)
        if self.pipeline is not None:
            self.pipeline.close("aborted", str(self.refusal))
            self.pipeline = None

    def _detach(self) -> None:
        if self._graph is not None:
            self._graph.capture.detach()
        self._wraps.restore()
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    # -- hot path -----------------------------------------------------------------------------------
    def _anomaly(self, kind: str, exc: BaseException | None) -> None:
        key = kind if exc is None else f"{kind}:{type(exc).__name__}"
        self._model_anomalies[key] = self._model_anomalies.get(key, 0) + 1
        if not self._warned_anomaly and exc is not None:
            self._warned_anomaly = True
            log.warning("moeprobe: a capture hook failed (%s: %s); the model is unaffected, the anomaly is counted in the manifest", key, exc)

    def _begin_call(self, reader: ContextReader | None, args: Any, kwargs: Any) -> None:
        """An entry (the model or a stack) is called: a step starts with the outermost call; a stack notes its
        token context."""
        if self.refusal is not None:
            return
        if self._cuda and torch.cuda.is_current_stream_capturing():
            self._traced_hooks = True  # the wrappers will not run in the graph's replays: refused at the step's end
            return
        try:
            if self._depth == 0:
                self._step = StepBuffer(step=self._next_step, resolve=self._resolver)
                self._next_step += 1
            self._depth += 1
            step = self._step
            if reader is not None and step is not None:
                if step.resolve is not None:
                    # Kept by reference, read on the writer thread (noted_routing.resolve); tags as they are now.
                    pending = PendingContext(reader, args, kwargs, self._tags, later=not self._may_cuda)
                    step.contexts.append(pending)
                    self._current[reader.stack_id] = pending
                else:
                    ctx = reader.read(args, kwargs)
                    if ctx is not None:
                        ctx.tags = self._tags  # sequences and their tags are assigned on the writer thread
                        step.contexts.append(ctx)
                        self._current[ctx.stack_id] = ctx
        except Exception as exc:  # noqa: BLE001
            self._anomaly("entry", exc)

    def _end_call(self) -> None:
        """An entry's call returned (or raised): the outermost one finishes the step."""
        try:
            if self._traced_hooks:
                self._refuse_traced()
                return
            self._depth = max(0, self._depth - 1)
            if self._depth == 0 and self._step is not None:
                self._finish_step()
        except Exception as exc:  # noqa: BLE001
            self._anomaly("entry_post", exc)

    def _capture(self, step: StepBuffer, layer: LayerBinding, stack_id: int | None, extracted: Any) -> LayerCapture:
        indices, weights, scores, dropped = extracted
        ctx = self._current.get(stack_id) if stack_id is not None else None
        # Inference tensors have no autograd history: kept as they are (no new tensor per call); training ones
        # are cut from autograd (_detached).
        scores = scores if self.logits else None
        versions: tuple[int, ...]
        if weights is None:
            versions = UNCHECKABLE
        else:
            versions = versions_of(indices, weights) if scores is None else versions_of(indices, weights, scores)
        copied = not self._may_cuda and (versions is UNCHECKABLE or layer.index in self._copy_routing)
        if copied and step.resolve is not None:
            # Read on the writer thread, and no version counter to check it by there (inference tensors) or this
            # router's outputs were found written after their call (noted_routing.resolve): copied now.
            indices = indices.detach().clone()
            weights = weights.detach().clone() if weights is not None else None
            scores = scores.detach().clone() if scores is not None else None
        capture = LayerCapture(
            layer=layer.index,
            context=ctx,
            indices=indices.detach() if indices.requires_grad else indices,
            weights=_detached(weights),
            scores=_detached(scores),
            dropped=_detached(dropped),
        )
        if step.resolve is not None:
            capture.versions = COPIED if copied else versions  # read on the writer thread: checked there by these
        if self.pipeline is not None:
            # Dropped (and released) as soon as the step's captures pass the byte budget: see StepBuffer.keep.
            step.keep(capture, self.pipeline.max_queue_bytes)
        if self._loads is not None:
            flat = capture.indices.reshape(-1)
            self._loads[layer.index].index_add_(0, flat.to(torch.int64), torch.ones_like(flat, dtype=torch.int64))
        return capture

    def _finish_step(self) -> None:
        step, self._step = self._step, None
        self._depth = 0
        if step is None or self.pipeline is None:
            return
        step.wall_ms = (time.perf_counter_ns() - step.t0) / 1e6
        if step.over_budget:
            # Its captures held more than the byte budget: already released, counted here, never silent.
            self.pipeline.count_dropped("step_over_budget", step.lost)
            self._release_marks(step)
            return
        if self._may_cuda and step.resolve is not None:
            # A CUDA process: the captures are copied to the host at the step's end, on the model's stream, so
            # what was kept by reference is read here (an empty step is counted there).
            step.resolve = None
            if not resolve_noted(step, self._count_writer_anomaly, copy=False):
                self._release_marks(step)
                return
        if not step.layers and not step.noted and not step.contexts:
            # A forward call that reached no MoE layer and no stack (it raised early): counted, not silent.
            self._anomaly("empty_step", None)
            self._release_marks(step)
            return
        # Correction biases that changed since the last step written go with this one (once per step, not per router
        # call: an optimiser updates them between steps); a dropped step leaves the change to the next one.
        versions = None
        if self._biases.layers:
            step.bias, versions = self._biases.changed()
        # The drop decision comes before the device-to-host copy: a step the queue cannot take costs no transfer.
        if not self.pipeline.submit(step, move=move_to_host if self._may_cuda else None):
            self._release_marks(step)
        elif versions:
            self._biases.commit(versions)

    def _release_marks(self, step: StepBuffer) -> None:
        """Give a step's clock marks back to the pool: a dropped step's CUDA events would otherwise be lost."""
        for marks in step.marks.values():
            self.clock.release(marks)
        step.marks = {}


def record(
    model: nn.Module,
    path: str | os.PathLike[str] | None,
    *,
    logits: bool = False,
    force: bool = False,
    routers: Mapping[str | type, RouterSpec] | None = None,
    flush_interval: float = 1.0,
    max_queue_mb: float = 256,
    redact_tokens: bool = False,
    live_loads: bool = False,
    name: str | None = None,
    metrics_port: int | None = None,
    metrics: MetricsOptions | None = None,
    weights: str = DEFAULT_WEIGHTS,
    mode: str = "tokens",
    capture: str = "auto",
    sample: int | None = None,
    ring_tokens: int | None = None,
    drain_every: int | None = None,
) -> Probe:
    """Attach a probe to ``model`` that records its routing into the trace directory ``path``.

    Use it as a context manager; on exit the hooks are removed and the trace is closed as ``complete``
    (or ``aborted`` if the block raised). ``path=None`` records nothing to disk; with ``live_loads=True``
    the probe then only keeps per-expert token counts on the device (see :meth:`Probe.take_loads`).

    ``metrics_port`` serves Prometheus metrics on ``http://127.0.0.1:PORT/metrics`` while recording (0 picks a
    free port, see ``probe.metrics_url``); ``metrics`` sets their options (docs/prometheus.md).
    ``weights`` is how gate weights are stored: ``"fp16"`` (default, relative error <= 4.9e-4), ``"fp32"``
    (exact) or ``"u8"`` (8 bits, absolute error <= max(w) / 508 per segment for non-negative weights); see docs/trace-format.md.
    ``mode="tokens"`` records every routing decision; ``mode="counts"`` only per step x layer x expert counts
    (the ``loads`` table), kept on the device. ``sample=N`` records the tokens of 1 step in N and the counts of
    every step (with or without ``mode="counts"``). ``capture``: ``"hooks"`` (wrapped module forwards, with latency), ``"graph"`` (ops inside the model's own
    graph: survives ``torch.compile(fullgraph=True)`` and CUDA graphs; no latency), or ``"auto"``: graph for a
    compiled model, counts or sampling, hooks otherwise. Graph capture drains its device rings every
    ``drain_every`` calls of the model (eager calls only), at :meth:`Probe.flush`, :meth:`Probe.tag` and on exit;
    ``ring_tokens`` tokens fit between drains, what does not fit is counted and its steps dropped.
    """
    return Probe(
        model,
        path,
        logits=logits,
        force=force,
        routers=routers,
        flush_interval=flush_interval,
        max_queue_mb=max_queue_mb,
        redact_tokens=redact_tokens,
        live_loads=live_loads,
        name=name,
        metrics_port=metrics_port,
        metrics=metrics,
        weights=weights,
        mode=mode,
        capture=capture,
        sample=sample,
        ring_tokens=ring_tokens,
        drain_every=drain_every,
    )
