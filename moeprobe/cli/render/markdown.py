"""``--markdown``: the report's header as a list and its tables as Markdown tables (for an issue or a PR)."""

from __future__ import annotations

from typing import IO, TYPE_CHECKING

from . import RenderOptions, unsupported

if TYPE_CHECKING:
    from ...analysis.tables import Table
    from . import Document


def render(document: Document, file: IO[str], options: RenderOptions | None = None) -> None:
    from .text import report_lines_and_tables

    found = report_lines_and_tables(document, (options or RenderOptions()).limit)
    if found is None:
        raise unsupported("Markdown", document)
    lines, tables = found
    write_markdown(lines, tables, file)


def write_markdown(lines: list[str], tables: list[Table], out: IO[str]) -> None:
    from ...safe_text import printable

    def cell(text: str) -> str:
        return printable(text).replace("|", "\\|")

    out.write("## moeprobe report\n\n")
    for line in lines:
        out.write(f"- {cell(line)}\n")
    for table in tables:
        out.write(f"\n### {cell(table.title)}\n\n")
        out.write("| " + " | ".join(cell(c) for c in table.columns) + " |\n")
        out.write("|" + "|".join("---" for _ in table.columns) + "|\n")
        for row in table.rows:
            out.write("| " + " | ".join(cell(c) for c in row) + " |\n")
        if table.note.strip():
            out.write(f"\n_{cell(table.note.strip())}_\n")
