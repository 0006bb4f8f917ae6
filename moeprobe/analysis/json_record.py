"""Typed records that read and write one JSON object exactly: the fields of a dataclass, in the JSON's key order.

The report models (``analysis.report_model``, ``simulate.report_model``) are built on this. Reading is strict:
a key the record does not declare, or a declared key that is missing, is a ``ValueError``, so a field added to
a builder but not to its model fails the round-trip tests instead of vanishing from an output. Values are
kept as they are (a float stays the float the builder rounded); only the structure is typed: nested records,
lists and dicts of records.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import field, fields
from typing import Any, Self, Union, get_args, get_origin, get_type_hints

_OMIT = "omit_if_none"


def omitted_when_none() -> Any:
    """A field some objects do not have at all (not ``null``): absent from the JSON when it is None."""
    return field(default=None, metadata={_OMIT: True})


class JsonRecord:
    """Mixin for frozen dataclasses: ``from_json(dict)`` and ``to_json() -> dict``, inverse of each other."""

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        if not isinstance(data, Mapping):
            raise ValueError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
        declared = fields(cls)  # type: ignore[arg-type]
        unknown = set(data) - {f.name for f in declared}
        if unknown:
            raise ValueError(f"{cls.__name__}: fields the model does not declare: {', '.join(sorted(unknown))}")
        hints = _hints(cls)
        values: dict[str, Any] = {}
        for f in declared:
            if f.name in data:
                values[f.name] = _read(hints[f.name], data[f.name])
            elif not f.metadata.get(_OMIT):
                raise ValueError(f"{cls.__name__}: missing field {f.name!r}")
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        hints = _hints(type(self))
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None and f.metadata.get(_OMIT):
                continue
            out[f.name] = _write_as(hints[f.name], value)
        return out


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """The field types, resolved once per class (annotations are strings under ``from __future__``)."""
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


def _is_record(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, JsonRecord)


_PLAIN: dict[Any, bool] = {}


def _is_plain(tp: Any) -> bool:
    """Whether ``_read`` returns every value of type ``tp`` unchanged: no record, list or dict anywhere in it."""
    if tp not in _PLAIN:
        origin = get_origin(tp)
        if origin in (Union, types.UnionType):
            _PLAIN[tp] = all(_is_plain(arg) for arg in get_args(tp))
        else:
            _PLAIN[tp] = origin is None and not _is_record(tp) and tp not in (list, dict)
    return _PLAIN[tp]


def _read(tp: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [arg for arg in get_args(tp) if arg is not type(None)]
        for arg in options:
            if (_is_record(arg) and isinstance(value, Mapping)) or (get_origin(arg) in (list, dict)):
                return _read(arg, value)
        return value
    if _is_record(tp):
        return tp.from_json(value)
    if origin is list and isinstance(value, list):
        (item,) = get_args(tp)
        if _is_plain(item):  # numbers, strings: kept as they are, without a call per element (--full tables)
            return list(value)
        return [_read(item, v) for v in value]
    if origin is dict and isinstance(value, Mapping):
        _, item = get_args(tp)
        return {key: _read(item, v) for key, v in value.items()}
    return value


_SCALARS = (int, float, str, bool, type(None))
_SCALAR: dict[Any, bool] = {}


def _is_scalar(tp: Any) -> bool:
    """Whether ``tp`` declares numbers, strings, booleans or None only (``Num``, ``int | None``, ``str``): values
    that ``_write`` returns as they are."""
    if tp not in _SCALAR:
        args = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
        _SCALAR[tp] = all(arg in _SCALARS for arg in args)
    return _SCALAR[tp]


_CONTAINER: dict[Any, tuple[Any, Any] | None] = {}


def _container(tp: Any) -> tuple[Any, Any] | None:
    """(list or dict, the declared item type) of ``list[X]``, ``dict[str, X]`` or either of them ``| None``."""
    if tp not in _CONTAINER:
        _CONTAINER[tp] = _find_container(tp)
    return _CONTAINER[tp]


def _find_container(tp: Any) -> tuple[Any, Any] | None:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        found = [arg for arg in get_args(tp) if get_origin(arg) in (list, dict)]
        if len(found) != 1:
            return None
        tp, origin = found[0], get_origin(found[0])
    if origin is list:
        return list, get_args(tp)[0]
    if origin is dict:
        return dict, get_args(tp)[1]
    return None


def _write_as(tp: Any, value: Any) -> Any:
    """``_write(value)`` for a value declared ``tp``: a list or dict whose declared items are scalars is copied
    without a call per element (the --full count tables and co-activation matrices hold tens of thousands of
    numbers), nested lists of them row by row; anything else as ``_write`` does."""
    if isinstance(value, (list, dict)):
        shape = _container(tp)
        if shape is not None and isinstance(value, shape[0]):
            kind, item = shape
            if _is_scalar(item):
                return list(value) if kind is list else dict(value)
            if kind is list and _container(item) is not None:
                return [_write_as(item, v) for v in value]
    return _write(value)


def _write(value: Any) -> Any:
    if isinstance(value, JsonRecord):
        return value.to_json()
    if isinstance(value, list):
        return [_write(v) for v in value]
    if isinstance(value, dict):
        return {key: _write(v) for key, v in value.items()}
    return value
