"""Instrumenting an unmodified script: ``moeprobe record -o DIR -- python job.py``.

The CLI starts the job with ``bootstrap/`` on PYTHONPATH, whose ``sitecustomize`` calls
:func:`install_from_env`. That wraps ``transformers.PreTrainedModel.post_init`` (when, and only if, the job
imports transformers), so every model the job builds or loads is offered to moeprobe. A model is attached
on its first forward call, once it is known to be the outermost model (a ``*ForCausalLM`` subsumes the
``*Model`` it wraps). Models without a router are ignored; a model whose router moeprobe cannot interpret
is reported on stderr and left alone: the job always runs.
"""

from __future__ import annotations

import atexit
import importlib.abc
import importlib.machinery
import json
import os
import sys
import threading
import weakref
from typing import Any

ENV = "MOEPROBE_RECORD"
_TARGET_MODULE = "transformers.modeling_utils"


class _Recorder:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.candidates: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        self.probes: list[Any] = []
        self.lock = threading.Lock()
        atexit.register(self.close_all, "complete")
        previous_hook = sys.excepthook

        def excepthook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
            self.close_all("aborted", f"{exc_type.__name__}: {exc}")
            previous_hook(exc_type, exc, tb)

        sys.excepthook = excepthook

    def path_for(self, n: int) -> str:
        base = self.config["path"]
        return base if n == 0 else f"{base}-{n + 1}"

    def offer(self, model: Any) -> None:
        """Called at the end of every PreTrainedModel.__init__."""
        with self.lock:
            modules = {id(m) for m in model.modules()}
            for other, handle in list(self.candidates.items()):
                if other is not model and id(other) in modules:
                    handle.remove()
                    del self.candidates[other]
            self.candidates[model] = model.register_forward_pre_hook(self._first_forward)

    def _first_forward(self, model: Any, args: Any) -> None:
        with self.lock:
            handle = self.candidates.pop(model, None)
            if handle is None:
                return
            handle.remove()
            from ..traces.errors import TraceError
            from .probe import Probe
            from .spec import UnsupportedModelError

            try:
                probe = Probe(
                    model,
                    self.path_for(len(self.probes)),
                    logits=bool(self.config.get("logits")),
                    force=bool(self.config.get("force")),
                    flush_interval=float(self.config.get("flush_interval", 1.0)),
                    redact_tokens=bool(self.config.get("redact_tokens")),
                    **_metrics_settings(self.config.get("metrics")),
                )
            except UnsupportedModelError as exc:
                if "no MoE router found" not in str(exc):
                    print(f"moeprobe: not recording {type(model).__name__}: {exc}", file=sys.stderr)
                return
            except TraceError as exc:
                print(f"moeprobe: not recording {type(model).__name__}: {exc}", file=sys.stderr)
                return
            self.probes.append(probe)
            print(f"moeprobe: recording {type(model).__name__} ({len(probe.layers)} MoE layers) to {probe.path}", file=sys.stderr)
            if probe.metrics_url is not None:
                print(f"moeprobe: serving metrics on {probe.metrics_url}", file=sys.stderr, flush=True)

    def close_all(self, status: str, error: str | None = None) -> None:
        for probe in self.probes:
            try:
                probe.close(status, error)
            except Exception as exc:  # noqa: BLE001 - one broken probe must not stop the others closing
                print(f"moeprobe: could not close {probe.path}: {exc}", file=sys.stderr)


def _metrics_settings(metrics: dict[str, Any] | None) -> dict[str, Any]:
    """Probe arguments for the endpoint ``moeprobe record --metrics-port`` asked for (none when it did not).
    Optional: if the endpoint cannot start after all, the job is still recorded, without it."""
    if not metrics:
        return {}
    from ..metrics.options import MetricsOptions

    options = {k: v for k, v in metrics.items() if k != "port"}
    return {"metrics_port": int(metrics["port"]), "metrics": MetricsOptions(**options), "metrics_optional": True}


_recorder: _Recorder | None = None


def _patch(modeling_utils: Any) -> None:
    cls = modeling_utils.PreTrainedModel
    original = cls.post_init
    if getattr(original, "_moeprobe_wrapped", False):
        return

    def post_init(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        if _recorder is not None:
            try:
                _recorder.offer(self)
            except Exception as exc:  # noqa: BLE001 - never break model construction
                print(f"moeprobe: could not offer {type(self).__name__} for recording: {exc}", file=sys.stderr)
        return result

    post_init._moeprobe_wrapped = True  # type: ignore[attr-defined]
    cls.post_init = post_init


class _Finder(importlib.abc.MetaPathFinder):
    """Patches transformers.modeling_utils right after it is first imported."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != _TARGET_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module: Any) -> None:
            exec_module(module)
            _patch(module)

        loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


def install(config: dict[str, Any]) -> None:
    global _recorder
    _recorder = _Recorder(config)
    if _TARGET_MODULE in sys.modules:
        _patch(sys.modules[_TARGET_MODULE])
    else:
        sys.meta_path.insert(0, _Finder())


def install_from_env() -> None:
    raw = os.environ.get(ENV)
    if not raw:
        return
    install(json.loads(raw))
