"""Is the model compiled, or is a graph being traced or captured right now? Decides hook vs graph-safe capture.

Hook capture's wrappers (Python) see nothing of a CUDA graph replay, and their host side effects (a clock read, a
Python list append) break ``torch.compile``: under ``fullgraph=True`` dynamo raises, the user's job dies. So hook
capture is never used where it cannot see everything: a model compiled before ``record()`` gets the graph-safe
capture (or a one-line refusal when hook capture was asked for), and a model compiled or captured after the
hooks were attached is refused at the next step, never recorded short.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

CAPTURES = ("auto", "hooks", "graph")
MODES = ("tokens", "counts")


def _compiled_callable(fn: Any) -> bool:
    return getattr(fn, "_torchdynamo_orig_callable", None) is not None


def compiled_parts(model: nn.Module) -> list[str]:
    """Which parts of ``model`` run compiled: the module itself, its forward, or submodules compiled in place."""
    found: list[str] = []
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        return ["the model (torch.compile(model))"]
    if _compiled_callable(model.__dict__.get("forward")):
        found.append("model.forward")
    for name, module in model.named_modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            found.append(f"{name or 'the model'} (module.compile())")
        elif name and _compiled_callable(module.__dict__.get("forward")):
            found.append(f"{name}.forward")
    return found


def tracing_now(cuda: bool) -> bool:
    """True while dynamo traces (the hook is being compiled into a graph) or a CUDA graph is being captured."""
    if torch.compiler.is_compiling():
        return True
    return cuda and torch.cuda.is_current_stream_capturing()


def choose_capture(model: nn.Module, capture: str, mode: str, sample: int | None) -> tuple[str, str | None]:
    """(capture to use, why it was chosen when not asked for). Raises ValueError on a contradiction (usage)."""
    if capture not in CAPTURES:
        raise ValueError(f"capture must be one of {', '.join(CAPTURES)}, got {capture!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if sample is not None and (not isinstance(sample, int) or isinstance(sample, bool) or sample < 1):
        raise ValueError(f"sample must be a positive integer (record 1 step in N), got {sample!r}")
    compiled = compiled_parts(model)
    needs_graph = mode == "counts" or sample is not None
    if capture == "hooks":
        if compiled:
            from .spec import UnsupportedModelError

            raise UnsupportedModelError(
                f"hook capture cannot see inside a compiled model ({', '.join(compiled)} is compiled); use capture='graph'"
            )
        if needs_graph:
            raise ValueError("mode='counts' and sample= record with the graph-safe capture; drop capture='hooks'")
        return "hooks", None
    if capture == "graph":
        return "graph", None
    if compiled:
        return "graph", f"{', '.join(compiled)} is compiled: recording with the graph-safe capture"
    if needs_graph:
        return "graph", None
    return "hooks", None
