"""Instrumenting an unmodified script: ``moeprobe record -o DIR -- python job.py``.

The CLI starts the job with ``bootstrap/`` on PYTHONPATH, whose ``sitecustomize`` calls
:func:`install_from_env`. That wraps ``transformers.PreTrainedModel.post_init`` (when, and only if, the job
imports transformers), so every model the job builds or loads is offered to moeprobe. A model is attached
on its first forward call, once it is known to be the outermost model (a ``*ForCausalLM`` subsumes the
``*Model`` it wraps). Models without a router are ignored; a model whose router moeprobe cannot interpret
is reported on stderr and left alone, and a probe that refuses a model on its first call (a contract
check failed) marks its trace aborted while the job runs on. Once the job has started nothing here stops it;
``moeprobe record`` refuses before starting it only for its own bad options (an existing trace without
``--force``, a busy ``--metrics-port``, a ``--routers`` file that does not exist).

Options come from the JSON in ``MOEPROBE_RECORD`` (written by ``moeprobe record``): the trace path, ``logits``,
``force``, ``flush_interval``, ``max_queue_mb``, ``redact_tokens``, ``weights``, ``tags`` (applied to every sequence) and
``routers``, a Python file or importable module that defines ``ROUTERS``, a dict of :class:`RouterSpec`. With
``routers``, plain PyTorch models are found too: the outermost module whose first forward call contains a
declared router is recorded (a global forward pre-hook, removed once that model is attached; a second plain
PyTorch model is not looked for).
"""

from __future__ import annotations

import atexit
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
import threading
import weakref
from typing import Any

ENV = "MOEPROBE_RECORD"
_TARGET_MODULE = "transformers.modeling_utils"


def _log() -> logging.Logger:
    """This module's logger, looked up when a message comes rather than at import: this module is imported at the
    job's start-up, before the job's own code, and a job that configures logging with ``dictConfig`` (whose
    ``disable_existing_loggers`` is true by default) would silence every logger that exists by then."""
    return logging.getLogger(__name__)


def load_routers(source: str) -> dict[Any, Any]:
    """The ``ROUTERS`` dict of a Python file (``path/to/routers.py``) or an importable module (``pkg.routers``)."""
    from .spec import RouterSpec

    if source.endswith(".py") or os.sep in source or (os.altsep and os.altsep in source):
        if not os.path.isfile(source):
            raise ValueError(f"--routers {source}: no such file")
        spec = importlib.util.spec_from_file_location("moeprobe_user_routers", source)
        if spec is None or spec.loader is None:
            raise ValueError(f"--routers {source}: not a Python file")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(source)
    routers = getattr(module, "ROUTERS", None)
    if not isinstance(routers, dict) or not routers:
        raise ValueError(f"--routers {source}: defines no ROUTERS dict (router class or name -> moeprobe.RouterSpec)")
    bad = [str(k) for k, v in routers.items() if not isinstance(v, RouterSpec)]
    if bad:
        raise ValueError(f"--routers {source}: ROUTERS[{bad[0]!r}] is not a moeprobe.RouterSpec")
    return routers


