"""Making trace data safe to print: a tag value, model name or path is data, never terminal control or markup.

Trace contents come from whoever wrote the trace. Printed raw, an ESC sequence in a tag value could retitle or
clear the user's terminal, a newline could forge extra report lines, and ``[/]`` in a model name would be taken
as Rich markup (and crash the renderer). Every command that prints trace data routes it through here.
"""

from __future__ import annotations

from typing import Any

# C0 controls, DEL and C1 controls become visible escapes; so do the Unicode characters that reorder or break
# what a terminal shows without being control codes: bidirectional overrides and isolates (U+202E turns
# "exe.txt" into "txt.exe" on screen), marks, and the line and paragraph separators (U+2028 starts a new line in
# some terminals and editors). Everything else (any printable Unicode) stays.
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_CONTROLS = {c: _NAMED.get(chr(c), f"\\x{c:02x}") for c in [*range(0x20), *range(0x7F, 0xA0)]}
_INVISIBLE = [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x2028, 0x2029, 0xFEFF]
_CONTROLS.update({c: f"\\u{c:04x}" for c in _INVISIBLE})


def printable(value: Any) -> str:
    """``value`` as one line of text with every control character shown as an escape (``\\x1b``, ``\\n``)."""
    return str(value).translate(_CONTROLS)


def plain(value: Any) -> str:
    """``printable(value)`` with Rich markup escaped, for interpolation into a string Rich will parse."""
    from rich.markup import escape

    return escape(printable(value))
