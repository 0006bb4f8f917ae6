"""What one forward call (a "step") captured, and how it leaves the device.

During the step the hooks only keep references to tensors the model produced anyway (router outputs and
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


@dataclass
class LayerCapture:
    layer: int
    context: TokenContext | None
    indices: torch.Tensor  # (tokens, k)
    weights: torch.Tensor | None  # (tokens, k)
    scores: torch.Tensor | None  # (tokens, E)
    dropped: torch.Tensor | None  # (tokens,)

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


class LayerMarks:
    """One layer's clock marks in one step (CUDA events on GPU, perf_counter ns on CPU); None until taken.

    Created by the block's pre-hook, filled by the router's hooks and the block's post-hook on the model's thread,
    read and given back to the clock's pool on the writer thread."""

    __slots__ = ("router_start", "router_end", "block_start", "block_end")

    def __init__(self, block_start: Any) -> None:
        self.router_start: Any = None
        self.router_end: Any = None
        self.block_start = block_start
        self.block_end: Any = None

    def all(self) -> tuple[Any, Any, Any, Any]:
        """The four marks, for the clock to take back (it skips None)."""
        return (self.router_start, self.router_end, self.block_start, self.block_end)


@dataclass
class StepBuffer:
    step: int
    started_at: float = field(default_factory=time.time)
    t0: int = field(default_factory=time.perf_counter_ns)
    wall_ms: float = 0.0
    contexts: list[TokenContext] = field(default_factory=list)
    layers: list[LayerCapture] = field(default_factory=list)
    marks: dict[int, LayerMarks] = field(default_factory=dict)  # layer -> its clock marks
    bias: dict[int, torch.Tensor] = field(default_factory=dict)
    ready: torch.cuda.Event | None = None  # CUDA: recorded after the host copies
    held_bytes: int = 0  # bytes of the captures kept so far (see keep)
    over_budget: bool = False  # the step stopped keeping its captures; `lost` decisions are counted as dropped
    lost: int = 0

    @property
    def decisions(self) -> int:
        return sum(c.decisions for c in self.layers)

    def keep(self, capture: LayerCapture, limit: int) -> bool:
        """Keep ``capture`` unless the step's captures would then hold more than ``limit`` bytes; past it the step
        releases everything it kept (the references were all that kept those tensors alive) and from then on
        only counts the decisions it loses. Model's thread, once per MoE layer: a few attribute reads."""
        if self.over_budget:
            self.lost += capture.decisions
            return False
        size = capture.nbytes()
        if self.held_bytes + size > limit:
            self.over_budget = True
            self.lost = self.decisions + capture.decisions
            self.layers.clear()
            self.held_bytes = 0
            return False
        self.layers.append(capture)
        self.held_bytes += size
        return True

    def nbytes(self) -> int:
        """Host memory this step will hold once converted: what the queue's byte budget counts."""
        # Runs on the model's thread at every step's end: plain attribute reads, one numel() per tensor.
        total = 0
        for c in self.layers:
            total += c.indices.numel() * 16  # decisions (= the indices' elements) x (int64 index + float32 weight + row columns), roughly
            if c.scores is not None:
                total += c.scores.numel() * 4
        for ctx in self.contexts:  # token context tensors travel to the host too (a decode mask can be MBs)
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
