"""``moeprobe record -- python job.py`` on unmodified scripts, and ``moeprobe inspect``, in subprocesses."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest

import moeprobe
from tests.conftest import PYTHON, ROOT, run_cli_env

JOB = """
import os, sys, time, torch
sys.path.insert(0, {root!r})
from tests.tiny_models import build
model = build("mixtral")
ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(0))
out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
print("job generated", tuple(out.shape))
{tail}
"""

# A job's tail that waits until the recorder's writer has written everything generated so far, then dies by
# SIGKILL: waiting on the writer (Probe.flush), not on a sleep that a loaded machine can outrun.
FLUSH_THEN_KILL = """
from moeprobe.hooks import autoattach
assert all(probe.flush(timeout=60) for probe in autoattach._recorder.probes)
os.kill(os.getpid(), 9)
"""


def _job(tmp_path: Path, tail: str = "") -> Path:
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(JOB.format(root=str(ROOT), tail=tail)))
    return path


def _record(tmp_path: Path, job: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "moeprobe", "record", "-o", str(tmp_path / "trace"), *extra, "--", PYTHON, str(job)],
        capture_output=True, text=True, env=run_cli_env(), timeout=180,
    )


# A job that sets up logging for itself before its model runs: a root handler at INFO (which would show each of
# moeprobe's messages a second time) and dictConfig's default disable_existing_loggers (which silences every
# logger that exists when it runs, the recorder's start-up module's among them if it held one).
LOGGING_PRELUDE = """
import logging, logging.config
logging.config.dictConfig({"version": 1, "handlers": {"h": {"class": "logging.StreamHandler"}},
                           "root": {"level": "INFO", "handlers": ["h"]}})
logging.getLogger("job").info("job logging is set up")
"""


def test_the_job_shows_moeprobe_messages_once_whatever_logging_it_configures(tmp_path: Path) -> None:
    """Capture logs; in the job's process the recorder shows its messages on stderr as the message alone, once,
    as print() did: the job's own logging configuration neither doubles nor silences them."""
    job = _job(tmp_path)
    job.write_text(job.read_text().replace("from tests.tiny_models import build\n",
                                           "from tests.tiny_models import build\n" + LOGGING_PRELUDE, 1))
    result = _record(tmp_path, job)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert "job logging is set up" in lines  # the job's own handler works as the job configured it
    # (the job's handler formats as the message alone too: a second copy would be a second identical line)
    said = [line for line in lines if "recording" in line]
    assert said == [f"moeprobe: recording MixtralForCausalLM (2 MoE layers) to {tmp_path / 'trace'}"], result.stderr


def test_record_wraps_an_unmodified_script_and_inspect_reads_it(tmp_path: Path) -> None:
    result = _record(tmp_path, _job(tmp_path), "--logits")
    assert result.returncode == 0, result.stderr
    assert "job generated (2, 9)" in result.stdout
    assert "recording MixtralForCausalLM (2 MoE layers)" in result.stderr
    trace = moeprobe.open_trace(tmp_path / "trace")
    assert trace.status == "complete"
    # 4 forward calls: prefill of 2x5 tokens, then 3 decode steps of 2 tokens; 2 layers, top-2.
    assert trace.manifest["counters"]["decisions"] == (10 + 3 * 2) * 2 * 2
    assert trace.sql("select count(*) from scores").column(0)[0].as_py() == (10 + 3 * 2) * 2

    inspect = subprocess.run([PYTHON, "-m", "moeprobe", "inspect", str(tmp_path / "trace"), "--json"], capture_output=True, text=True, env=run_cli_env(), timeout=60)
    assert inspect.returncode == 0, inspect.stderr
    summary = json.loads(inspect.stdout)
    assert summary["manifest"]["status"] == "complete"
    assert summary["tables"]["routing"]["rows"] == 64
    assert summary["manifest"]["model"]["family"] == "mixtral"
    text = subprocess.run([PYTHON, "-m", "moeprobe", "inspect", str(tmp_path / "trace")], capture_output=True, text=True, env=run_cli_env(), timeout=60)
    assert text.returncode == 0
    assert "complete" in text.stdout and "model.layers.1.mlp" in text.stdout and "dropped   none" in text.stdout


