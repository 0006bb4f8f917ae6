"""Hook capture on the host: router outputs and stack arguments kept by reference on the model's thread, read on
the writer thread.

A stack call keeps its arguments (a :class:`.token_context.PendingContext`; the KV cache's length is read at the
call, since the cache grows during it) and :func:`resolve` reads them into the step's token context later.

Once a router's first call has been read and checked on the model's thread (``Probe._extract``: a failure there
refuses the model) and its parts were found as the output tuple's own tensors (an extractor that reads by
structure), every later call of that router only notes ``(layer, the output's tensors it records, token context,
their versions)`` with its decision count (the indices' ``numel()``, for the byte budget and for drop counts). The
writer thread then takes the parts from the remembered places and checks them exactly as the model's thread used to (:func:`at_slots`:
integer indices of width k, floating weights of their shape, scores of width E), falling back to the extractor and
its full contract check (``contracts.check_parts``) when the output changed form. A call that fails is counted as
the anomaly ``contract:layer{N}`` and its routing left out, as before; it is never trusted.

Why: measured inside the demo decode loop, reading and checking a router's output cost about 10 us per call on the
model's thread (a dozen tensor attribute reads with caches cold after the model's own work), a note costs a
list append (BENCHMARKS.md, "Hook capture through wrapped forwards").

Not noted (the model's thread reads the parts as before): a CUDA step (its captures are concatenated and copied to
the host at the step's end, on the model's stream: ``capture.move_to_host``), calls under autograd (the
references would keep the graph alive; ``_detached`` cuts them at once), ``live_loads`` (counted on the device
during the step) and a user's selector (``RouterSpec``), which is always called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import contracts
from .capture import LayerCapture, StepBuffer
from .token_context import ContextChanged, PendingContext, TokenContext


def slots_of(output: Any, parts: Any) -> tuple[int, int, int, int] | None:
    """(indices, weights, scores or -1, tuple length): where the extracted parts sit in a router's output tuple,
    by identity; None when the extractor computed a part (Switch, Llama 4) or reported dropped tokens."""
    indices, weights, scores, dropped = parts
    if type(output) is not tuple or dropped is not None or weights is None:
        return None
    where = [next((n for n, t in enumerate(output) if t is part), -1) for part in (indices, weights, scores)]
    if where[0] < 0 or where[1] < 0 or (scores is not None and where[2] < 0):
        return None
    return where[0], where[1], where[2], len(output)


def at_slots(output: Any, slots: tuple[int, int, int, int], k: int, num_experts: int) -> Any:
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


COPIED: tuple[int, ...] = (-2, -2)  # versions of router outputs copied at the call: nothing can write them, nothing to check
UNCHECKABLE: tuple[int, ...] = (-1, -1)  # versions_of for tensors without a version counter (inference tensors): copied at the call


def versions_of(*tensors: Any) -> tuple[int, ...]:
    """Model's thread, at the call: the version counters of the router call's tensors that are kept (indices,
    weights, and the scores when they are recorded; :data:`UNCHECKABLE` for inference tensors, which have none, or
    parts that are not tensors). :func:`resolve` checks them: a router that writes its outputs into reused buffers,
    or a block that edits them in place after the router returned, changes them before the writer reads them."""
    try:
        return tuple([t._version for t in tensors])
    except (RuntimeError, AttributeError):
        return UNCHECKABLE


def copied_parts(parts: tuple[Any, ...]) -> tuple[Any, ...]:
    """Copies of a noted call's kept tensors (a router found reusing its output buffers: what is noted must keep
    this call's values)."""
    return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in parts)


class NotedLayer:
    """What the writer thread needs to read one layer's noted calls, fixed when the layer's first call was read.

    A call keeps only the parts it records, taken from the router's output at ``places`` (indices, weights, and the
    scores when they are recorded): the rest of the output (DeepSeek-V3's router also returns its logits, E floats
    per token) is the model's to free at once, not held until the writer reads the step uncounted by the budget.
    The writer reads the kept tuple at ``slots``, checked as :func:`at_slots` checks a router's output."""

    __slots__ = ("index", "places", "length", "slots", "k", "num_experts", "extract", "scores", "held_per_decision", "queued_per_decision")

    def __init__(self, index: int, slots: tuple[int, int, int, int], k: int, num_experts: int, extract: Any, scores: bool, first: LayerCapture) -> None:
        self.index = index
        kept_scores = scores and slots[2] >= 0
        self.places = (slots[0], slots[1], slots[2]) if kept_scores else (slots[0], slots[1])
        self.length = slots[3]  # the router output's tuple length, checked at every call
        self.slots = (0, 1, 2 if kept_scores else -1, len(self.places))
        self.k = k
        self.num_experts = num_experts
        self.extract = extract
        self.scores = scores  # router scores recorded (logits=True)
        decisions = max(1, first.decisions)
        # The byte budget's rules (StepBuffer.keep and nbytes) per decision, from the first call's own tensors: a
        # noted call is charged what a read one of the same dtypes would be.
        self.held_per_decision = first.nbytes() / decisions
        self.queued_per_decision = 16 + (4 * first.scores.numel() / decisions if first.scores is not None else 0)


