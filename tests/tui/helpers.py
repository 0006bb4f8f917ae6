"""A hand-made trace with known loads for the TUI tests, written through the real ShardWriter, and pilot helpers.

Layer 0 (4 experts, top-2): loads 6, 4, 6, 0 over 8 tokens: utilisation 1.5, 1.0, 1.5, 0 (dead), MaxVio 0.5.
Layer 1: loads 4, 4, 4, 4: MaxVio 0. Sequence 0 is the bytes of "hello wo", tagged domain=code.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from moeprobe.traces import ShardWriter, prepare_trace_dir
from moeprobe.traces.schema import TABLES
from tests.support import layer_meta, routing_table

TEXT = b"hello wo"
LAYER0 = [(0, 1), (2, 0), (0, 2), (1, 2), (0, 1), (2, 0), (0, 2), (2, 1)]
LAYER1 = [(0, 1), (2, 3), (0, 1), (2, 3), (0, 2), (1, 3), (0, 3), (1, 2)]
STEPS = [0, 0, 0, 0, 0, 0, 1, 2]
WEIGHTS = (0.75, 0.25)


def sequence_tables(text: bytes, layer0: list[tuple[int, int]], layer1: list[tuple[int, int]], steps: list[int],
                    sequence: int) -> dict[str, pa.Table]:
    n = len(text)
    parts = []
    for layer, choices in ((0, layer0), (1, layer1)):
        parts.append(
            routing_table(
                np.array(choices),
                weights=np.tile(np.array(WEIGHTS, np.float32), (n, 1)),
                step=np.array(steps),
                sequence=np.full(n, sequence),
                position=np.arange(n),
                token_id=np.frombuffer(text, dtype=np.uint8).astype(np.int32),
                phase=["prefill" if s == steps[0] else "decode" for s in steps],
                layer=layer,
            )
        )
    unique = sorted(set(steps))
    return {
        "routing": pa.concat_tables(parts),
        "steps": pa.table(
            {
                "step": unique,
                "phase": ["prefill" if s == steps[0] else "decode" for s in unique],
                "batch": [1] * len(unique),
                "tokens": [steps.count(s) for s in unique],
                "started_at": [1.7e9 + s for s in unique],
                "wall_ms": [10.0] * len(unique),
            },
            schema=TABLES["steps"],
        ),
        "latency": pa.table(
            {
                "step": [s for s in unique for _ in (0, 1)],
                "layer": [layer for _ in unique for layer in (0, 1)],
                "router_ms": [0.1 * (s + 1) for s in unique for _ in (0, 1)],
                "block_ms": [1.0 * (s + 1) for s in unique for _ in (0, 1)],
                "clock": ["perf_counter"] * (2 * len(unique)),
            },
            schema=TABLES["latency"],
        ),
        "tags": pa.table({"sequence": [sequence], "key": ["domain"], "value": ["code"]}, schema=TABLES["tags"]),
    }


def open_writer(path: Path) -> ShardWriter:
    prepare_trace_dir(path, force=True)
    return ShardWriter(path, model={"name": "hand-made", "family": "test"}, layers=layer_meta(2, 4, 2), options={})


def append_sequence(writer: ShardWriter, tables: dict[str, pa.Table]) -> None:
    """Append one sequence and flush it as new segments, counting it the way the capture side does."""
    for name, table in tables.items():
        writer.append(name, table)
    tokens = tables["routing"].num_rows // 4  # 2 layers x top-2
    writer.counters["tokens"] += tokens
    writer.counters["decisions"] += tables["routing"].num_rows
    writer.counters["steps"] += tables["steps"].num_rows
    writer.flush()


def write_known(path: Path, *, close: bool = True) -> ShardWriter:
    writer = open_writer(path)
    append_sequence(writer, sequence_tables(TEXT, LAYER0, LAYER1, STEPS, 0))
    writer.append(
        "bias",
        pa.table({"step": [0], "layer": [1], "bias": [[0.1, -0.1, 0.0, 0.05]]}, schema=TABLES["bias"]),
    )
    writer.flush()
    if close:
        writer.close()
    return writer


async def wait_for(pilot: Any, condition: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Let the app run until ``condition()`` holds; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await pilot.pause(0.02)
        if condition():
            return
    await asyncio.sleep(0)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def loaded(app: Any, screen_type: type | None = None) -> bool:
    screen = app.screen
    if screen_type is not None and not isinstance(screen, screen_type):
        return False
    return getattr(screen, "shown_generation", None) is not None and not getattr(screen, "_busy", False)


def text_of(widget: Any) -> str:
    """The plain text a Static or a render()-based widget shows."""
    rendered = widget.render()
    return getattr(rendered, "plain", str(rendered))


async def open_screen(pilot: Any, key: str, screen_type: type) -> Any:
    """Press a screen's key and wait until it has shown its data; return the screen."""
    await pilot.press(key)
    await wait_for(pilot, lambda: loaded(pilot.app, screen_type), what=screen_type.__name__)
    return pilot.app.screen