class _Recorder:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.candidates: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        self.probes: list[Any] = []
        self.lock = threading.Lock()
        self._routers: dict[Any, Any] | None = None
        self._routers_failed = False
        self._global_hook: Any = None
        self._seen: set[int] = set()  # ids of modules the global hook has looked at (and their submodules)
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
            if self._attach(model):
                self.probes[-1].join_call(model, args, {})  # as in _any_forward: the model's own call is under way

    def routers(self) -> dict[Any, Any] | None:
        """The user's router declarations, loaded on first use (the file may import the job's own modules)."""
        source = self.config.get("routers")
        if not source or self._routers_failed:
            return None
        if self._routers is None:
            try:
                self._routers = load_routers(str(source))
            except Exception as exc:  # noqa: BLE001 - the job runs even if the declarations are broken
                self._routers_failed = True
                _log().error("moeprobe: cannot use --routers: %s: %s", type(exc).__name__, exc)
                return None
        return self._routers

    def _probed(self, model: Any) -> bool:
        """Whether ``model`` is, contains or sits inside a model that is already recorded."""
        for probe in self.probes:
            if probe.model is model:
                return True
            if any(m is model for m in probe.model.modules()) or any(m is probe.model for m in model.modules()):
                return True
        return False

    def _attach(self, model: Any) -> bool:
        """Start recording ``model``; False (and a message unless it simply has no router) when it cannot be."""
        from ..traces.errors import TraceError
        from .probe import Probe
        from .spec import UnsupportedModelError

        if self._probed(model):
            return False
        try:
            probe = Probe(
                model,
                self.path_for(len(self.probes)),
                logits=bool(self.config.get("logits")),
                force=bool(self.config.get("force")),
                routers=self.routers(),
                flush_interval=float(self.config.get("flush_interval", 1.0)),
                max_queue_mb=float(self.config.get("max_queue_mb", 256)),
                redact_tokens=bool(self.config.get("redact_tokens")),
                weights=str(self.config.get("weights", "fp16")),
                # A contract failure stops capture and marks the trace aborted; the job runs on.
                raise_on_refusal=False,
                **_metrics_settings(self.config.get("metrics")),
            )
        except UnsupportedModelError as exc:
            if "no MoE router found" not in str(exc):
                _log().error("moeprobe: not recording %s: %s", type(model).__name__, exc)
            return False
        except TraceError as exc:
            _log().error("moeprobe: not recording %s: %s", type(model).__name__, exc)
            return False
        except Exception as exc:  # noqa: BLE001 - whatever goes wrong, the user's job must run on
            _log().error("moeprobe: not recording %s: %s: %s", type(model).__name__, type(exc).__name__, exc)
            return False
        tags = self.config.get("tags") or {}
        if tags:
            probe.tag(**tags)
        self.probes.append(probe)
        _log().info("moeprobe: recording %s (%d MoE layers) to %s", type(model).__name__, len(probe.layers), probe.path)
        if probe.metrics_url is not None:
            _log().info("moeprobe: serving metrics on %s", probe.metrics_url)
        return True

    def install_module_hook(self) -> None:
        """With ``routers``: look at the first forward call of every outermost module, transformers or not."""
        from torch.nn.modules.module import register_module_forward_pre_hook

        self._global_hook = register_module_forward_pre_hook(self._any_forward)

    def _any_forward(self, module: Any, args: Any) -> None:
        if id(module) in self._seen:
            return
        with self.lock:
            # The outermost module's pre-hook runs before its children's: mark the whole tree as looked at so
            # that each module is examined once, whatever it turns out to hold.
            self._seen.update(id(m) for m in module.modules())
            handle = self.candidates.pop(module, None)
            if handle is not None:
                handle.remove()
            if self.routers() is None:
                self._remove_module_hook()
                return
            if not self._attach(module):
                return
            # Found: stop paying for a global hook on every module call (a second plain-PyTorch model built later
            # is not looked at; transformers models still are).
            self._remove_module_hook()
            # torch looked up this call's forward before the probe wrapped it, so the probe's entry would miss this
            # first call: it joins the call in progress. A global hook does not see keyword arguments; the entry
            # only needs them when the model itself reads the tokens.
            self.probes[-1].join_call(module, args, {})

    def _remove_module_hook(self) -> None:
        if self._global_hook is not None:
            self._global_hook.remove()
            self._global_hook = None

    def close_all(self, status: str, error: str | None = None) -> None:
        self._remove_module_hook()
        for probe in self.probes:
            try:
                probe.close(status, error)
            except Exception as exc:  # noqa: BLE001 - one broken probe must not stop the others closing
                _log().error("moeprobe: could not close %s: %s", probe.path, exc)


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
                _log().error("moeprobe: could not offer %s for recording: %s", type(self).__name__, exc)
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
    if config.get("routers"):
        try:
            _recorder.install_module_hook()
        except ImportError as exc:
            _log().error("moeprobe: --routers needs torch in the job's Python: %s", exc)
    if _TARGET_MODULE in sys.modules:
        _patch(sys.modules[_TARGET_MODULE])
    else:
        sys.meta_path.insert(0, _Finder())


def install_from_env() -> None:
    raw = os.environ.get(ENV)
    if not raw:
        return
    from ..logs import show_library_messages

    # The job's stderr shows moeprobe's messages as `moeprobe record` itself does (INFO and above, the message
    # alone), whatever logging the job sets up for itself.
    show_library_messages(propagate=False)
    install(json.loads(raw))
