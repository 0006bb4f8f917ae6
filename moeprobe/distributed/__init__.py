"""Analysis of one trace on an existing distributed engine (Dask): per-shard partial aggregates, exact merges.

``moeprobe report TRACE --engine dask --workers N`` (or ``--scheduler ADDRESS`` for a running cluster) gives the
same report as ``moeprobe report TRACE``: see ``partials`` for what runs where, docs/scale.md for why Dask. Sits
above ``analysis``; nothing below imports it. Dask is an optional extra (``pip install 'moeprobe[dask]'``).
"""

from .engine import DistributedUnavailableError, prepare

__all__ = ["DistributedUnavailableError", "prepare"]
