"""Three SIGKILLs of a recording job, from the stress drill (``python -m stress.kill_recording`` runs fifty).

Each killed trace must open, report, inspect and browse; say that its writer vanished (``stale`` when the job
recorded itself, ``aborted`` once ``moeprobe record`` has closed it); and have lost no more than about one flush
interval of steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from stress.kill_recording import check_round, run_round

FLUSH_S = 0.3
# The writer polls every 50 ms and then converts and writes; on a shared 2-core machine that takes up to a
# few hundred ms more. The stress script prints the worst loss it actually measures.
SLACK_S = 1.0


@pytest.mark.parametrize(
    "mode, delay_s, tui",
    [("direct", 0.4, False), ("direct", 1.6, True), ("cli", 1.2, True)],
    ids=["direct-early", "direct-late", "record-cli"],
)
def test_sigkill_leaves_a_usable_trace(tmp_path: Path, mode: str, delay_s: float, tui: bool) -> None:
    result = run_round(tmp_path, mode, delay_s, FLUSH_S, tui=tui)
    assert check_round(result, FLUSH_S, SLACK_S) == []
    assert result.report_rc == 0 and result.inspect_rc == 0
    if delay_s > 1:  # the early kill may land before the first step completes; the late ones have data
        assert result.completed >= 1
