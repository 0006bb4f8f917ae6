"""What the package index serves: ``pip index versions`` per package, through pip's own configuration.

pip, not an HTTP client of our own, so that the answer is the one ``pip install`` would act on: the same
index, extra indexes and find-links (``pip config list``), wheels this interpreter can install, no
pre-releases. ``pip index versions`` lists releases without applying pip's constraint files; the torch cap in
/etc/xdg/pip/constraints.txt is why plan.HELD keeps torch at the lock.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import InvalidVersion, Version

PREFIX = "Available versions:"


class IndexQueryError(RuntimeError):
    """The index did not say what it serves for a package: the run cannot claim to test its newest."""


def parse_versions(output: str) -> list[Version]:
    """The versions on pip's ``Available versions: a, b, ...`` line (names it cannot parse skipped)."""
    for line in output.splitlines():
        if line.startswith(PREFIX):
            versions = []
            for text in line[len(PREFIX):].split(","):
                try:
                    versions.append(Version(text.strip()))
                except InvalidVersion:
                    continue
            return versions
    return []


def served_versions(
    name: str, *, python: str = sys.executable, pip_args: Sequence[str] = (), env: Mapping[str, str] | None = None
) -> list[Version]:
    result = subprocess.run(
        [python, "-m", "pip", "index", "versions", "--disable-pip-version-check", *pip_args, name],
        capture_output=True, text=True, env=dict(os.environ if env is None else env), timeout=300,
    )
    versions = parse_versions(result.stdout)
    if result.returncode != 0 or not versions:
        said = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        raise IndexQueryError(f"the index did not list releases of {name}: {said}")
    return versions


def served(
    names: Sequence[str], *, workers: int = 2, python: str = sys.executable, pip_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> dict[NormalizedName, list[Version]]:
    """Every package's served releases; one pip process per package (about a second each, mostly pip's start),
    ``workers`` at a time: two keep a 2-core CI machine busy without starving it."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        found = pool.map(lambda n: served_versions(n, python=python, pip_args=pip_args, env=env), names)
        return {canonicalize_name(n): v for n, v in zip(names, found, strict=True)}
