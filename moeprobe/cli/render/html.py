"""``--html``: one self-contained page with the charts (``moeprobe.charts``, which knows only the JSON shapes)."""

from __future__ import annotations

from typing import IO, TYPE_CHECKING

from . import RenderOptions

if TYPE_CHECKING:
    from . import Document


def render(document: Document, file: IO[str], options: RenderOptions | None = None) -> None:
    from ...analysis.report_model import Comparison, Report
    from ...charts.documents import compare_html, report_html, simulate_html

    options = options or RenderOptions()
    if isinstance(document, Report):
        (timeline,) = options.timelines
        file.write(report_html(document.to_json(), timeline, layer=options.chart_layer))
    elif isinstance(document, Comparison):
        a, b = options.timelines
        file.write(compare_html(document.to_json(), (a, b), layer=options.chart_layer))
    else:
        file.write(simulate_html(document.to_json(), document.gpus_for_pictures))
