"""tools/newest_deps: the lock and pyproject as read, what the run upgrades (torch held), what it prints when
nothing differs, and what a real (local) index query returns."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from tools.newest_deps import index, plan
from tools.newest_deps.plan import Action

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"
PYPROJECT = ROOT / "pyproject.toml"


def _served_as_locked() -> dict[str, list[Version]]:
    """What an index serving exactly the lock would list."""
    return {name: [version] for name, version in plan.read_lock(LOCK).items()}


def _row(rows: list[plan.Row], name: str) -> plan.Row:
    return next(row for row in rows if row.dep.name == name)


def test_the_lock_is_read_with_normalized_names_and_local_versions() -> None:
    locked = plan.read_lock(LOCK)
    assert locked["torch"] == Version("2.13.0+cpu")
    assert "prometheus-client" in locked and "prometheus_client" not in locked
    assert {"numpy", "pyarrow", "duckdb", "textual", "pytest"} <= set(locked)


def test_a_lock_line_that_is_not_a_pin_is_refused(tmp_path: Path) -> None:
    lock = tmp_path / "requirements.lock"
    lock.write_text("# comment\nnumpy==2.4.6\n\nduckdb>=2\n")
    with pytest.raises(ValueError, match=r"requirements.lock:4: not a 'name==version' pin"):
        plan.read_lock(lock)


def test_every_declared_dependency_is_tracked_once_with_its_specifiers_and_extras() -> None:
    deps = {dep.name: dep for dep in plan.read_dependencies(PYPROJECT)}
    assert {"numpy", "pyarrow", "duckdb", "rich", "torch", "transformers", "textual", "pytest", "pytest-xdist",
            "prometheus-client", "safetensors", "moto", "dask", "distributed", "mypy", "ruff"} <= set(deps)
    assert deps["moto"].extras == {"server"}
    assert Version("5.24.0") in deps["transformers"].specifier and Version("6.0.0") not in deps["transformers"].specifier
    assert [name for name, dep in deps.items() if dep.transitive] == ["tokenizers", "huggingface-hub", "fsspec"]
    assert deps["moto"].pin(Version("5.3.0")) == "moto[server]==5.3.0"
    assert deps["duckdb"].at_least(Version("2.0.1")) == "duckdb>=1.3,>=2.0.1"
    assert deps["torch"].at_least(Version("2.13.0+cpu")) == "torch>=2.13.0,>=2.4"  # no local part in a floor
    assert deps["tokenizers"].at_least(None) == "tokenizers"


def test_nothing_to_upgrade_when_the_index_serves_the_lock_and_one_line_says_so() -> None:
    served = _served_as_locked()
    served["torch"] = [Version("2.15.0"), Version("2.13.0")]  # newer torch served: held all the same
    rows = plan.plan(plan.read_dependencies(PYPROJECT), plan.read_lock(LOCK), served)
    assert plan.upgrades(rows) == []
    assert _row(rows, "torch").action is Action.HELD
    assert plan.nothing_differs(rows) == (
        f"newest deps: the index serves nothing newer than the lock ({len(rows)} packages checked); torch held at "
        "the locked 2.13.0+cpu (newest served 2.15.0, not tested: see docs/compatibility.md)"
    )


def test_a_newer_release_is_upgraded_and_torch_stays_held() -> None:
    served = _served_as_locked()
    served["duckdb"] = [Version("2.0.1"), Version("2.1.0"), Version("2.2.0rc1")]
    served["torch"] = [Version("2.14.1"), Version("2.15.0")]
    rows = plan.plan(plan.read_dependencies(PYPROJECT), plan.read_lock(LOCK), served)
    assert [(row.dep.name, row.locked, row.newest) for row in plan.upgrades(rows)] == [("duckdb", Version("2.0.1"), Version("2.1.0"))]
    torch = _row(rows, "torch")
    assert (torch.action, torch.newest) == (Action.HELD, Version("2.15.0"))
    assert "multi-GB CUDA builds" in torch.note


def test_a_release_outside_pyproject_range_is_not_the_newest() -> None:
    served = _served_as_locked()
    served["transformers"] = [Version("5.24.0"), Version("6.0.0")]
    rows = plan.plan(plan.read_dependencies(PYPROJECT), plan.read_lock(LOCK), served)
    assert (_row(rows, "transformers").action, _row(rows, "transformers").newest) == (Action.SAME, Version("5.24.0"))


def test_local_versions_missing_packages_and_a_lock_ahead_of_the_index() -> None:
    deps = [plan.Dependency(canonicalize_name(n), frozenset(), SpecifierSet()) for n in ("a", "b", "c", "d")]
    locked = {canonicalize_name("a"): Version("1.0+cpu"), canonicalize_name("c"): Version("3.0")}
    served = {canonicalize_name("a"): [Version("1.0")], canonicalize_name("b"): [Version("2.0")],
              canonicalize_name("c"): [Version("2.9")]}
    rows = {row.dep.name: row for row in plan.plan(deps, locked, served, held={})}
    assert rows["a"].action is Action.SAME  # 1.0+cpu is the 1.0 release
    assert (rows["b"].action, rows["b"].note) == (Action.UPGRADE, "not in the lock")
    assert (rows["c"].action, rows["c"].note) == (Action.SAME, "the lock is newer than what is served")
    assert (rows["d"].action, rows["d"].newest) == (Action.SAME, None)


def test_the_table_has_one_line_per_package_under_its_header() -> None:
    served = _served_as_locked()
    served["duckdb"] = [Version("2.1.0")]
    rows = plan.plan(plan.read_dependencies(PYPROJECT), plan.read_lock(LOCK), served)
    lines = plan.table(rows).splitlines()
    assert lines[0].split() == ["package", "locked", "newest", "tested", "at", "its", "newest"]
    assert len(lines) == len(rows) + 1
    assert lines[[row.dep.name for row in rows].index("duckdb") + 1].split()[:4] == ["duckdb", "2.0.1", "2.1.0", "yes:"]
    assert any(line.startswith("tokenizers (transitive)") for line in lines)


def test_the_index_is_asked_through_pip(tmp_path: Path) -> None:
    # A local find-links index: pip lists releases from the file names, installable ones only, no pre-releases.
    for name in ("nd_demo-1.0.0-py3-none-any.whl", "nd_demo-1.2.0-py3-none-any.whl",
                 "nd_demo-2.0.0rc1-py3-none-any.whl", "nd_demo-3.0.0-cp27-cp27m-win32.whl"):
        (tmp_path / name).touch()
    here = ["--no-index", "--find-links", str(tmp_path)]
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}  # this machine's pip configuration left out
    assert index.served(["ND_Demo"], pip_args=here, env=env) == {"nd-demo": [Version("1.2.0"), Version("1.0.0")]}
    with pytest.raises(index.IndexQueryError, match="the index did not list releases of nd-missing"):
        index.served(["nd-demo", "nd-missing"], pip_args=here, env=env)
