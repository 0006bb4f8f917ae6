"""Vega-Lite specs to PNG and SVG (vl-convert: Vega's own renderer in an embedded JS engine, no browser), and the
Vega JavaScript that an HTML page inlines so that it opens without network access.

vl-convert is an optional dependency (``pip install 'moeprobe[html]'``); ``MissingDependency`` says so in one line.
"""

from __future__ import annotations

import concurrent.futures
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

# The Vega-Lite release every picture is compiled with, so that HTML, PNG and SVG of one chart agree.
VEGALITE_VERSION = "6.4"


class MissingDependency(RuntimeError):
    """vl-convert-python is not installed."""


def _vlc() -> Any:
    try:
        import vl_convert
    except ImportError:
        raise MissingDependency(
            "pictures need vl-convert-python: pip install 'moeprobe[html]' (or pip install vl-convert-python)"
        ) from None
    return vl_convert


def require() -> None:
    """Raise MissingDependency now if vl-convert is not installed."""
    _vlc()


def to_png(spec: dict[str, Any], *, scale: float = 2.0) -> bytes:
    # allowed_base_urls=[]: every chart carries its data inline; nothing may be fetched while rendering.
    return bytes(_vlc().vegalite_to_png(spec, vl_version=VEGALITE_VERSION, scale=scale, allowed_base_urls=[]))


def to_svg(spec: dict[str, Any]) -> str:
    return str(_vlc().vegalite_to_svg(spec, vl_version=VEGALITE_VERSION, allowed_base_urls=[]))


def _cache_dir() -> Path:
    explicit = os.environ.get("MOEPROBE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moeprobe"


_prefetch: concurrent.futures.Future[str] | None = None


def prefetch_bundle() -> None:
    """Start getting the bundle in a thread (vl-convert releases the GIL while it builds), so that a cold cache
    costs the wait for the analysis running meanwhile, not the sum of both. Errors surface in javascript_bundle."""
    global _prefetch
    if _prefetch is None:
        _prefetch = concurrent.futures.Future()
        future = _prefetch

        def work() -> None:
            try:
                future.set_result(_load_bundle())
            except BaseException as exc:  # noqa: BLE001 - handed to whoever asks for the bundle
                future.set_exception(exc)

        threading.Thread(target=work, name="moeprobe-vega-bundle", daemon=True).start()


def javascript_bundle() -> str:
    """Vega, Vega-Lite and vega-embed as one script (about 0.9 MB) that defines ``vegaEmbed`` on window."""
    prefetch_bundle()
    assert _prefetch is not None
    return _prefetch.result()


def _load_bundle() -> str:
    """vl-convert builds the bundle in 2 to 4 s on first use in a process, so it is kept in the user's cache
    directory, keyed by the vl-convert and Vega-Lite versions; a cache that cannot be written only costs the
    rebuild."""
    from importlib.metadata import version

    vlc = _vlc()
    name = f"vega-bundle-{version('vl-convert-python')}-vl{VEGALITE_VERSION}.js"
    path = _cache_dir() / name
    try:
        text = path.read_text(encoding="utf-8")
        if text.rstrip().endswith(_BUNDLE_TAIL):  # a complete file: writes go through a rename
            return text
    except OSError:
        pass
    text = str(vlc.javascript_bundle(vl_version=VEGALITE_VERSION))
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".bundle-")
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return text


# The default bundle ends by publishing the three libraries on window; checked before trusting a cached copy.
_BUNDLE_TAIL = "window.vegaLite=__default1;"