def resolve(
    step: StepBuffer, count_anomaly: Callable[[str], None], copy_layer: Callable[[int], None] = lambda index: None, *, copy: bool = True
) -> bool:
    """Writer thread (or the step's end, with CUDA): the step's pending token contexts become TokenContexts and its
    noted router calls LayerCaptures, read and checked as the model's thread would have read them; a call that
    breaks the contract is counted and left out. False for a step left with nothing to write (counted as
    ``empty_step``, as the model's thread counts one). A router call whose tensors were written since the call is
    counted and left out, and ``copy_layer(index)`` has the model's thread copy that router's outputs from now on.
    A call that passes is copied here and checked again after the copy (the model's thread may write the tensors
    at any time: what the copy holds is that call's only if the version did not move during it). ``copy=False``:
    the step's end on the model's thread itself (CUDA), where nothing can write them before the device copy."""
    pending = step.contexts
    built: dict[int, TokenContext | None] = {}
    if any(type(c) is PendingContext for c in pending):
        contexts = []
        for c in pending:
            if type(c) is PendingContext:
                try:
                    ctx = c.build()
                except ContextChanged:
                    # The loop wrote the next step's inputs into this step's tensors before they were read: what
                    # they hold now is not this step's. Dropped whole and counted (later calls are copied).
                    count_anomaly("context:changed_after_call")
                    step.noted = []
                    return False
                except Exception as exc:  # noqa: BLE001 - unreadable arguments: counted, the step kept without them
                    count_anomaly(f"entry:{type(exc).__name__}")
                    ctx = None
                built[id(c)] = ctx
                if ctx is not None:
                    contexts.append(ctx)
            else:
                contexts.append(c)
        step.contexts = contexts
        for capture in step.layers:  # captures read on the model's thread (a layer's first call)
            if capture.context is not None and id(capture.context) in built:
                capture.context = built[id(capture.context)]
    def copied(versions: tuple[int, ...], tensors: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """The call's kept tensors (indices, weights[, scores]) as the call returned them, copied; None: written
        since (seqlock-like: the versions before and after the copy all the call's)."""
        if versions[0] < 0:
            return tensors  # copied at the call, or nothing to check by
        kept = tuple([t.clone() for t in tensors]) if copy else tensors  # versions only grow: one check after
        return kept if tuple([t._version for t in tensors]) == versions else None

    if any(capture.versions[0] >= 0 for capture in step.layers):
        kept = []
        for capture in step.layers:  # read on the model's thread (a layer's first call), kept by reference
            tensors = (capture.indices, capture.weights) if len(capture.versions) == 2 else (capture.indices, capture.weights, capture.scores)
            held = copied(capture.versions, tensors)
            if held is None:
                count_anomaly(f"routing_changed:layer{capture.layer}")
                copy_layer(capture.layer)
                continue
            capture.indices, capture.weights = held[0], held[1]
            if len(held) == 3:
                capture.scores = held[2]
            kept.append(capture)
        step.layers = kept
    noted, step.noted = step.noted, []
    step.noted_decisions = step.noted_queue_bytes = 0
    for layer, kept, context, versions in noted:
        parts = at_slots(kept, layer.slots, layer.k, layer.num_experts)
        if parts is None:
            try:
                parts = layer.extract(kept, None)  # a by-structure extractor reads the parts alone
                contracts.check_parts(parts, layer.k, layer.num_experts)
            except Exception:  # noqa: BLE001 - a selector may fail in any way; each is a contract failure
                count_anomaly(f"contract:layer{layer.index}")
                continue
        checked = copied(versions, (parts[0], parts[1]) if len(versions) == 2 else (parts[0], parts[1], parts[2]))
        if checked is None:
            # Written in place since the router returned: what the tensors hold now is not that call's routing.
            count_anomaly(f"routing_changed:layer{layer.index}")
            copy_layer(layer.index)
            continue
        parts = (checked[0], checked[1], checked[2] if len(checked) == 3 else parts[2], parts[3])
        if context is not None and id(context) in built:
            context = built[id(context)]
        indices, weights, scores, dropped = parts
        step.layers.append(LayerCapture(layer.index, context, indices, weights, scores if layer.scores else None, dropped))
    del pending  # the pending contexts were kept alive up to here: their ids above stay unique
    if not step.layers and not step.contexts and not noted:
        count_anomaly("empty_step")
        return False
    return True
