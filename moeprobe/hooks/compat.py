"""Which transformers releases moeprobe's capture is proven on, checked when a probe attaches.

The range is the one the compatibility matrix measured (docs/compatibility.md, ``make compat``). An older
major release is refused in one line; a release newer than the newest tested is recorded with a one-line
warning, relying on the contract checks (:mod:`.contracts`) to refuse what has changed shape.
"""

from __future__ import annotations

import re
import sys
import warnings
from typing import Any

from .spec import UnsupportedModelError

OLDEST_TESTED = "5.0.0"
NEWEST_TESTED = "5.25.0"

_warned: set[str] = set()


class NewerTransformersWarning(UserWarning):
    """The installed transformers is newer than the newest release moeprobe was tested on."""


def version_tuple(version: str) -> tuple[int, ...]:
    parts = re.findall(r"\d+", version.split("+")[0])[:3]
    return tuple(int(p) for p in parts) + (0,) * (3 - len(parts))


def is_transformers_model(model: Any) -> bool:
    return any(cls.__module__.startswith("transformers.") for cls in type(model).__mro__)


def check_transformers(model: Any) -> None:
    """Refuse a transformers model from an unsupported release; warn once for an untested newer one."""
    if not is_transformers_model(model):
        return
    version = str(getattr(sys.modules.get("transformers"), "__version__", "0"))
    found = version_tuple(version)
    if found < version_tuple(OLDEST_TESTED):
        raise UnsupportedModelError(
            f"transformers {version} is not supported: moeprobe captures transformers {OLDEST_TESTED} to "
            f"{NEWEST_TESTED} (tested) and newer 5.x releases; install transformers>={OLDEST_TESTED}"
        )
    if found > version_tuple(NEWEST_TESTED) and version not in _warned:
        _warned.add(version)
        warnings.warn(
            f"moeprobe: transformers {version} is newer than the newest tested release ({NEWEST_TESTED}); "
            f"recording with contract checks (a changed router output is refused, not recorded wrongly)",
            NewerTransformersWarning,
            stacklevel=3,
        )
