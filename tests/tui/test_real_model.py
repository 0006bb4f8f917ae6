"""The TUI on a real recording: a tiny DeepSeek-V3 (routers with a correction bias) generating on CPU while the
app watches the trace directory, from before it exists until the probe closes it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import moeprobe  # noqa: E402
from moeprobe.tui.app import MoeprobeApp  # noqa: E402
from moeprobe.tui.screens.layer import LayerScreen  # noqa: E402
from moeprobe.tui.screens.overview import OverviewScreen  # noqa: E402
from moeprobe.tui.screens.tokens import TokensScreen  # noqa: E402
from moeprobe.tui.widgets.heatmap import HeatMap  # noqa: E402
from moeprobe.tui.widgets.tokentext import TokenText  # noqa: E402
from tests.tiny_models import build  # noqa: E402
from tests.tui.helpers import loaded, open_screen, text_of, wait_for  # noqa: E402

PROMPT = [[5, 17, 33, 8, 61, 12]]
NEW_TOKENS = 4


def _record(path: Path) -> None:
    model = build("deepseek_v3")
    ids = torch.tensor(PROMPT)
    with moeprobe.record(model, path, flush_interval=0.05) as probe:
        probe.tag(domain="code")
        model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)


async def test_tui_follows_a_real_recording(tmp_path: Path) -> None:
    path = tmp_path / "deepseek"
    app = MoeprobeApp([path])
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: "waiting for" in text_of(app.screen.query_one("#banner")), what="waiting")
        await asyncio.to_thread(_record, path)
        await wait_for(pilot, lambda: "complete" in text_of(app.screen.query_one("#run")), what="complete")
        await wait_for(pilot, lambda: loaded(app, OverviewScreen) and app.screen.data.decisions > 0, what="overview")

        with moeprobe.open_trace(path) as trace:
            layers = trace.layers
            truth = trace.sql("SELECT layer, expert, count(*) AS n FROM routing GROUP BY ALL ORDER BY ALL")
        heat = app.screen.query_one(HeatMap)
        assert [r.label for r in heat.rows] == [f"L{m['index']}" for m in layers]
        tokens = len(PROMPT[0]) + NEW_TOKENS - 1  # the last generated token is never fed back
        for row, meta in zip(heat.rows, layers, strict=True):
            sel = truth["layer"].to_numpy() == meta["index"]
            counts = np.zeros(meta["num_experts"])
            counts[truth["expert"].to_numpy()[sel]] = truth["n"].to_numpy()[sel]
            np.testing.assert_allclose(row.values, counts * meta["num_experts"] / (tokens * meta["top_k"]))
        header = text_of(app.screen.query_one("#run"))
        assert f"{tokens} tokens" in header and "deepseek_v3" in header

        await open_screen(pilot, "2", LayerScreen)
        assert app.screen.data.counts.sum() == tokens * layers[0]["top_k"]
        assert app.screen.data.bias is not None  # the correction bias the tiny model was given
        np.testing.assert_allclose(app.screen.data.bias, np.linspace(-0.05, 0.05, layers[0]["num_experts"]), atol=1e-6)

        await open_screen(pilot, "4", TokensScreen)
        assert len(app.screen.query_one(TokenText).cells) == tokens
        await pilot.press("home")
        assert f"id {PROMPT[0][0]} " in text_of(app.screen.query_one("#detail"))
