"""What the newest-dependencies run tests: the lock and pyproject read, compared with what the index serves.

Pure functions over files and version lists (no pip, no network), so that the choice of what to upgrade is
tested directly (tests/unit/test_newest_deps_plan.py).
"""

from __future__ import annotations

import enum
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

# Held at the lock whatever the index serves. torch: the only CPU wheel on the index is the locked one; newer
# releases are CUDA builds of several GB (and /etc/xdg/pip/constraints.txt caps torch at 2.14.1), too heavy for
# a CI run on a 2-core machine with nothing installed. docs/compatibility.md says the same.
HELD: Mapping[str, str] = {
    "torch": "held at the lock: newer torch releases on the index are multi-GB CUDA builds (the CPU wheel is the "
    "locked one; /etc/xdg/pip/constraints.txt caps torch at 2.14.1), not installed in CI",
}

# Not declared in pyproject, but imported by moeprobe itself (tui/decoding.py, traces/storage.py), so a new
# release of them can break us as directly as one of a declared dependency. Their newest may be outside what
# the packages that require them allow: then the install falls back to the newest that fits (see overlay.py).
TRANSITIVE: tuple[str, ...] = ("tokenizers", "huggingface-hub", "fsspec")


class Action(enum.Enum):
    UPGRADE = "yes: upgraded to the newest"
    SAME = "no: the locked run covers it"
    HELD = "no: held"


@dataclass(frozen=True)
class Dependency:
    """A package the run tracks: its name, the extras it is installed with, what pyproject allows."""

    name: NormalizedName
    extras: frozenset[str]
    specifier: SpecifierSet
    transitive: bool = False

    def requirement(self) -> str:
        """As pyproject asks for it (``moto[server]>=5``)."""
        return f"{self._named()}{self.specifier}"

    def pin(self, version: Version) -> str:
        """The requirement that installs exactly ``version``, with the extras pyproject asks for."""
        return f"{self._named()}=={version}"

    def at_least(self, version: Version | None) -> str:
        """What pyproject allows, never below ``version`` (its public part: ``>=2.13.0+cpu`` is no specifier)."""
        floor = SpecifierSet(f">={version.public}") if version is not None else SpecifierSet()
        return f"{self._named()}{self.specifier & floor}"

    def _named(self) -> str:
        return f"{self.name}[{','.join(sorted(self.extras))}]" if self.extras else self.name


@dataclass(frozen=True)
class Row:
    dep: Dependency
    locked: Version | None
    newest: Version | None
    action: Action
    note: str = ""


def read_lock(path: Path) -> dict[NormalizedName, Version]:
    """``name==version`` lines of a pip-freeze lock; comments and blank lines skipped, anything else refused
    (a line we cannot read would silently drop a package from the comparison)."""
    locked: dict[NormalizedName, Version] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        pins = list(req.specifier)
        if len(pins) != 1 or pins[0].operator != "==":
            raise ValueError(f"{path}:{number}: not a 'name==version' pin: {raw!r}")
        locked[canonicalize_name(req.name)] = Version(pins[0].version)
    return locked


def read_dependencies(pyproject: Path, transitive: Iterable[str] = TRANSITIVE) -> list[Dependency]:
    """Every direct dependency (the required ones and those of every extra, dev included), one entry per
    package with the specifiers of all its mentions combined, then the tracked transitive ones."""
    project = tomllib.loads(pyproject.read_text())["project"]
    lines: list[str] = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        lines.extend(extra)
    merged: dict[NormalizedName, Dependency] = {}
    for line in lines:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        seen = merged.get(name)
        if seen is None:
            merged[name] = Dependency(name, frozenset(req.extras), req.specifier)
        else:
            merged[name] = Dependency(name, seen.extras | req.extras, seen.specifier & req.specifier)
    for raw in transitive:
        name = canonicalize_name(raw)
        merged.setdefault(name, Dependency(name, frozenset(), SpecifierSet(), transitive=True))
    return list(merged.values())


def newest_allowed(served: Sequence[Version], specifier: SpecifierSet) -> Version | None:
    """The newest served release that pyproject allows (transformers>=5.0,<6 never picks a 6.x)."""
    allowed = [v for v in served if specifier.contains(v, prereleases=False)]
    return max(allowed, default=None)


def plan(
    deps: Sequence[Dependency],
    locked: Mapping[NormalizedName, Version],
    served: Mapping[NormalizedName, Sequence[Version]],
    held: Mapping[str, str] = HELD,
) -> list[Row]:
    """One row per dependency: upgrade it when the newest allowed release is newer than the locked one.

    Versions compare without their local part, so ``2.13.0+cpu`` in the lock is the ``2.13.0`` release."""
    rows = []
    for dep in deps:
        lock = locked.get(dep.name)
        newest = newest_allowed(served.get(dep.name, ()), dep.specifier)
        if dep.name in held:
            rows.append(Row(dep, lock, newest, Action.HELD, held[dep.name]))
        elif newest is None:
            rows.append(Row(dep, lock, None, Action.SAME, f"no served release matches '{dep.specifier}'"))
        elif lock is None:
            rows.append(Row(dep, None, newest, Action.UPGRADE, "not in the lock"))
        elif Version(newest.public) > Version(lock.public):
            rows.append(Row(dep, lock, newest, Action.UPGRADE))
        else:
            note = "the lock is newer than what is served" if Version(newest.public) < Version(lock.public) else ""
            rows.append(Row(dep, lock, newest, Action.SAME, note))
    return rows


def upgrades(rows: Iterable[Row]) -> list[Row]:
    return [row for row in rows if row.action is Action.UPGRADE]


def table(rows: Sequence[Row]) -> str:
    """Plain aligned columns (CI logs are read as text): package, locked, newest, tested at its newest."""
    cells = [("package", "locked", "newest", "tested at its newest")]
    for row in rows:
        name = f"{row.dep.name} (transitive)" if row.dep.transitive else row.dep.name
        tested = f"{row.action.value} ({row.note})" if row.note else row.action.value
        cells.append((name, str(row.locked or "-"), str(row.newest or "-"), tested))
    widths = [max(len(cell[i]) for cell in cells) for i in range(3)]
    return "\n".join(
        "  ".join([*(cell[i].ljust(widths[i]) for i in range(3)), cell[3]]).rstrip() for cell in cells
    )


def nothing_differs(rows: Sequence[Row]) -> str:
    """The one line printed when the locked run already tested today's newest releases (held ones named)."""
    held = "".join(
        f"; {row.dep.name} held at the locked {row.locked} (newest served {row.newest or '-'}, not tested: see "
        "docs/compatibility.md)" for row in rows if row.action is Action.HELD
    )
    return f"newest deps: the index serves nothing newer than the lock ({len(rows)} packages checked){held}"
