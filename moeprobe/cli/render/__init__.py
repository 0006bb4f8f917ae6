"""One renderer per output format, all with one signature: ``render(document, file, options)``.

``document`` is a typed result: a ``Report`` or a ``Comparison`` (``analysis.report_model``) or a
``SimulateReport`` (``simulate.report_model``); ``file`` a text stream; ``options`` the few settings a format
uses. Formats: ``json_doc`` (all three), ``text`` (all three), ``markdown`` (reports and comparisons) and
``html`` (all three; the charts need the timelines). A new format is a new module with this ``render``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ...analysis.report_model import Comparison, Report
    from ...simulate.report_model import SimulateReport

    Document = Report | Comparison | SimulateReport


@dataclass(frozen=True)
class RenderOptions:
    limit: int = 16  # rows per table in text and Markdown; 0: all
    timelines: tuple[dict[str, Any], ...] = ()  # HTML of reports: each trace's timeline (Trace.timeline().to_json())
    chart_layer: int | None = None  # HTML of reports: the layer of the per-tag and co-activation charts


def unsupported(fmt: str, document: object) -> TypeError:
    return TypeError(f"no {fmt} output for a {type(document).__name__}")
