"""The balancing lab's functions add only numpy to what ``import moeprobe`` loads: no torch or DuckDB for a
notebook user, and no pyarrow beyond what the package itself pulls in."""

from __future__ import annotations

import subprocess
import sys


def test_simulate_imports_numpy_only() -> None:
    code = (
        "import sys, moeprobe\n"
        "before = set(sys.modules)\n"
        "import moeprobe.simulate, moeprobe.simulate.strategies, moeprobe.simulate.deployment\n"
        "added = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "heavy = ('torch', 'duckdb', 'pyarrow', 'transformers', 'textual', 'rich')\n"
        "print(','.join(sorted(m for m in heavy if m in added or (m != 'pyarrow' and m in sys.modules))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
