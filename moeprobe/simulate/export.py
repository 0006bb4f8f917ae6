"""Writes an EPLB placement (``simulate --eplb``) in the form an engine reads back.

- ``sglang``: the JSON that SGLang's ``--init-expert-location FILE.json`` loads
  (``compute_initial_expert_location_metadata`` in python/sglang/srt/eplb/expert_location.py): an object with
  ``physical_to_logical_map`` (layers x physical experts), from which SGLang derives ``logical_to_all_physical_map``
  itself. SGLang reads a value that does not end in ``.json`` or ``.pt`` as inline JSON, so the file name must
  end in ``.json``.
- ``eplb``: DeepSeek EPLB's three outputs (``rebalance_experts`` in deepseek-ai/EPLB eplb.py): ``phy2log``
  (layers x replicas), ``log2phy`` (layers x experts x max replicas, -1 padded) and ``logcnt`` (layers x experts),
  with the parameters they were planned with.

Rows follow the trace's MoE layers in order (``layers`` in the file names them).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

EXPORT_FORMATS = ("sglang", "eplb")


def sglang_payload(eplb: dict[str, Any]) -> dict[str, Any]:
    return {"physical_to_logical_map": eplb["phy2log"]}


def eplb_payload(eplb: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": "deepseek-eplb",
        "policy": eplb["policy"],
        "num_replicas": eplb["replicas"],
        "num_groups": eplb["groups"],
        "num_nodes": eplb["nodes"],
        "num_gpus": eplb["gpus"],
        "layers": eplb["layers"],
        "phy2log": eplb["phy2log"],
        "log2phy": eplb["log2phy"],
        "logcnt": eplb["logcnt"],
    }


def export_placement(eplb: dict[str, Any], fmt: str, path: Path, *, force: bool = False) -> Path:
    """Write the placement of a ``simulate --eplb`` result to ``path``; ValueError for a bad request."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"--export: format {fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")
    if fmt == "sglang" and path.suffix != ".json":
        raise ValueError(f"--export sglang: {path} should end in .json (SGLang reads any other value as inline JSON)")
    if path.exists() and not force:
        raise ValueError(f"--export: {path} already exists; pass --force to overwrite it")
    if path.exists() and not path.is_file():
        raise ValueError(f"--export: {path} exists and is not a file")
    payload = sglang_payload(eplb) if fmt == "sglang" else eplb_payload(eplb)
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise ValueError(f"--export: cannot write in {directory} ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle)
            handle.write("\n")
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise ValueError(f"--export: cannot write {path} ({exc.strerror or exc})") from None
    return path
