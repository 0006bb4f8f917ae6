"""Live metrics: a Prometheus / OpenMetrics endpoint over a recording or a trace on disk.

``counts`` keeps cumulative and windowed numbers in numpy from the tables the writer produces (or reads back);
``collector`` turns them into metric families with bounded labels; ``endpoint`` serves them over HTTP on
127.0.0.1; ``follow`` feeds counts from a trace directory as it grows (``moeprobe serve``).

Nothing here imports torch, Textual or DuckDB at import time: the recording process only adds numpy work on
the writer thread, and ``prometheus_client`` is imported when an endpoint starts.
"""
