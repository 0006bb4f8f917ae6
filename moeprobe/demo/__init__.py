"""The embedded demo: tiny DeepSeek-V3-style MoE models trained on a multi-domain byte corpus.

``moeprobe demo`` records them on held-out prompts (see :mod:`moeprobe.demo.run`); ``python -m
moeprobe.demo.train`` rebuilds the checkpoints. Everything here imports torch lazily from its submodules,
so importing the package is cheap.
"""

from __future__ import annotations

CHECKPOINT_NAMES: tuple[str, ...] = ("balanced", "unbalanced")
