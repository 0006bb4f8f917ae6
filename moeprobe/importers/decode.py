"""Decoding engine payloads without trusting them: sizes are checked before anything is decoded or allocated.

- ``read_bytes``: a whole file, refused past a size limit before it is read.
- ``b64``: base64 text, its decoded size checked from its length first, strictly validated.
- ``npy``: an ``np.save`` blob parsed by its header (never with ``allow_pickle``): magic, version, a plain integer
  dtype, C order, and exactly as many data bytes as the shape needs.
- ``raw``: a headerless buffer of a named integer dtype reshaped to (-1, layers, top_k).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from pathlib import Path

import numpy as np

from .errors import ImportInputError

DEFAULT_MAX_BYTES = 2 << 30  # per input file and per decoded payload; --max-mb changes it

# Expert ids come as small unsigned (vLLM: uint8/uint16 by expert count) or signed ints (SGLang: int32, -1 pads).
ID_DTYPES = ("uint8", "uint16", "uint32", "int8", "int16", "int32", "int64")
_NPY_MAGIC = b"\x93NUMPY"


def read_bytes(path: Path, limit: int) -> bytes:
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise ImportInputError(f"{path}: no such file") from None
    except OSError as exc:
        raise ImportInputError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not path.is_file():
        raise ImportInputError(f"{path}: not a regular file")
    if size > limit:
        raise ImportInputError(f"{path}: {size:,} bytes is over the {limit:,}-byte input limit (--max-mb)")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImportInputError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def read_text(path: Path, limit: int) -> str:
    data = read_bytes(path, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ImportInputError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def b64(text: object, where: str, limit: int) -> bytes:
    """Strict base64 (standard alphabet, padded); ``where`` names the file and field in the message."""
    if not isinstance(text, str):
        raise ImportInputError(f"{where}: expected a base64 string, found {type(text).__name__}")
    if len(text) // 4 * 3 > limit:
        raise ImportInputError(f"{where}: base64 payload of {len(text):,} characters is over the {limit:,}-byte limit")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImportInputError(f"{where}: not valid base64 (truncated or damaged: {exc})") from None


def npy(blob: bytes, where: str, *, ndim: int = 3) -> np.ndarray:
    """An ``np.save`` array of integer expert ids, parsed from its header; never unpickles."""
    if not blob.startswith(_NPY_MAGIC):
        raise ImportInputError(f"{where}: not an .npy array (the magic string is missing)")
    stream = io.BytesIO(blob)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except Exception as exc:  # noqa: BLE001 - a damaged header dict raises ValueError, SyntaxError or TokenError
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImportInputError(f"{where}: bad .npy header ({first})") from None
    if dtype.name not in ID_DTYPES or dtype.hasobject:
        raise ImportInputError(f"{where}: .npy dtype {dtype} is not an integer expert id type ({', '.join(ID_DTYPES)})")
    if fortran:
        raise ImportInputError(f"{where}: .npy array in Fortran order; engines write C order")
    if len(shape) != ndim:
        raise ImportInputError(f"{where}: .npy shape {tuple(shape)} should have {ndim} dimensions (tokens, layers, top_k)")
    offset = stream.tell()
    need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(blob) - offset != need:
        raise ImportInputError(
            f"{where}: .npy data holds {len(blob) - offset:,} bytes but shape {tuple(shape)} of {dtype} needs {need:,} "
            "(truncated?)"
        )
    return np.frombuffer(blob, dtype=dtype, offset=offset).reshape(shape)


def raw(
    blob: bytes, dtype_name: object, where: str, *, tokens: int | None, layers: int | None, top_k: int | None
) -> np.ndarray:
    """A headerless id buffer as (tokens, layers, top_k). Two of the three sizes must be known (the third is what
    divides the buffer); with all three the buffer must match exactly."""
    if not isinstance(dtype_name, str) or dtype_name.removeprefix("torch.") not in ID_DTYPES:
        raise ImportInputError(f"{where}: routed-experts dtype {dtype_name!r} is not one of {', '.join(ID_DTYPES)}")
    dtype = np.dtype(dtype_name.removeprefix("torch."))
    if len(blob) % dtype.itemsize:
        raise ImportInputError(f"{where}: {len(blob):,} bytes is not a whole number of {dtype} values (truncated?)")
    values = np.frombuffer(blob, dtype=dtype)
    sizes = {"tokens": tokens, "layers": layers, "top_k": top_k}
    unknown = [name for name, value in sizes.items() if value is None]
    if len(unknown) > 1:
        raise ImportInputError(f"{where}: a raw id buffer needs --num-layers or --top-k to be reshaped")
    known = int(np.prod([v for v in sizes.values() if v is not None], dtype=np.int64))
    if known <= 0 or len(values) % known or (not unknown and len(values) != known):
        shape = " x ".join(f"{name} {value if value is not None else '?'}" for name, value in sizes.items())
        raise ImportInputError(f"{where}: {len(values):,} expert ids do not fit the shape {shape}")
    full = [v if v is not None else len(values) // known for v in sizes.values()]
    return values.reshape(full)
