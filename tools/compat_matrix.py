"""The transformers compatibility matrix: capture, token-context and demo tests per transformers release.

    python tools/compat_matrix.py 5.0.0 latest          # what CI runs: the oldest supported and the newest served
    python tools/compat_matrix.py --markdown 4.57.6 5.0.0 5.5.4 ...   # the table in docs/compatibility.md

Each release is installed with its own dependencies into ``.tf/<version>/`` (``pip install --target``), which
goes first on PYTHONPATH over the project's locked environment: one environment, one transformers swapped in.
``latest`` asks the package index for the newest release at run time (unlocked) and tests that one, installed alone
over the locked environment when its own requirements do not install from the index (see install). A 4.x release is expected to be
refused in one line, and that is what is checked for it. Exit status 1 if any release fails.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = [
    "tests/integration/test_family_truth.py",
    "tests/integration/test_token_context.py",
    "tests/integration/test_contracts.py",
    "tests/integration/test_discovery.py",
    "tests/integration/test_demo_cli.py",
    # Graph-safe capture wraps router forwards and reads their outputs by contract too (eager, not compiled: the
    # compiled cases take minutes and exercise torch, not transformers' module layout).
    "tests/integration/test_graph_capture.py",
    # Router outputs and stack arguments written after their call (they depend on how routers return their parts),
    # and counts mode's host step rule against the general one (on the cache API).
    "tests/integration/test_reused_buffers.py",
    "tests/unit/test_host_steps.py",
]
REFUSAL_CHECK = """
import moeprobe
from tests.tiny_models import build
try:
    moeprobe.record(build("mixtral"), None)
except moeprobe.UnsupportedModelError as exc:
    print("refused:", exc)
else:
    raise SystemExit("a transformers 4.x model was not refused")
"""


def newest_served() -> str:
    """The newest transformers release the index serves within the range pyproject declares (no pre-releases, no
    6.x), as tools/newest_deps decides it for every dependency."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # run as a script: tools/ is on the path, the repository root is not
    from tools.newest_deps.index import served_versions
    from tools.newest_deps.plan import newest_allowed, read_dependencies

    declared = next(d for d in read_dependencies(ROOT / "pyproject.toml") if d.name == "transformers")
    newest = newest_allowed(served_versions("transformers"), declared.specifier)
    if newest is None:
        raise SystemExit(f"the index serves no transformers release within {declared.specifier}")
    return str(newest)


def install(version: str) -> tuple[Path, str]:
    """``.tf/<release>``, with the release installed and its own dependencies. ``latest`` is the newest release the
    index serves, asked at run time. A release whose requirements do not all install from this index (transformers
    5.25.0 requires kernels>=0.19.1; the index serves 0.17.2) is installed alone over the locked environment, and
    says so: CI must test the newest release there is, never quietly the newest one that installs."""
    if version == "latest":
        version = newest_served()
        print(f"latest: transformers {version} is the newest release the index serves", flush=True)
    target = ROOT / ".tf" / version
    marker = target / ".installed"
    if not marker.exists():
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--upgrade", "--target", str(target)]
        result = subprocess.run([*command, f"transformers=={version}"], capture_output=True, text=True)
        if result.returncode != 0:
            errors = [line.strip() for line in result.stderr.splitlines() if line.startswith("ERROR")]
            reason = next((line for line in errors if "No matching distribution" in line), errors[-1] if errors else result.stderr.strip())
            print(f"transformers {version}: its requirements do not all install from this index ({reason}); "
                  "installed without them, over the locked environment", flush=True)
            subprocess.run([*command, "--no-deps", f"transformers=={version}"], check=True)
        marker.touch()
    found = subprocess.run(
        [sys.executable, "-c", "import transformers; print(transformers.__version__)"],
        env=_env(target), capture_output=True, text=True, check=True,
    ).stdout.strip()
    if found != version:
        raise SystemExit(f"transformers {version} was installed, but {found} is the one imported")
    return target, found


def _env(target: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(target), str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run(version: str) -> tuple[str, bool, str]:
    target, found = install(version)
    start = time.monotonic()
    if found.startswith("4."):
        result = subprocess.run([sys.executable, "-c", REFUSAL_CHECK], env=_env(target), cwd=ROOT, capture_output=True, text=True)
        ok = result.returncode == 0 and result.stdout.count("\n") == 1
        line = result.stdout.strip() or result.stderr.strip().splitlines()[-1]
        print(line)
        return found, ok, "refused in one line" if ok else f"NOT refused: {line}"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "auto", "-p", "no:cacheprovider", *TESTS], env=_env(target), cwd=ROOT, capture_output=True, text=True
    )
    summary = next((line for line in reversed(result.stdout.splitlines()) if re.search(r"\d+ (passed|failed)", line)), "no summary")
    print(result.stdout[-3000:] if result.returncode else summary)
    return found, result.returncode == 0, f"{summary.strip('= ')} ({time.monotonic() - start:.0f} s)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="+", help="transformers releases, or 'latest'")
    parser.add_argument("--markdown", action="store_true", help="print the matrix as a Markdown table")
    args = parser.parse_args()
    rows = []
    for version in args.versions:
        print(f"== transformers {version}", flush=True)
        found, ok, detail = run(version)
        rows.append((found, ok, detail))
    if args.markdown:
        print("\n| transformers | result | detail |\n|---|---|---|")
        for found, ok, detail in rows:
            print(f"| {found} | {'pass' if ok else 'FAIL'} | {detail} |")
    return 0 if all(ok for _, ok, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
