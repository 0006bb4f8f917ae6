"""tools/newest_deps/overlay.py for real: venvs layered over this environment, pip installing wheels from a
local find-links directory (no index), the upgraded copy shadowing the locked one, and an install that leaves an
installed package unfit refused (the syrupy-under-pytest-9 case)."""

from __future__ import annotations

import subprocess
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest
from packaging.version import Version

from tools.newest_deps import overlay


def _wheel(into: Path, name: str, version: str, requires: Sequence[str] = ()) -> None:
    """A minimal pure-Python wheel: one module saying its version, and the metadata pip reads."""
    module = name.replace("-", "_")
    dist = f"{module}-{version}"
    files = {
        f"{module}/__init__.py": f"VERSION = {version!r}\n",
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}.dist-info/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{dist}.dist-info/RECORD"])
    with zipfile.ZipFile(into / f"{dist}-py3-none-any.whl", "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)


@pytest.fixture
def wheels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    found = tmp_path / "wheels"
    found.mkdir()
    _wheel(found, "nd-demo", "1.0")
    _wheel(found, "nd-demo", "2.0")
    _wheel(found, "nd-app", "1.0", ["nd-demo<2"])
    # pip in the overlays sees only these wheels: no index, the machine's find-links replaced.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(found))
    return found


def test_an_upgrade_is_installed_over_the_locked_side_and_shadows_it(tmp_path: Path, wheels: Path) -> None:
    base = overlay.create(tmp_path / "base")  # stands for the locked environment: nd-demo 1.0
    assert overlay.install(base, ["nd-demo==1.0"], [], upgrade=False) == ""
    top = overlay.create(tmp_path / "top", base.python)
    assert overlay.own_packages(top) == {}
    assert overlay.install(top, ["nd-demo"], ["nd-demo==2.0"], upgrade=True) == ""
    assert overlay.own_packages(top) == {"nd-demo": Version("2.0")}
    assert overlay.versions_seen(top, ["nd-demo"]) == {"nd-demo": Version("2.0")}
    assert overlay.versions_seen(base, ["nd-demo"]) == {"nd-demo": Version("1.0")}
    # The upgraded module is the one imported; this environment's packages are reached through both layers.
    code = "import nd_demo, numpy, moeprobe; print(nd_demo.VERSION)"
    assert subprocess.run([top.python, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "2.0"


def test_an_upgrade_that_leaves_an_installed_package_unfit_is_refused(tmp_path: Path, wheels: Path) -> None:
    base = overlay.create(tmp_path / "base")
    assert overlay.install(base, ["nd-app==1.0", "nd-demo==1.0"], [], upgrade=False) == ""
    top = overlay.create(tmp_path / "top", base.python)
    # Asked with the package that caps it, pip itself refuses and says why ...
    said = overlay.install(top, ["nd-app", "nd-demo==2.0"], [], upgrade=False)
    assert "The user requested nd-demo==2.0" in said and "nd-app 1.0 depends on nd-demo<2" in said
    # ... asked alone, pip installs it and only warns: pip check is what refuses.
    said = overlay.install(top, ["nd-demo==2.0"], [], upgrade=False)
    assert said == "nd-app 1.0 has requirement nd-demo<2, but you have nd-demo 2.0."
