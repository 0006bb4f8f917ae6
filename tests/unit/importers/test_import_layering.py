"""Importers sit on ``traces``: a vLLM/Megatron import or a capture never loads torch, DuckDB or Textual; only an
SGLang ``.pt`` dump loads torch, and then only when one is read."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests import engine_formats as ef
from tests.conftest import PYTHON, run_cli_env


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([PYTHON, "-c", code + "\nimport sys; print(' '.join(sys.modules))"], capture_output=True,
                         text=True, env=run_cli_env(), check=True)
    return set(out.stdout.split())


def test_importer_modules_load_no_heavy_dependency() -> None:
    loaded = _modules_after("import moeprobe.importers.vllm, moeprobe.importers.sglang, moeprobe.importers.megatron, "
                            "moeprobe.importers.capture, moeprobe.cli.import_, moeprobe.cli.capture_server")
    assert not {"torch", "duckdb", "textual"} & loaded


def test_a_vllm_import_runs_without_torch(tmp_path: Path) -> None:
    rows = ef.routing("x", 6, 2, 2, 8)
    (tmp_path / "r.json").write_text(json.dumps(ef.vllm_completion("c", [1, 2, 3], [4, 5, 6, 7], rows, experts=8)))
    code = ("from moeprobe.cli.main import main\n"
            f"assert main(['import', 'vllm', {str(tmp_path / 'r.json')!r}, '-o', {str(tmp_path / 't')!r}, "
            "'--num-experts', '8']) == 0")
    loaded = _modules_after(code)
    assert not {"torch", "duckdb", "textual"} & loaded
