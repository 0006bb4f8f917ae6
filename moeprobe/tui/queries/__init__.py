"""What each screen shows, computed from a ``Trace`` (no Textual here): run in worker threads, tested directly.

Metrics come from ``moeprobe.analysis`` (load, latency, specialization, co-activation) so the TUI and the report
agree; the few views the analysis layer has no query for (recent per-step MaxVio, load per step window, one
sequence's tokens) are SQL here.
"""
