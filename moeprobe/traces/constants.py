"""The format's plain constants, importable without pyarrow (``analysis.filters`` and the balancing lab read them;
``schema`` re-exports them beside the Arrow schemas)."""

from __future__ import annotations

MAGIC = "moeprobe"
FORMAT_VERSION = 2

PHASES = ("prefill", "decode")
