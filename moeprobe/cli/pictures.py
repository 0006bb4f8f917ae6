"""Picture outputs shared by ``moeprobe report`` and ``moeprobe simulate``: ``--html FILE``, ``--png DIR``,
``--svg DIR``. Each returns an exit status; a failure (vl-convert missing, a file that cannot be written, a chart
layer the trace does not have) is one line on stderr and status 1, and no half-written HTML file is left."""

from __future__ import annotations

import io
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..analysis.report_model import Report
    from .render import Document, RenderOptions


def _fail(command: str, message: str) -> int:
    from ..safe_text import printable

    print(f"moeprobe {command}: {printable(message)}", file=sys.stderr)
    return 1


def _write_text(path: Path, text: str) -> None:
    """Write through a temporary file in the same directory and a rename: all of the file or none of it."""
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _done(path: Path) -> None:
    from ..safe_text import printable

    size = path.stat().st_size
    print(f"wrote {printable(str(path))} ({size / 1024:,.0f} KiB)", file=sys.stderr)


def _check_layer(reports: list[Report], layer: int | None) -> str | None:
    if layer is None:
        return None
    for report in reports:
        have = [item.layer for item in report.layers]
        if layer not in have:
            return f"--chart-layer {layer}: {report.trace.path} has no routing in that layer (layers: {have})"
    return None


def _run(command: str, make_html: Any, make_charts: Any, html: str | None, png: str | None, svg: str | None) -> int:
    from ..charts.page import write_images
    from ..charts.render import MissingDependency

    target = html or png or svg  # what the user asked for is what an error names, not a temporary file
    try:
        if html:
            path = Path(html)
            _write_text(path, make_html())
            _done(path)
        for fmt, directory in (("png", png), ("svg", svg)):
            if directory:
                target = directory
                charts = make_charts()
                if not charts:  # figures were asked for: an empty directory and status 0 would pass unnoticed
                    return _fail(command, f"nothing to draw in {directory}: no routing decisions with these filters")
                for path in write_images(charts, Path(directory), fmt):
                    _done(path)
    except MissingDependency as exc:
        return _fail(command, str(exc))
    except OSError as exc:
        return _fail(command, f"cannot write {target}: {exc.strerror or exc}")
    return 0


def write_pictures(command: str, document: Document, options: RenderOptions, *, html: str | None, png: str | None,
                   svg: str | None) -> int:
    """The page (``render.html``, the one HTML renderer) and the figures of a report, a comparison or a simulation."""
    from ..analysis.report_model import Comparison, Report
    from .render import html as html_renderer

    if isinstance(document, Report | Comparison):
        problem = _check_layer([document] if isinstance(document, Report) else [document.a, document.b],
                               options.chart_layer)
        if problem:
            return _fail(command, problem)

    def page() -> str:
        buffer = io.StringIO()
        html_renderer.render(document, buffer, options)
        return buffer.getvalue()

    return _run(command, page, lambda: _charts(document, options), html, png, svg)


def _charts(document: Document, options: RenderOptions) -> list[Any]:
    """Each chart of the page, for --png and --svg (a simulation has none outside its page)."""
    from ..analysis.report_model import Comparison, Report
    from ..charts.documents import compare_charts
    from ..charts.page import report_charts

    if isinstance(document, Report):
        (timeline,) = options.timelines
        return report_charts(document.to_json(), timeline, layer=options.chart_layer)
    if isinstance(document, Comparison):
        a_timeline, b_timeline = options.timelines
        a, b = compare_charts(document.to_json(), (a_timeline, b_timeline), layer=options.chart_layer)
        return a + b
    return []
