"""Loaded by Python at start-up in jobs run under ``moeprobe record`` (this folder is put on PYTHONPATH)."""

import importlib.machinery
import importlib.util
import os
import sys


def _report_missing_moeprobe() -> None:
    """This interpreter cannot import moeprobe: say which one can, and tell ``moeprobe record`` (status file)."""
    import json

    try:
        config = json.loads(os.environ["MOEPROBE_RECORD"])
    except ValueError:
        config = {}
    python = config.get("python") or "the Python that runs moeprobe"
    print(
        f"moeprobe: {sys.executable} cannot import moeprobe, so nothing is recorded: run the job with {python}, "
        f"or install moeprobe for this interpreter",
        file=sys.stderr,
    )
    status_file = config.get("status_file")
    if status_file:
        try:
            with open(status_file, "w", encoding="utf-8") as f:
                f.write(sys.executable)
        except OSError:
            pass


if os.environ.get("MOEPROBE_RECORD"):
    try:
        from moeprobe.hooks.autoattach import install_from_env

        install_from_env()
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] == "moeprobe":
            _report_missing_moeprobe()
        else:
            print(f"moeprobe: could not install the recorder ({type(exc).__name__}: {exc})", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - the job must run even if the recorder cannot
        print(f"moeprobe: could not install the recorder ({type(exc).__name__}: {exc})", file=sys.stderr)

# Chain to a sitecustomize that this one shadows, so the job's own start-up hooks still run.
_here = os.path.dirname(os.path.abspath(__file__))
_others = [p for p in sys.path if os.path.abspath(p or ".") != _here]
_spec = importlib.machinery.PathFinder.find_spec("sitecustomize", _others)
if _spec is not None and _spec.loader is not None:
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
