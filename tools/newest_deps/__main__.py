"""Command line of the newest-dependencies run (the package docstring says what it does)."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.utils import NormalizedName
from packaging.version import Version

from . import __doc__ as DOC
from . import index, overlay, plan
from .plan import Row

ROOT = Path(__file__).resolve().parents[2]
# make test's options (Makefile: pytest -q -n auto, and pyproject's addopts), the worker count CI's two cores give.
PYTEST = ["-q", "-n", "2"]


def main(argv: Sequence[str] | None = None) -> int:
    doc = DOC or ""
    parser = argparse.ArgumentParser(prog="python -m tools.newest_deps", description=doc.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    parser.add_argument("--lock", type=Path, default=ROOT / "requirements.lock", help="the locked versions (default: requirements.lock)")
    parser.add_argument("--venv", type=Path, default=ROOT / ".newest-venv", help="where the upgraded venv is built (default: .newest-venv)")
    parser.add_argument("--tests", nargs="+", default=[], metavar="PATH", help="test paths instead of the whole suite (CI gives none)")
    parser.add_argument("--pytest-args", default="", help="more pytest arguments, one shell-quoted string, e.g. \"-k 'not slow'\"")
    args = parser.parse_args(argv)
    start = time.monotonic()

    deps = plan.read_dependencies(ROOT / "pyproject.toml")
    locked = plan.read_lock(args.lock)
    try:
        served = index.served([d.name for d in deps])
    except index.IndexQueryError as exc:
        print(f"newest deps: FAILED: {exc}")
        return 2
    rows = plan.plan(deps, locked, served)
    print(plan.table(rows))
    _warn_unlocked(locked)
    chosen = plan.upgrades(rows)
    if not chosen:
        print(f"{plan.nothing_differs(rows)}: the locked run covered them ({_since(start)})")
        return 0

    names = ", ".join(row.dep.name for row in chosen)
    print(f"\n== newer than the lock: {names}; building {args.venv} over this environment", flush=True)
    env = overlay.create(args.venv)
    error = _install(env, deps, chosen, locked)
    if error:
        print(f"newest deps: FAILED: the newest {names} could not be installed: {error}")
        return 1
    own = overlay.own_packages(env)
    upgraded = ", ".join(f"{n} {v}" for n, v in own.items())
    _report(rows, chosen, overlay.versions_seen(env, [row.dep.name for row in chosen]), locked, own)
    if not own:
        print(f"newest deps: no release newer than the lock installs with the rest: the locked run covered them ({_since(start)})")
        return 0

    status, summary = overlay.pytest(env, [*PYTEST, *shlex.split(args.pytest_args), *args.tests], cwd=ROOT)
    if status != 0:
        print(f"newest deps: FAILED with {upgraded} upgraded: {summary} ({_since(start)})")
        return 1
    print(f"newest deps: passed with {upgraded} upgraded: {summary} ({_since(start)})")
    return 0


def _since(start: float) -> str:
    return f"{time.monotonic() - start:.0f} s"


def _install(env: overlay.Overlay, deps: Sequence[plan.Dependency], chosen: Sequence[Row], locked: Mapping[NormalizedName, Version]) -> str:
    """Install the chosen packages at their newest, everything else held at the lock; "" when done, else why not.

    Every tracked dependency is requested, so that pip resolves the chosen releases against all that require
    them (pytest-textual-snapshot pins syrupy, which caps pytest), not only against their own requirements.
    First exactly as planned: each chosen package ``==newest``, the rest constrained to the lock. When that does
    not install (a newest release capped by another package, or needing a newer version of one the lock pins)
    the second try lets pip pick the newest of each tracked package that installs, none below the lock, with
    only the held packages (torch) constrained and transitive ones moved only if needed; _report says what it
    picked. That second try always has a solution, the lock itself, so only pip or the index failing fails it."""
    names = {row.dep.name for row in chosen}
    newest = {row.dep.name: row.newest for row in chosen}
    asked = [dep.pin(v) if (v := newest.get(dep.name)) is not None else dep.requirement() for dep in deps]
    first = overlay.install(env, asked, [f"{n}=={v}" for n, v in locked.items() if n not in names], upgrade=False)
    if not first:
        return ""
    print(f"  the newest of each, as planned, does not install: {first}\n  trying the newest that installs, torch still held")
    held = [f"{n}=={v}" for n, v in locked.items() if n in plan.HELD]
    return overlay.install(env, [dep.at_least(locked.get(dep.name)) for dep in deps if dep.name not in plan.HELD], held, upgrade=True)


def _report(
    rows: Sequence[Row], chosen: Sequence[Row], seen: Mapping[NormalizedName, Version],
    locked: Mapping[NormalizedName, Version], own: Mapping[NormalizedName, Version],
) -> None:
    """What the run tests: what was installed over the lock, any newest that did not install, torch held."""
    print("installed over the lock: " + (", ".join(f"{n} {locked.get(n, '-')} -> {v}" for n, v in own.items()) or "nothing"))
    for row in chosen:
        if seen[row.dep.name] != row.newest:
            print(f"  {row.dep.name} {row.newest} does not install with the rest; tested at {seen[row.dep.name]}")
    for row in rows:
        if row.dep.name in plan.HELD:
            print(f"  {row.dep.name} stays {row.locked}: {row.note}", flush=True)


def _warn_unlocked(locked: Mapping[NormalizedName, Version]) -> None:
    """The run keeps every package it does not upgrade as this environment has it: say so when that is not
    the lock (a developer's older .venv), since the run is then not 'the lock plus the newest'."""
    off = []
    for name, want in locked.items():
        try:
            have: Version | None = Version(version(name))
        except PackageNotFoundError:
            have = None
        if have != want:
            off.append(f"{name} {have or 'missing'} (lock {want})")
    if off:
        print(f"warning: this environment differs from the lock; kept as installed: {', '.join(off)}")


if __name__ == "__main__":
    sys.exit(main())
