from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"


@pytest.fixture
def good_trace(tmp_path: Path) -> Path:
    """A private copy of the committed version-1 trace, free to damage."""
    path = tmp_path / "good"
    shutil.copytree(DATA / "v1-good", path)
    return path


def run_cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("MOEPROBE_DEBUG", None)
    env["COLUMNS"] = "120"
    return env


PYTHON = sys.executable
