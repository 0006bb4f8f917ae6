"""DuckDB views and queries over traces. DuckDB is imported lazily, inside the functions that need it.

One module per analysis (``load``, ``placement``, ``specialization``, ``repetition``, ``coactivation``,
``router``, ``latency``), each SQL over the views with the formulas finished in ``stats``; ``Trace`` in
``session`` is the thin facade over them, and ``report_json`` builds the report object.
"""

from .filters import FilterError, Filters

__all__ = ["FilterError", "Filters"]
