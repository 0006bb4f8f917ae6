"""The one error an importer raises for bad input: a file that is not what its engine writes."""

from __future__ import annotations

from ..traces.errors import TraceError


class ImportInputError(TraceError):
    """An input file cannot be imported; the message names the file and what is wrong with it (one line).

    A ``TraceError`` so that the CLI prints it as one line with exit status 1, like a damaged trace.
    """
