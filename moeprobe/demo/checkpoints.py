"""Load the trained demo checkpoints shipped in ``moeprobe/demo/checkpoints/``.

Each checkpoint is ``NAME.safetensors`` (weights and the routers' correction-bias buffers) and ``NAME.json``,
its card: the config that built it, how it was trained and what it measured.
"""

from __future__ import annotations

import json
from importlib import resources
from importlib.abc import Traversable
from typing import TYPE_CHECKING, Any

from . import CHECKPOINT_NAMES

if TYPE_CHECKING:
    from transformers import DeepseekV3ForCausalLM


def _dir() -> Traversable:
    return resources.files("moeprobe.demo").joinpath("checkpoints")


def weights_file(name: str) -> Traversable:
    return _dir().joinpath(f"{name}.safetensors")


def card_file(name: str) -> Traversable:
    return _dir().joinpath(f"{name}.json")


def available() -> list[str]:
    """The shipped checkpoints that have both weights and a card, in the canonical order."""
    return [n for n in CHECKPOINT_NAMES if weights_file(n).is_file() and card_file(n).is_file()]


def load_card(name: str) -> dict[str, Any]:
    card: dict[str, Any] = json.loads(card_file(name).read_text(encoding="utf-8"))
    return card


def load_checkpoint(name: str) -> DeepseekV3ForCausalLM:
    """The trained model ``name`` in eval mode, built from its card's config and loaded strictly."""
    from safetensors.torch import load

    from .model import build_model

    card = load_card(name)
    model = build_model(seed=0, **card["config"])
    state = load(weights_file(name).read_bytes())
    # strict: a missing or renamed tensor (e.g. after a transformers upgrade) must fail loudly, not leave
    # random weights behind.
    model.load_state_dict(state, strict=True)
    model.eval()
    return model
