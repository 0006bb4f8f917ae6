"""Loaded by Python at start-up in jobs run under ``moeprobe record`` (this folder is put on PYTHONPATH)."""

import importlib.machinery
import importlib.util
import os
import sys

if os.environ.get("MOEPROBE_RECORD"):
    try:
        from moeprobe.hooks.autoattach import install_from_env

        install_from_env()
    except Exception as exc:  # noqa: BLE001 - the job must run even if the recorder cannot
        print(f"moeprobe: could not install the recorder ({type(exc).__name__}: {exc})", file=sys.stderr)

# Chain to a sitecustomize that this one shadows, so the job's own start-up hooks still run.
_here = os.path.dirname(os.path.abspath(__file__))
_others = [p for p in sys.path if os.path.abspath(p or ".") != _here]
_spec = importlib.machinery.PathFinder.find_spec("sitecustomize", _others)
if _spec is not None and _spec.loader is not None:
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
