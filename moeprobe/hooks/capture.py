"""What one forward call (a "step") captured, and how it leaves the device.

During the step the wrapped forwards only keep references to tensors the model produced anyway (router outputs and
the stack's input ids and mask). Those references keep the router outputs alive until the step ends (on the
GPU for a CUDA model): ``StepBuffer.keep`` counts their bytes against the pipeline's byte budget, and a step
that would hold more stops keeping anything (its captures are released and its decisions counted as dropped,
``step_over_budget``) instead of growing. When the step ends, on CUDA the captured tensors are concatenated per
kind and dtype on the device, in their own dtype (a float32 cast of bf16 scores would double them on the
device), and copied to host memory with one non-blocking copy each, and an event is recorded after the copies;
the writer thread waits on that event, never the model's thread. On CPU the tensors already live in host
memory and are handed over as they are.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .token_context import TokenContext


CONTEXT_TENSORS = ("input_ids", "position_ids", "attention_mask", "mask_4d")


@dataclass(slots=True)  # slots: built on the model thread once per MoE layer and step
class LayerCapture:
    layer: int
    context: Any  # TokenContext (a PendingContext until the step is resolved: noted_routing.resolve) or None
    indices: torch.Tensor  # (tokens, k)
    weights: torch.Tensor | None  # (tokens, k)
    scores: torch.Tensor | None  # (tokens, E)
    dropped: torch.Tensor | None  # (tokens,)
    # Hook capture on the host: the version counters of indices, weights and (when recorded) scores at the call
    # (noted_routing.versions_of; -1: not checked), compared when the writer reads them (noted_routing.resolve).
    versions: tuple[int, ...] = (-1, -1)

    @property
    def decisions(self) -> int:
        shape = self.indices.shape
        return int(shape[0]) * int(shape[1]) if len(shape) == 2 else int(self.indices.numel())

    def nbytes(self) -> int:
        """Bytes of the tensors this capture keeps alive, on their device."""
        total = 0
        for t in (self.indices, self.weights, self.scores, self.dropped):
            if t is not None:
                total += t.numel() * t.element_size()
        return total


# One layer's clock marks in one step (CUDA events on GPU, perf_counter ns on CPU; None until taken): a plain list
# [block start, router start, router end, block end], made by the block's wrapper and filled by the router's and
# the block's on the model's thread, read and given back to the clock's pool on the writer thread. A list literal,
# not an object: it is made three times a step in the decode loop, where a Python __init__ costs several times more.
BLOCK_START, ROUTER_START, ROUTER_END, BLOCK_END = range(4)


@dataclass(slots=True)  # slots: built on the model thread once per step
class StepBuffer:
    step: int
    started_at: float = field(default_factory=time.time)
    t0: int = field(default_factory=time.perf_counter_ns)
    wall_ms: float = 0.0
    contexts: list[Any] = field(default_factory=list)  # TokenContext (PendingContext until resolved, see resolve)
    layers: list[LayerCapture] = field(default_factory=list)
    marks: dict[int, list[Any]] = field(default_factory=dict)  # layer -> its clock marks (see BLOCK_START)
    bias: dict[int, torch.Tensor] = field(default_factory=dict)
    ready: torch.cuda.Event | None = None  # CUDA: recorded after the host copies
    held_bytes: int = 0  # bytes of the captures kept so far (see keep)
    over_budget: bool = False  # the step stopped keeping its captures; `lost` decisions are counted as dropped
    lost: int = 0
    # Router calls noted by reference, read on the writer thread by ``resolve`` (hook capture on the host, see
    # noted_routing.py): their decisions and queue bytes are counted when noted, so drops and the budget see them.
    noted: list[Any] = field(default_factory=list)
    noted_decisions: int = 0
    noted_queue_bytes: int = 0
    resolve: Any = None  # writer thread: turns ``noted`` into ``layers`` (None: nothing noted)

    @property
    def decisions(self) -> int:
        return sum(c.decisions for c in self.layers) + self.noted_decisions

    def _release(self, decisions: int) -> None:
        """Past the budget: drop everything kept (the references were all that kept those tensors alive) and from
        then on only count the decisions lost."""
        self.over_budget = True
        self.lost = self.decisions + decisions
        self.layers.clear()
        self.noted.clear()
        self.noted_decisions = self.noted_queue_bytes = 0
        self.held_bytes = 0

    def note(self, call: Any, decisions: int, size: int, queue_size: int, limit: int) -> bool:
        """Keep a noted router call (see noted_routing.py) of ``decisions`` decisions holding ``size`` bytes, under
        the same budget rule as :meth:`keep`."""
        if self.over_budget:
            self.lost += decisions
            return False
        if self.held_bytes + size > limit:
            self._release(decisions)
            return False
        self.noted.append(call)
        self.noted_decisions += decisions
        self.noted_queue_bytes += queue_size
        self.held_bytes += size
        return True

    def keep(self, capture: LayerCapture, limit: int) -> bool:
        """Keep ``capture`` unless the step's captures would then hold more than ``limit`` bytes; past it the step
        releases everything it kept (the references were all that kept those tensors alive) and from then on
        only counts the decisions it loses. Model's thread, once per MoE layer: a few attribute reads."""
        if self.over_budget:
            self.lost += capture.decisions
            return False
        size = capture.nbytes()
        if self.held_bytes + size > limit:
            self._release(capture.decisions)
            return False
        self.layers.append(capture)
        self.held_bytes += size
        return True

    def nbytes(self) -> int:
        """Host memory this step will hold once converted: what the queue's byte budget counts."""
        # Runs on the model's thread at every step's end: plain attribute reads, one numel() per tensor.
        total = self.noted_queue_bytes
        for c in self.layers:
            total += c.indices.numel() * 16  # decisions (= the indices' elements) x (int64 index + float32 weight + row columns), roughly
            if c.scores is not None:
                total += c.scores.numel() * 4
        for ctx in self.contexts:  # token context tensors travel to the host too (a decode mask can be MBs)
            if type(ctx) is not TokenContext:
                total += ctx.nbytes()  # a PendingContext: the stack call's argument tensors, held until read
                continue
            for t in (ctx.input_ids, ctx.position_ids, ctx.attention_mask, ctx.mask_4d):  # CONTEXT_TENSORS
                if t is not None:
                    total += t.numel() * t.element_size()
        return total


