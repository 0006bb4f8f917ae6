"""``--json``: the document's JSON, as docs/report-json.md and docs/simulate-json.md describe it."""

from __future__ import annotations

import json
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from . import Document, RenderOptions


def render(document: Document, file: IO[str], options: RenderOptions | None = None) -> None:
    from ...analysis.report_model import Comparison, Report

    # The report's types first: a report never imports the simulator's modules (a sixth of a small report's time).
    if isinstance(document, (Report, Comparison)):
        # One write: json.dump writes every token on its own (23 k writes for a small report, 30 ms of it).
        file.write(json.dumps(document.to_json(), indent=2, allow_nan=False))  # report_json cleaned it when it built it
    else:
        from ...analysis.report_json import clean

        # The simulator's values are as computed: cleaned here (6 decimals, NaN as null), one space of indent.
        file.write(json.dumps(clean(document.to_json()), indent=1, allow_nan=False))
    file.write("\n")
