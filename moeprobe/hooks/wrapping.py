"""Restorable replacements of modules' ``forward``: how both capture paths get into a model.

A module's forward is replaced by setting an instance attribute (torch's ``Module.__call__`` reads
``self.forward``), so the model's code is not edited and the class is untouched. Compared with forward hooks, a
wrapper costs the model one Python frame per call: a module with hooks takes torch's slower call path and two more
calls (pre and post hook), measured at about 5x the cost of a wrapper on the demo decode loop
(BENCHMARKS.md, "Hook capture through wrapped forwards").

The wrapper carries the original's signature (``functools.wraps`` sets ``__wrapped__``): transformers reads
``inspect.signature(model.forward)`` to decide which keyword arguments ``generate()`` passes, and a bare
``(*args, **kwargs)`` would change what it passes. Restoring puts back exactly what the instance had: nothing (the
class's forward shows through again) or another tool's own instance attribute (e.g. accelerate's hooks).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

_ABSENT = object()


class ForwardWraps:
    """The forwards one probe replaced, in order, and how to put them back."""

    def __init__(self) -> None:
        self._restore: list[tuple[nn.Module, Any, Any]] = []  # (module, what its instance had, our wrapper)

    def wrap(self, module: nn.Module, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        """Replace ``module.forward`` by ``make(current forward)``, keeping the current one's signature."""
        had = module.__dict__.get("forward", _ABSENT)
        original = module.forward
        wrapper = functools.wraps(original)(make(original))
        module.forward = wrapper
        self._restore.append((module, had, wrapper))

    def unwrap(self, module: nn.Module) -> bool:
        """Put back one module's forward before the others (a wrapper found to be dead code), if the forward there
        is still ours: another tool's wrapper set on top since is left alone, and so is ours under it."""
        for n, (wrapped, had, wrapper) in enumerate(self._restore):
            if wrapped is module and module.__dict__.get("forward") is wrapper:
                if had is _ABSENT:
                    module.__dict__.pop("forward", None)
                else:
                    module.__dict__["forward"] = had
                del self._restore[n]
                return True
        return False

    def restore(self) -> None:
        """Put every replaced forward back, last replaced first (a module wrapped twice unwinds in order)."""
        restore, self._restore = self._restore, []
        for module, had, _ in reversed(restore):
            if had is _ABSENT:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = had

    def __len__(self) -> int:
        return len(self._restore)