def _flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    # In the tensors' own dtype: one device copy the size of the sources, never a widened one.
    return torch.cat([t.reshape(-1) for t in tensors])


def _split(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, offset = [], 0
    for t in like:
        n = t.numel()
        out.append(flat[offset : offset + n].view(t.shape))
        offset += n
    return out


def move_to_host(step: StepBuffer) -> None:
    """Start the device-to-host transfer of a finished step (CUDA), batched per tensor kind.

    Runs on the model's thread at the end of the step: only kernel launches and async copies.
    """
    cuda_layers = [c for c in step.layers if c.indices.is_cuda]
    if not cuda_layers and not any(
        getattr(ctx, attr) is not None and getattr(ctx, attr).is_cuda for ctx in step.contexts for attr in CONTEXT_TENSORS
    ):
        return
    for kind in ("indices", "weights", "scores", "dropped"):
        groups: dict[torch.dtype, list[LayerCapture]] = {}
        for c in cuda_layers:
            t = getattr(c, kind)
            if t is not None:
                groups.setdefault(t.dtype, []).append(c)
        # One group per dtype (usually one per kind): the writer thread widens bf16/fp16 on the host.
        for have in groups.values():
            tensors = [getattr(c, kind) for c in have]
            host = _flatten(tensors).to("cpu", non_blocking=True)
            for capture, part in zip(have, _split(host, tensors), strict=True):
                setattr(capture, kind, part)
    for ctx in step.contexts:
        for attr in CONTEXT_TENSORS:
            value = getattr(ctx, attr)
            if value is not None and value.is_cuda:
                setattr(ctx, attr, value.to("cpu", non_blocking=True))
    for layer, bias in list(step.bias.items()):
        if bias.is_cuda:
            step.bias[layer] = bias.to("cpu", non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    step.ready = event
