"""The environment of the newest run: a venv of its own holding only the upgraded packages, layered over the
locked environment that ``make test`` installed.

Why layered, not a second full install: the locked environment is already there (torch alone is about a GB),
and reinstalling everything would add minutes to a CI that must stay under 20. A ``.pth`` file in the new venv
adds the locked site-packages after its own (``site.addsitedir``, so the locked side's ``.pth`` files, the
editable moeprobe among them, work too): pip in the new venv sees the locked packages as installed, resolves
the upgrades against them, and installs only what changes; Python finds the new venv's copy first. Unlike
``pip install --target`` (tools/compat_matrix.py), pip checks the upgraded packages' dependencies against the
rest of the environment.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

PTH = "_newest_deps_locked_base.pth"
PIP = ["-m", "pip", "--disable-pip-version-check"]


@dataclass(frozen=True)
class Overlay:
    root: Path
    python: str
    site: Path


def create(root: Path, base_python: str = sys.executable) -> Overlay:
    """A fresh venv at ``root`` over the site-packages of ``base_python``'s environment.

    Made without pip: pip (and setuptools, which torch requires at >= 77) come from the locked side, where a
    venv's own copies (setuptools 65 with Python 3.11) would shadow them."""
    if root.exists():
        shutil.rmtree(root)
    subprocess.run([base_python, "-m", "venv", "--without-pip", str(root)], check=True)
    python = str(root / "bin" / "python")
    site = Path(_ask(python, "import sysconfig; print(sysconfig.get_path('purelib'))"))
    paths = "import sysconfig; print(sysconfig.get_path('purelib')); print(sysconfig.get_path('platlib'))"
    bases = dict.fromkeys(_ask(base_python, paths).splitlines())
    (site / PTH).write_text("".join(f"import site; site.addsitedir({b!r})\n" for b in bases))
    return Overlay(root, python, site)


def _ask(python: str, code: str) -> str:
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def own_packages(overlay: Overlay) -> dict[NormalizedName, Version]:
    """What the overlay venv itself holds: the packages installed over the locked ones."""
    out = subprocess.run(
        [overlay.python, *PIP, "list", "--path", str(overlay.site), "--format", "json"],
        capture_output=True, text=True, check=True,
    ).stdout
    return {canonicalize_name(d["name"]): Version(d["version"]) for d in json.loads(out)}


def versions_seen(overlay: Overlay, names: Iterable[str]) -> dict[NormalizedName, Version]:
    """The version of each package that the overlay's Python imports (its own copy first, else the lock's)."""
    code = (
        "import json, sys\nfrom importlib.metadata import version\n"
        "print(json.dumps({n: version(n) for n in sys.argv[1:]}))"
    )
    out = subprocess.run([overlay.python, "-c", code, *names], capture_output=True, text=True, check=True).stdout
    return {canonicalize_name(n): Version(v) for n, v in json.loads(out).items()}


def install(overlay: Overlay, requirements: Sequence[str], constraints: Sequence[str], *, upgrade: bool) -> str:
    """``pip install`` the requirements into the overlay under the given constraint lines (pip's global
    constraints, /etc/xdg/pip/constraints.txt, apply as well); "" when the environment is then consistent,
    else pip's reason.

    ``pip check`` after it: pip resolves the requested packages but only warns (exit 0) when an installed package
    it was not asked about no longer fits, e.g. syrupy 4.8.0 (pinned by pytest-textual-snapshot) under pytest 9."""
    path = overlay.root / "constraints.txt"
    path.write_text("".join(f"{line}\n" for line in constraints))
    args = [overlay.python, *PIP, "install", "-c", str(path), *(["--upgrade"] if upgrade else []), *requirements]
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        return _reason(result)
    check = subprocess.run([overlay.python, *PIP, "check"], capture_output=True, text=True)
    return "" if check.returncode == 0 else "; ".join(check.stdout.strip().splitlines())


def _reason(result: subprocess.CompletedProcess[str]) -> str:
    """pip's reason in one line: the lines under "The conflict is caused by:" (on stdout, which is why pip runs
    without --quiet) when it gives them, else its last error line."""
    out = [line.strip() for line in result.stdout.splitlines()]
    if "The conflict is caused by:" in out:
        cause = out[out.index("The conflict is caused by:") + 1:]
        return "; ".join(cause[: cause.index("")] if "" in cause else cause)
    errors = [line.strip() for line in result.stderr.splitlines() if line.strip() and not line.startswith("WARNING")]
    return errors[-1].removeprefix("ERROR: ") if errors else f"pip exited {result.returncode}"


SUMMARY = re.compile(r"\d+ (passed|failed|errors?|skipped|deselected)|no tests ran")


def pytest(overlay: Overlay, args: Sequence[str], cwd: Path, env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """Run pytest in the overlay, its output streamed; returns the exit status and pytest's summary line."""
    proc = subprocess.Popen(
        [overlay.python, "-m", "pytest", *args], cwd=cwd, env=dict(os.environ if env is None else env),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    summary = "no pytest summary line"
    assert proc.stdout is not None
    for line in proc.stdout:
        print(line, end="", flush=True)
        if SUMMARY.search(line):
            summary = line.strip().strip("= ")
    return proc.wait(), summary