def test_job_that_raises_leaves_an_aborted_readable_trace(tmp_path: Path) -> None:
    result = _record(tmp_path, _job(tmp_path, "raise SystemError('job failed after generating')"))
    assert result.returncode == 1
    assert "SystemError: job failed after generating" in result.stderr  # the job's own traceback, untouched
    trace = moeprobe.open_trace(tmp_path / "trace")
    assert trace.status == "aborted"
    assert trace.routing().num_rows == 64


def test_killed_job_keeps_its_flushed_data_and_is_marked_aborted(tmp_path: Path) -> None:
    tail = FLUSH_THEN_KILL
    result = _record(tmp_path, _job(tmp_path, tail), "--flush-interval", "0.2")
    assert result.returncode == 128 + 9
    trace = moeprobe.open_trace(tmp_path / "trace")
    assert trace.status == "aborted"
    assert "killed by SIGKILL" in trace.manifest["shards"][0]["error"]
    assert trace.routing().num_rows == 64  # everything generated before the kill had been flushed


def test_exit_status_of_the_job_is_passed_through(tmp_path: Path) -> None:
    result = _record(tmp_path, _job(tmp_path, "sys.exit(3)"))
    assert result.returncode == 3
    assert moeprobe.open_trace(tmp_path / "trace").status == "complete"


def test_job_without_moe_model_warns_in_one_line_and_keeps_the_job_status(tmp_path: Path) -> None:
    job = tmp_path / "dense.py"
    job.write_text("import torch\nprint(torch.nn.Linear(2, 2)(torch.ones(1, 2)).shape)\n")
    result = _record(tmp_path, job)
    assert result.returncode == 0
    assert result.stderr.strip().splitlines()[-1].startswith("moeprobe record: warning: no trace was written")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["record", "-o", "{tmp}/t"], 2, "no command to run"),
        (["record", "-o", "{tmp}/t", "--", "/no/such/program"], 2, "cannot run '/no/such/program'"),
        (["record", "-o", "{tmp}/existing", "--", "true"], 1, "already exists"),
        (["frobnicate"], 2, "unknown command"),
    ],
)
def test_record_bad_input(tmp_path: Path, argv: list[str], code: int, message: str) -> None:
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "x").write_text("")
    result = subprocess.run([PYTHON, "-m", "moeprobe", *[a.format(tmp=tmp_path) for a in argv]], capture_output=True, text=True, env=run_cli_env(), timeout=60)
    assert result.returncode == code
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_encoder_decoder_found_at_its_first_call_records_that_call_as_one_step(tmp_path: Path) -> None:
    """The recorder attaches inside the model's own first call; with several token stacks the model is the step's
    entry, and its wrapper was looked up before it existed: the probe joins the call in progress (Probe.join_call),
    so a first call that runs the encoder and the decoder is one step holding both stacks' layers, like the next."""
    job = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from tests.tiny_models import build
        model = build("switch_transformers")
        ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for _ in range(2):
                model(input_ids=ids, decoder_input_ids=ids[:, :3])
        print("job ran")
    """)
    (tmp_path / "job.py").write_text(job)
    result = _record(tmp_path, tmp_path / "job.py")
    assert result.returncode == 0, result.stderr
    trace = moeprobe.open_trace(tmp_path / "trace")
    assert trace.status == "complete"
    layers = len(trace.manifest["layers"])
    steps = trace.sql("select step, count(distinct layer) n from routing group by step order by step").to_pylist()
    assert steps == [{"step": 0, "n": layers}, {"step": 1, "n": layers}]  # encoder and decoder layers, each call
