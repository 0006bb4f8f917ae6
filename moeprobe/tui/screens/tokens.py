"""Tokens: a sequence's text, coloured by each token's first expert in the chosen layer; the cursor token's
experts and gate weights in every layer below. Follow mode shows the newest sequence and keeps its end in view;
moving back (keys, a click, the mouse wheel) pauses it, ``f`` resumes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.events import MouseScrollUp
from textual.widgets import Input, Static

from ...safe_text import printable
from ..decoding import load_decoder
from ..queries.tokens import SequenceInfo, SequenceTokens, sequence_tokens, sequences, token_text
from ..render import expert_style
from ..widgets.tokentext import TokenCell, TokenText
from .base import TraceScreen


@dataclass(frozen=True)
class TokensView:
    sequences: tuple[SequenceInfo, ...]
    current: SequenceTokens | None


class TokensScreen(TraceScreen):
    BINDINGS = [
        Binding("left", "cursor(-1)", "◀", show=False),
        Binding("right", "cursor(1)", "▶", show=False),
        Binding("home", "cursor_to(0)", "Start", show=False),
        Binding("end", "cursor_to(-1)", "End", show=False),
        Binding("p", "sequence(-1)", "Prev seq", show=False),
        Binding("n", "sequence(1)", "Seq", key_display="n p"),
        Binding("left_square_bracket", "layer(-1)", "Prev layer", show=False),
        Binding("right_square_bracket", "layer(1)", "Layer", key_display="[ ]"),
        Binding("f", "follow", "Follow"),
        Binding("g", "goto", "Go to seq", key_display="g"),
        Binding("escape", "close_goto", "Close", show=False),
    ]
    AUTO_FOCUS = "#text"  # the token text, not the (hidden) go-to box
    DEFAULT_CSS = """
    TokensScreen #seq-title { padding: 0 1; background: $panel; }
    TokensScreen #experts { padding: 0 1; }
    TokensScreen #text-box { height: 1fr; border-top: solid $panel-lighten-2; }
    TokensScreen #detail { height: auto; max-height: 45%; padding: 0 1; background: $boost; }
    TokensScreen #goto { display: none; margin: 0 1; }
    TokensScreen #goto.open { display: block; }
    """

    def __init__(self) -> None:
        super().__init__()
        self.follow = True
        self.chosen: tuple[int, int] | None = None  # (rank, sequence) the user picked; None while following
        self.view: TokensView | None = None
        self._cursor_at_end = True

    def compose_body(self) -> ComposeResult:
        yield Input(placeholder="sequence id (or RANK:ID), Enter goes there, Esc closes", id="goto")
        yield Static(id="seq-title")
        yield Static(id="experts")
        with VerticalScroll(id="text-box"):
            yield TokenText(id="text")
        yield Static(id="detail")

    def view_key(self) -> tuple[int, ...]:
        return () if self.chosen is None else self.chosen

    def fetch(self) -> Any:
        chosen, follow = self.chosen, self.follow

        def query(trace: Any) -> TokensView:
            seqs = sequences(trace)
            if not seqs:
                return TokensView((), None)
            pick = seqs[-1]
            if not follow and chosen is not None:
                pick = next((s for s in seqs if (s.rank, s.sequence) == chosen), pick)
            # The tokenizer the manifest names, from local files only (loaded once, in this worker thread).
            name = (trace.manifest.get("model") or {}).get("tokenizer")
            decoder = load_decoder(name) if isinstance(name, str) and name else None
            return TokensView(tuple(seqs), sequence_tokens(trace, pick, decoder))

        return self.source.read(query)

    # -- showing ---------------------------------------------------------------------------------------
    def show(self, data: TokensView) -> None:
        self.view = data
        text = self.query_one(TokenText)
        cursor = text.cursor
        if self.follow or self._cursor_at_end:
            cursor = len(data.current.tokens) - 1 if data.current else 0
        self._paint(cursor)
        if self.follow:
            self.call_after_refresh(self.query_one("#text-box", VerticalScroll).scroll_end, animate=False)

    def _paint(self, cursor: int) -> None:
        data = self.view
        text = self.query_one(TokenText)
        layer = self.moeprobe.current_layer()
        if data is None or data.current is None:
            self.query_one("#seq-title", Static).update(Text("no sequences yet", style="dim"))
            text.show([], 0)
            self.query_one("#detail", Static).update("")
            return
        current = data.current
        cells = [TokenCell(self._text(current, i), t.first_expert(layer) if layer is not None else None)
                 for i, t in enumerate(current.tokens)]
        text.show(cells, cursor)
        self._title(data, current, layer)
        self._legend(layer)
        self._detail()

    def _title(self, data: TokensView, current: SequenceTokens, layer: int | None) -> None:
        info = current.info
        number = next((i for i, s in enumerate(data.sequences) if s == info), 0) + 1
        title = Text.assemble(
            (f"sequence {number}/{len(data.sequences)} ", "bold"),
            f"(rank {info.rank}, id {info.sequence}) ",
            (f"{printable(info.tags)} " if info.tags else "", "cyan"),
            f"· {info.tokens} tokens · steps {info.first_step}–{info.last_step} · colour = first expert in ",
            (f"L{layer}", "bold"),
            "  ",
            ("● follow" if self.follow else "○ follow paused (f)", "bold green" if self.follow else "yellow"),
        )
        self.query_one("#seq-title", Static).update(title)

    def _legend(self, layer: int | None) -> None:
        meta = next((m for m in self.source.snapshot.layers if int(m["index"]) == layer), None)
        legend = Text("experts ", style="dim")
        for expert in range(int(meta["num_experts"]) if meta else 0):
            legend.append(f"{expert:>2}", style=expert_style(expert))
            legend.append(" ")
        self.query_one("#experts", Static).update(legend)

    def _detail(self) -> None:
        data = self.view
        text = self.query_one(TokenText)
        if data is None or data.current is None or not data.current.tokens:
            return
        token = data.current.tokens[text.cursor]
        label = self._text(data.current, text.cursor).replace("\n", "")
        quoted = data.current.as_bytes or data.current.pieces is not None
        out = Text.assemble(
            ("token ", "dim"), (f"'{printable(label)}'" if quoted else label, "bold"),
            f"  id {token.token_id}  position {token.position}  step {token.step} {token.phase}",
        )
        for layer in sorted(token.routes):
            out.append(f"\nL{layer:<3}", style="bold")
            for expert, weight in token.routes[layer]:
                out.append(" ")
                out.append(f"e{expert}", style=expert_style(expert))
                out.append(f" {weight:.3f}")
        self.query_one("#detail", Static).update(out)

    @staticmethod
    def _text(current: SequenceTokens, index: int) -> str:
        """A token as text: the tokenizer's piece (control characters escaped), its byte, or ⟨id⟩."""
        if current.pieces is not None:
            piece = current.pieces[index]
            return "↵\n" if piece == "\n" else printable(piece)
        return token_text(current.tokens[index].token_id, current.as_bytes)

    # -- moving ----------------------------------------------------------------------------------------
    def _pause_follow(self) -> None:
        if self.follow and self.view is not None and self.view.current is not None:
            self.follow = False
            info = self.view.current.info
            self.chosen = (info.rank, info.sequence)
            self._title(self.view, self.view.current, self.moeprobe.current_layer())

    def action_cursor(self, delta: int) -> None:
        text = self.query_one(TokenText)
        if delta < 0:
            self._pause_follow()
        text.move_to(text.cursor + delta)

    def action_cursor_to(self, index: int) -> None:
        text = self.query_one(TokenText)
        if index >= 0:
            self._pause_follow()
        text.move_to(index if index >= 0 else len(text.cells) - 1)

    def on_token_text_cursor_moved(self, event: TokenText.CursorMoved) -> None:
        text = self.query_one(TokenText)
        self._cursor_at_end = event.index >= len(text.cells) - 1
        if event.index < len(text.cells) - 1:
            self._pause_follow()
        self._detail()
        line = text.cursor_line()
        box = self.query_one("#text-box", VerticalScroll)
        if not box.scrollable_content_region.height:
            return
        top, height = box.scroll_y, box.scrollable_content_region.height
        if line < top or line >= top + height:
            box.scroll_to(y=max(0, line - height // 2), animate=False)

    def on_mouse_scroll_up(self, event: MouseScrollUp) -> None:
        self._pause_follow()

    def action_sequence(self, delta: int) -> None:
        data = self.view
        if data is None or not data.sequences or data.current is None:
            return
        index = next((i for i, s in enumerate(data.sequences) if s == data.current.info), 0)
        pick = data.sequences[max(0, min(len(data.sequences) - 1, index + delta))]
        self.follow = False
        self.chosen = (pick.rank, pick.sequence)
        self._cursor_at_end = False
        self.query_one(TokenText).cursor = 0
        self.reload()

    def action_layer(self, delta: int) -> None:
        if self.moeprobe.step_layer(delta) is not None:
            self._paint(self.query_one(TokenText).cursor)

    def action_goto(self) -> None:
        box = self.query_one("#goto", Input)
        box.add_class("open")
        box.value = ""
        box.focus()

    def action_close_goto(self) -> None:
        box = self.query_one("#goto", Input)
        box.remove_class("open")
        self.query_one(TokenText).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        target = parse_sequence_ref(event.value)
        data = self.view
        if target is None:
            self.notify(f"{event.value!r}: give a sequence id, or RANK:ID", severity="warning")
            return
        rank, sequence = target
        found = [s for s in (data.sequences if data else ()) if s.sequence == sequence and (rank is None or s.rank == rank)]
        if not found:
            ids = [s.sequence for s in data.sequences] if data else []
            have = f"ids {min(ids)}..{max(ids)}" if ids else "no sequences yet"
            self.notify(f"no sequence {event.value.strip()} in this trace ({have})", severity="warning")
            return
        pick = found[0]
        self.action_close_goto()
        self.follow = False
        self.chosen = (pick.rank, pick.sequence)
        self._cursor_at_end = False
        self.query_one(TokenText).cursor = 0
        self.reload()

    def action_follow(self) -> None:
        self.follow = not self.follow
        if self.follow:
            self.chosen = None
            self._cursor_at_end = True
        self.reload()
        if self.view is not None and self.view.current is not None:
            self._title(self.view, self.view.current, self.moeprobe.current_layer())


def parse_sequence_ref(text: str) -> tuple[int | None, int] | None:
    """``12`` -> (None, 12); ``1:12`` -> (1, 12); anything else -> None."""
    rank, sep, sequence = text.strip().rpartition(":")
    try:
        return (int(rank) if sep else None, int(sequence))
    except ValueError:
        return None
