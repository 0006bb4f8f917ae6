"""Router correction biases (DeepSeek-V3's ``e_score_correction_bias``), read between steps when they change.

No capture path can see a bias change inside a forward: an optimiser updates it between steps. Both captures
read the biases on the model's thread once per step (hook capture, at each step's end) or per drain (graph
capture) and keep a copy of each one whose tensor or version counter changed since the last copy written.
"""

from __future__ import annotations

import torch

from .discovery import LayerBinding


class BiasWatch:
    """The layers with a correction bias, and the (tensor id, version) of each one last written."""

    def __init__(self, layers: list[LayerBinding]) -> None:
        self.layers = [layer for layer in layers if layer.meta.get("has_bias")]
        self._written: dict[int, tuple[int, int]] = {}  # layer -> (id, version) of the bias last written

    def changed(self) -> tuple[dict[int, torch.Tensor], dict[int, tuple[int, int]]]:
        """Copies of the biases that changed since the last :meth:`commit`, and their new (id, version)."""
        copies: dict[int, torch.Tensor] = {}
        versions: dict[int, tuple[int, int]] = {}
        for layer in self.layers:
            bias = layer.bias()
            if bias is None:
                continue
            version = (id(bias), bias._version)  # the version counter changes on every in-place update; host-side only
            if self._written.get(layer.index) != version:
                versions[layer.index] = version
                copies[layer.index] = bias.detach().clone()
        return copies, versions

    def commit(self, versions: dict[int, tuple[int, int]]) -> None:
        """The copies of these versions are written (or queued to be): later reads compare against them."""
        self._written.update(versions)
