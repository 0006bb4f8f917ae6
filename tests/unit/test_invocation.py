"""The ``moeprobe`` spelling in "next:" hints works as printed: bare when on PATH, the venv's script when not."""

from __future__ import annotations

import os
from pathlib import Path

from moeprobe.cli.invocation import moeprobe_command


def _venv(root: Path) -> Path:
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    script = bin_dir / "moeprobe"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    return root / ".venv"


def test_bare_name_when_this_installation_is_on_path(tmp_path: Path) -> None:
    venv = _venv(tmp_path)
    got = moeprobe_command(prefix=str(venv), path_env=os.pathsep.join(["/usr/bin", str(venv / "bin")]), cwd=tmp_path)
    assert got == "moeprobe"


def test_venv_script_relative_to_the_working_directory_when_not_on_path(tmp_path: Path) -> None:
    venv = _venv(tmp_path)
    assert moeprobe_command(prefix=str(venv), path_env="/usr/bin", cwd=tmp_path) == os.path.join(".venv", "bin", "moeprobe")


def test_absolute_script_path_from_elsewhere(tmp_path: Path) -> None:
    venv = _venv(tmp_path / "project")
    (tmp_path / "elsewhere").mkdir()
    got = moeprobe_command(prefix=str(venv), path_env="", cwd=tmp_path / "elsewhere")
    assert got == str(venv / "bin" / "moeprobe")


def test_another_moeprobe_on_path_does_not_count(tmp_path: Path) -> None:
    venv = _venv(tmp_path / "a")
    other = _venv(tmp_path / "b")
    got = moeprobe_command(prefix=str(venv), path_env=str(other / "bin"), cwd=tmp_path / "a")
    assert got == os.path.join(".venv", "bin", "moeprobe")


def test_python_dash_m_without_an_installed_script(tmp_path: Path) -> None:
    got = moeprobe_command(prefix=str(tmp_path), path_env="", cwd=tmp_path, python="/opt/py/bin/python3")
    assert got == "/opt/py/bin/python3 -m moeprobe"
