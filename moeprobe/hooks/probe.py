"""The probe: attaches capture hooks to a model and records its routing into a trace.

    with moeprobe.record(model, "traces/run1") as probe:
        probe.tag(domain="code")
        model.generate(input_ids, max_new_tokens=64)

Hook discipline (see DESIGN.md, "Capture rules"): hooks keep references and clock marks only, never
synchronise the host, never raise into the model (anomalies are counted), and every handle is removed on
exit, also when the model raised.
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
from .capture import LayerCapture, LayerMarks, StepBuffer, move_to_host
from .token_context import ContextReader, TokenContext
from .discovery import LayerBinding, RouterDecls, find_layers
from . import compat, contracts
from .adapters import transformers_version
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


def _slots_of(output: Any, parts: Any) -> tuple[int, int, int, int] | None:
    """(indices, weights, scores or -1, tuple length): where the extracted parts sit in a router's output tuple,
    by identity; None when the extractor computed a part (Switch, Llama 4) or reported dropped tokens."""
    indices, weights, scores, dropped = parts
    if type(output) is not tuple or dropped is not None or weights is None:
        return None
    where = [next((n for n, t in enumerate(output) if t is part), -1) for part in (indices, weights, scores)]
    if where[0] < 0 or where[1] < 0 or (scores is not None and where[2] < 0):
        return None
    return where[0], where[1], where[2], len(output)


def _at_slots(output: Any, slots: tuple[int, int, int, int], k: int, num_experts: int) -> Any:
    """The parts at the remembered places of the router's output, if that output still has the remembered form:
    a tuple of the same length, integer indices of width k, floating weights of their shape, floating scores of
    width E (what topk_parts identifies them by). None otherwise: the caller identifies the parts anew."""
    if type(output) is not tuple or len(output) != slots[3]:
        return None
    indices, weights = output[slots[0]], output[slots[1]]
    if (
        not isinstance(indices, torch.Tensor)
        or indices.dtype not in contracts._INTEGER
        or indices.dim() < 1
        or indices.shape[-1] != k
        or not isinstance(weights, torch.Tensor)
        or not weights.is_floating_point()
        or weights.shape != indices.shape
    ):
        return None
    scores = None
    if slots[2] >= 0:
        scores = output[slots[2]]
        if not isinstance(scores, torch.Tensor) or not scores.is_floating_point() or scores.shape[-1] != num_experts:
            return None
    return indices, weights, scores, None


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
        self._graph_calls = 0
        if why:
            log.info("moeprobe: %s", why)
        # A contract failure on a layer's first call (see _extract): capture stops, the trace is marked aborted,
        # and close() raises it unless the probe was attached to an unmodified job (moeprobe record).
        self.refusal: UnsupportedModelError | None = None
        self.raise_on_refusal = raise_on_refusal
        self._experts_hooks: dict[int, Any] = {}
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
        self._current: dict[int, TokenContext] = {}  # stack id -> context of its latest forward call
        self._tags: dict[str, Any] = {}
        self.anomalies: dict[str, int] = {}
        self._warned_anomaly = False
        self._bias_versions: dict[int, tuple[int, int]] = {}
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
        self._metrics.connect(self.pipeline, lambda: dict(self.anomalies))
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
    def stats(self) -> dict[str, Any]:
        counters = self.pipeline.writer.counters if self.pipeline is not None else {}
        return {"steps": self._next_step, "anomalies": dict(self.anomalies), **counters}

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
        counters = dict(self.anomalies)
        exhausted = getattr(self.clock, "exhausted", 0)
        if exhausted:
            counters["latency:events_exhausted"] = exhausted
        return counters

    def _refuse_traced(self) -> None:
        """A hook ran while dynamo traced it or a CUDA graph was captured: what it saw is not recorded, so the
        trace stops here, loudly, rather than going on short."""
        if self.refusal is not None:
            return
        self._stop(UnsupportedModelError(
            "the model was compiled (torch.compile) or captured in a CUDA graph after record() attached its hooks; "
            "hook capture cannot see inside a graph: call record() after compiling, or pass capture='graph'"
        ))

    def _checked(self, fn: Any) -> Any:
        compiling = torch.compiler.is_compiling  # bound once: the guard runs on every hook call

        def guarded(*args: Any) -> Any:
            # Inside a graph being traced a hook must do nothing with side effects on the host (a clock read breaks
            # fullgraph compiles); it only notes that it was there (dynamo replays the store). CUDA graph capture
            # is checked once per step, in the entry hook (a driver call per layer hook would cost the model).
            if compiling():
                self._traced_hooks = True
                return None
            return fn(*args)

        if not self._check_sync:
            return guarded
        fn = guarded

        def checked(*args: Any) -> Any:
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*args)
            finally:
                torch.cuda.set_sync_debug_mode(previous)

        return checked

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
        entries: dict[int, tuple[nn.Module, int | None]] = {id(self.model): (self.model, None)}
        for layer in self.layers:
            if layer.stack is not None:
                entries[id(layer.stack)] = (layer.stack, stacks[id(layer.stack)])
        for module, entry_stack in entries.values():
            reader = readers.get(entry_stack) if entry_stack is not None else None
            self._hook(module.register_forward_pre_hook(self._checked(self._entry_pre(reader)), with_kwargs=True))
            self._hook(module.register_forward_hook(self._checked(self._entry_post), always_call=True))
        for layer in self.layers:
            self._attach_layer(layer, stacks.get(id(layer.stack)) if layer.stack is not None else None)

    def _attach_layer(self, layer: LayerBinding, stack_id: int | None) -> None:
        i = layer.index
        mark = self.clock.mark  # bound once: these hooks run at every layer call
        k, num_experts = int(layer.meta["top_k"]), int(layer.meta["num_experts"])
        check_parts = contracts.check_parts
        capture = self._capture
        # Where in the router's output tuple the extractor found its parts (when it returned them as they are):
        # later calls take them from there, re-checked (see _at_slots), instead of identifying every part again.
        slots: list[tuple[int, int, int, int]] = []

        def block_pre(module: nn.Module, args: Any) -> None:
            step = self._step
            if step is not None:
                try:
                    step.marks[i] = LayerMarks(mark())
                except Exception as exc:  # noqa: BLE001
                    self._anomaly("block_pre", exc)

        def block_post(module: nn.Module, args: Any, output: Any) -> None:
            step = self._step
            if step is not None:
                try:
                    marks = step.marks.get(i)
                    if marks is not None:
                        marks.block_end = mark()
                except Exception as exc:  # noqa: BLE001
                    self._anomaly("block_post", exc)

        def router_pre(module: nn.Module, args: Any) -> None:
            step = self._step
            if step is not None:
                try:
                    marks = step.marks.get(i)
                    if marks is not None:
                        marks.router_start = mark()
                except Exception as exc:  # noqa: BLE001
                    self._anomaly("router_pre", exc)

        def router_post(module: nn.Module, args: Any, output: Any) -> None:
            step = self._step
            if self.refusal is not None:
                return
            if step is None:
                self._anomaly("outside_step", None)
                return
            try:
                marks = step.marks.get(i)
                if marks is not None:
                    marks.router_end = mark()
                if layer.validated and layer.source == "router":
                    # Every call after the first: the same reading and checks as _extract, without its closure; a
                    # failure now is counted, the call's routing left out (the first call refuses, see _extract).
                    parts = _at_slots(output, slots[0], k, num_experts) if slots and getattr(layer.extract, "by_structure", False) else None
                    if parts is None:
                        try:
                            parts = layer.extract(output, args[0] if args else None)
                            check_parts(parts, k, num_experts)
                        except Exception:  # noqa: BLE001 - a selector may fail in any way; each is a contract failure
                            self._anomaly(f"contract:layer{i}", None)
                            return
                        if not slots and getattr(layer.extract, "by_structure", False):
                            found = _slots_of(output, parts)
                            if found is not None:
                                slots.append(found)
                    capture(step, layer, stack_id, parts)
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

        def experts_pre(module: nn.Module, args: Any, kwargs: Any) -> None:
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

        self._experts_hooks[i] = experts_pre

        checked = self._checked
        self._hook(layer.block.register_forward_pre_hook(checked(block_pre)))
        self._hook(layer.block.register_forward_hook(checked(block_post)))
        if layer.router is not None:
            self._hook(layer.router.register_forward_pre_hook(checked(router_pre)))
            self._hook(layer.router.register_forward_hook(checked(router_post)))
        if layer.source == "experts":
            self._hook(layer.source_module.register_forward_pre_hook(checked(experts_pre), with_kwargs=True))

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
        self._hook(experts.register_forward_pre_hook(self._checked(self._experts_hooks[layer.index]), with_kwargs=True))

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
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    # -- hot path -----------------------------------------------------------------------------------
    def _anomaly(self, kind: str, exc: BaseException | None) -> None:
        key = kind if exc is None else f"{kind}:{type(exc).__name__}"
        self.anomalies[key] = self.anomalies.get(key, 0) + 1
        if not self._warned_anomaly and exc is not None:
            self._warned_anomaly = True
            log.warning("moeprobe: a capture hook failed (%s: %s); the model is unaffected, the anomaly is counted in the manifest", key, exc)

    def _entry_pre(self, reader: ContextReader | None) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            if self.refusal is not None:
                return
            if self._cuda and torch.cuda.is_current_stream_capturing():
                self._traced_hooks = True  # hooks will not run in the graph's replays: refused at the step's end
                return
            try:
                if self._depth == 0:
                    self._step = StepBuffer(step=self._next_step)
                    self._next_step += 1
                self._depth += 1
                if reader is not None and self._step is not None:
                    ctx = reader.read(args, kwargs)
                    if ctx is not None:
                        ctx.tags = self._tags  # sequences and their tags are assigned on the writer thread
                        self._step.contexts.append(ctx)
                        self._current[ctx.stack_id] = ctx
            except Exception as exc:  # noqa: BLE001
                self._anomaly("entry", exc)

        return hook

    def _entry_post(self, module: nn.Module, args: Any, output: Any) -> None:
        try:
            if self._traced_hooks:
                self._refuse_traced()
                return
            self._depth = max(0, self._depth - 1)
            if self._depth == 0 and self._step is not None:
                self._finish_step()
        except Exception as exc:  # noqa: BLE001
            self._anomaly("entry_post", exc)

    def _capture(self, step: StepBuffer, layer: LayerBinding, stack_id: int | None, extracted: Any) -> None:
        indices, weights, scores, dropped = extracted
        ctx = self._current.get(stack_id) if stack_id is not None else None
        # Inference tensors have no autograd history: kept as they are (no new tensor per call); training ones
        # are cut from autograd (_detached).
        capture = LayerCapture(
            layer=layer.index,
            context=ctx,
            indices=indices.detach() if indices.requires_grad else indices,
            weights=_detached(weights),
            scores=_detached(scores) if self.logits else None,
            dropped=_detached(dropped),
        )
        if self.pipeline is not None:
            # Dropped (and released) as soon as the step's captures pass the byte budget: see StepBuffer.keep.
            step.keep(capture, self.pipeline.max_queue_bytes)
        if self._loads is not None:
            flat = capture.indices.reshape(-1)
            self._loads[layer.index].index_add_(0, flat.to(torch.int64), torch.ones_like(flat, dtype=torch.int64))
        if layer.meta.get("has_bias"):
            bias = layer.bias()
            if bias is not None:
                # The version counter changes on every in-place update; reading it is host-side only.
                version = (id(bias), bias._version)
                if self._bias_versions.get(layer.index) != version:
                    self._bias_versions[layer.index] = version
                    step.bias[layer.index] = bias.detach().clone()

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
        if not step.layers and not step.contexts:
            # A forward call that reached no MoE layer and no stack (it raised early): counted, not silent.
            self._anomaly("empty_step", None)
            self._release_marks(step)
            return
        # The drop decision comes before the device-to-host copy: a step the queue cannot take costs no transfer.
        if not self.pipeline.submit(step, move=move_to_host if self._may_cuda else None):
            self._release_marks(step)

    def _release_marks(self, step: StepBuffer) -> None:
        """Give a step's clock marks back to the pool: a dropped step's CUDA events would otherwise be lost."""
        for marks in step.marks.values():
            self.clock.release(marks.all())
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
    every step (with or without ``mode="counts"``). ``capture``: ``"hooks"`` (forward hooks, with latency), ``"graph"`` (ops inside the model's own
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
