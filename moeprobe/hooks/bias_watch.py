"""Router correction biases (DeepSeek-V3's ``e_score_correction_bias``), read between steps when they change.

No capture path can see a bias change inside a forward: an optimiser updates it between steps. Both captures
read the biases on the model's thread once per step (hook capture, at each step's end) or per drain (graph
capture) and keep a copy of each one whose tensor or version counter changed since the last copy written.
"""

from __future__ import annotations

from typing import Any

import torch

from .discovery import LayerBinding


def _buffer_place(layer: LayerBinding) -> tuple[dict[str, Any], str] | None:
    """(the router's buffer dict, the name) when the layer's bias is one of its router's buffers, as transformers
    registers DeepSeek-V3's: read from there at every step without a call into the family's reader."""
    router = layer.router
    buffers = router.__dict__.get("_buffers") if router is not None else None
    bias = layer.bias()
    if not isinstance(buffers, dict) or bias is None:
        return None
    return next(((buffers, name) for name, value in buffers.items() if value is bias), None)


class BiasWatch:
    """The layers with a correction bias, and the (tensor id, version) of each one last written."""

    def __init__(self, layers: list[LayerBinding]) -> None:
        self.layers = [layer for layer in layers if layer.meta.get("has_bias")]
        self._written: dict[int, tuple[int, int]] = {}  # layer -> (id, version) of the bias last written
        # Runs at every step's end on the model's thread: a buffer is looked up in its module's buffer dict (one
        # dict read, no Python call), and through the family's reader when it is not found there (the bias was
        # replaced by a parameter or a plain attribute since: the reader finds those too).
        self._places = [(layer.index, _buffer_place(layer), layer.bias) for layer in self.layers]

    def changed(self) -> tuple[dict[int, torch.Tensor], dict[int, tuple[int, int]]]:
        """Copies of the biases that changed since the last :meth:`commit`, and their new (id, version)."""
        copies: dict[int, torch.Tensor] = {}
        versions: dict[int, tuple[int, int]] = {}
        written = self._written
        for index, place, read in self._places:
            bias = place[0].get(place[1]) if place is not None else None
            if bias is None:
                bias = read()
                if bias is None:
                    continue
            version = (id(bias), bias._version)  # the version counter changes on every in-place update; host-side only
            if written.get(index) != version:
                versions[index] = version
                copies[index] = bias.detach().clone()
        return copies, versions

    def commit(self, versions: dict[int, tuple[int, int]]) -> None:
        """The copies of these versions are written (or queued to be): later reads compare against them."""
        self._written.update(versions)
