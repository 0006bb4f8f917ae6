"""How to spell ``moeprobe`` in a command we tell the user to run next, so that it works as printed.

``make demo`` runs ``.venv/bin/moeprobe`` from a shell whose PATH does not have ``.venv/bin``: a bare
``moeprobe inspect ...`` would then fail with "command not found".
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def moeprobe_command(
    *, prefix: str | None = None, path_env: str | None = None, cwd: str | os.PathLike[str] | None = None,
    python: str | None = None,
) -> str:
    """``moeprobe`` when the one on PATH is this installation's; else the script's path (relative to ``cwd``
    when inside it, e.g. ``.venv/bin/moeprobe``); else ``PYTHON -m moeprobe`` (running from a source tree).

    The arguments default to this process (``sys.prefix``, ``$PATH``, the working directory, ``sys.executable``).
    """
    prefix = sys.prefix if prefix is None else prefix
    path_env = os.environ.get("PATH", "") if path_env is None else path_env
    here = Path(os.getcwd() if cwd is None else cwd)
    bin_dir = Path(prefix) / ("Scripts" if os.name == "nt" else "bin")
    script = bin_dir / "moeprobe"
    if script.is_file() and os.access(script, os.X_OK):
        on_path = shutil.which("moeprobe", path=path_env)
        if on_path is not None and _same(Path(on_path), script):
            return "moeprobe"
        return _shown(script, here)
    return f"{_shown(Path(python or sys.executable), here)} -m moeprobe"


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or os.path.samefile(a, b)
    except OSError:
        return False


def shown_path(path: Path, cwd: Path | None = None) -> str:
    """``path`` relative to ``cwd`` (default: the working directory) when below it, else absolute."""
    return _shown(path, Path(os.getcwd()) if cwd is None else cwd)


def _shown(path: Path, cwd: Path) -> str:
    """``path`` relative to ``cwd`` when below it (``.venv/bin/moeprobe``), else absolute."""
    absolute = path if path.is_absolute() else cwd / path
    try:
        return str(absolute.relative_to(cwd))
    except ValueError:
        return str(absolute)
