"""``moeprobe record`` options that an unmodified script cannot set itself: --tag, --routers, --max-queue-mb,
--flush-interval; the job's exit status passed through when nothing was recorded; a job Python without moeprobe."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import moeprobe
from tests.conftest import PYTHON, ROOT, run_cli_env

MIXTRAL_JOB = """
import sys, torch
sys.path.insert(0, {root!r})
from tests.tiny_models import build
model = build("mixtral")
ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(0))
model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
"""

CUSTOM_JOB = """
import sys, torch
sys.path.insert(0, {root!r})
from tests.integration.test_discovery import TinyLM
torch.manual_seed(0)
model = TinyLM().eval()
with torch.no_grad():
    model(torch.randint(0, 50, (2, 6)))
    model(torch.randint(0, 50, (2, 1)))
"""

ROUTERS_FILE = """
import moeprobe

ROUTERS = {{"TinyRouter": moeprobe.RouterSpec(indices="chosen", weights="gates", num_experts=4, top_k=2)}}
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text.format(root=str(ROOT))))
    return path


def _record(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "moeprobe", "record", "-o", str(tmp_path / "trace"), *args],
        capture_output=True, text=True, env=env or run_cli_env(), timeout=180,
    )


def test_tag_queue_and_flush_options_reach_the_trace(tmp_path: Path) -> None:
    job = _write(tmp_path, "job.py", MIXTRAL_JOB)
    result = _record(tmp_path, "--tag", "domain=code", "--tag", "run=7", "--max-queue-mb", "64",
                     "--flush-interval", "0.5", "--", PYTHON, str(job))
    assert result.returncode == 0, result.stderr
    with moeprobe.open_trace(tmp_path / "trace") as trace:
        options = trace.manifest["options"]
        assert options["max_queue_mb"] == 64 and options["flush_interval_s"] == 0.5
        sequences = trace.sql("select count(distinct sequence) from routing").column(0)[0].as_py()
        tags = trace.sql("select key, value, count(*) n from tags group by all order by key").to_pylist()
    assert sequences >= 2  # every sequence the job ran carries both tags
    assert tags == [{"key": "domain", "value": "code", "n": sequences}, {"key": "run", "value": "7", "n": sequences}]


def test_routers_file_records_a_custom_pytorch_model(tmp_path: Path) -> None:
    job = _write(tmp_path, "job.py", CUSTOM_JOB)
    routers = _write(tmp_path, "my_routers.py", ROUTERS_FILE)
    result = _record(tmp_path, "--routers", str(routers), "--", PYTHON, str(job))
    assert result.returncode == 0, result.stderr
    assert "recording TinyLM (2 MoE layers)" in result.stderr
    with moeprobe.open_trace(tmp_path / "trace") as trace:
        assert [layer["name"] for layer in trace.layers] == ["blocks.0", "blocks.1"]
        # both forward calls, the first included: (12 + 2 tokens) x 2 layers x top-2
        assert trace.routing().num_rows == (12 + 2) * 2 * 2
        assert trace.manifest["options"]["routers"]["TinyRouter"]["indices"] == "chosen"


def test_routers_as_a_module_name(tmp_path: Path) -> None:
    job = _write(tmp_path, "job.py", CUSTOM_JOB)
    _write(tmp_path, "my_routers.py", ROUTERS_FILE)
    env = run_cli_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    result = _record(tmp_path, "--routers", "my_routers", "--", PYTHON, str(job), env=env)
    assert result.returncode == 0, result.stderr
    assert moeprobe.open_trace(tmp_path / "trace").routing().num_rows == 56


def test_routers_file_without_routers_is_named_and_the_job_still_runs(tmp_path: Path) -> None:
    job = _write(tmp_path, "job.py", CUSTOM_JOB + "\nprint('job done')\n")
    routers = _write(tmp_path, "empty.py", "X = 1\n")
    result = _record(tmp_path, "--routers", str(routers), "--", PYTHON, str(job))
    assert "job done" in result.stdout
    assert "defines no ROUTERS dict" in result.stderr
    assert result.returncode == 0  # the job's status; nothing was recorded, which is a warning


@pytest.mark.parametrize(
    "args, message",
    [
        (["--routers", "/no/such/routers.py"], "no such file"),
        (["--routers", "not a module"], "not a .py file or a module name"),
        (["--tag", "domain"], "expected KEY=VALUE"),
        (["--max-queue-mb", "0"], "--max-queue-mb must be positive"),
    ],
)
def test_bad_option_values_are_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    result = _record(tmp_path, *args, "--", PYTHON, "-c", "pass")
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_job_that_succeeds_without_a_moe_model_keeps_its_status_and_warns(tmp_path: Path) -> None:
    result = _record(tmp_path, "--", PYTHON, "-c", "print('dense job')")
    assert result.returncode == 0
    assert "dense job" in result.stdout
    assert result.stderr.strip().splitlines()[-1].startswith("moeprobe record: warning: no trace was written")
    failing = _record(tmp_path, "--", PYTHON, "-c", "raise SystemExit(4)")
    assert failing.returncode == 4


def _python_without_moeprobe() -> str | None:
    """The interpreter the test venv was made from: it has no moeprobe (that lives in the venv)."""
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    if not base.exists():
        return None
    check = subprocess.run([str(base), "-c", "import moeprobe"], capture_output=True, env={"PATH": os.environ["PATH"]}, timeout=60)
    return None if check.returncode == 0 else str(base)


def test_job_python_without_moeprobe_is_named(tmp_path: Path) -> None:
    other = _python_without_moeprobe()
    if other is None:
        pytest.skip("no Python without moeprobe next to the test interpreter")
    # The job's interpreter keeps only the first PYTHONPATH entry, record's start-up hook, and so cannot
    # import moeprobe: what happens with `moeprobe record -- python3 job.py` and moeprobe in a venv.
    job = _write(tmp_path, "job.py", "print('job ran')\n")
    shell = f'PYTHONPATH="${{PYTHONPATH%%{os.pathsep}*}}" exec {other} {job}'
    result = _record(tmp_path, "--", "sh", "-c", shell)
    assert "job ran" in result.stdout
    assert f"moeprobe: {other} cannot import moeprobe, so nothing is recorded: run the job with {PYTHON}" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("moeprobe record: no trace was written: the job's Python") and f"run the job with {PYTHON}" in last
