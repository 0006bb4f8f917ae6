"""Format v2's physical routing table: one row per (step, layer, token) with the k choices side by side.

The logical ``routing`` table (``schema.ROUTING``, one row per routing decision) is what every reader and
query sees; this module turns logical rows (or the capture pipeline's arrays) into the compact stored form,
and back. Why this layout: in v1 the per-token columns (step, sequence, position, token_id, phase, layer,
dropped) were repeated k times and the fp32 weight was 75 % of the bytes. Here they are stored once per
token; choice ``i`` (rank i by gate weight) sits in columns ``expert_i`` and ``weight_i`` (flat columns, not a
Parquet list: no repetition levels to compute, and each rank's weights compress on their own); experts take
the smallest unsigned type that holds E; ``choices`` says how many of the K columns a row uses (a layer with a
smaller top-k than the trace's largest); the rank is the column index, and an explicit ``k`` list is kept only
for logical input that was not in rank order.

Weight encodings and their error bounds (documented in docs/trace-format.md):

- ``fp32``: exact.
- ``fp16``: the weight rounded to half precision's 11 significant bits (round half to even) and kept in a
  FLOAT column (DuckDB cannot read byte-stream-split half floats; the zeroed low bits then cost little after
  zstd): relative error <= 2**-11 (4.9e-4) over the whole float32 range; NaN and inf stay as they are.
- ``u8``: per stored segment, ``w = offset + q * scale`` with ``offset = lo = min(0, min(w))``,
  ``scale = (hi - lo) / 254`` where ``hi = max(0, max(w))``, q in 0..254; absolute error <= scale / 2 =
  (hi - lo) / 508, i.e. max(w) / 508 for non-negative weights (plus
  float32 rounding of offset + q * scale). q = 255 stands for a missing (NaN) weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from .schema import PHASES, ROUTING

WEIGHT_MODES = ("fp16", "fp32", "u8")
DEFAULT_WEIGHTS = "fp16"
U8_MISSING = 255  # the u8 code of a NaN (missing) weight
_U8_STEPS = 254

# The per-token columns, stored once per (step, layer, token) row, in logical order.
TOKEN_COLUMNS = ("step", "sequence", "position", "token_id", "phase", "layer", "dropped")
MAX_TOP_K = 64


@dataclass(frozen=True)
class RoutingEncoding:
    """How a v2 trace stores its routing table; recorded in the manifest under ``encoding.routing``."""

    expert: str  # "uint8" or "uint16": the smallest unsigned type that holds every expert id
    weights: str  # one of WEIGHT_MODES
    top_k: int  # K: choice columns per row, the largest top-k of the trace's layers

    @staticmethod
    def for_layers(num_experts: int, top_k: int, weights: str = DEFAULT_WEIGHTS) -> RoutingEncoding:
        if weights not in WEIGHT_MODES:
            raise ValueError(f"weights must be one of {', '.join(WEIGHT_MODES)}, not {weights!r}")
        if num_experts > (1 << 16):
            raise ValueError(f"{num_experts} experts do not fit the trace format (at most 65536)")
        if not 1 <= top_k <= MAX_TOP_K:
            raise ValueError(f"top-k {top_k} is outside what the trace format stores (1..{MAX_TOP_K})")
        return RoutingEncoding("uint8" if num_experts <= 256 else "uint16", weights, top_k)

    @staticmethod
    def from_manifest(entry: Any) -> RoutingEncoding:
        if (
            not isinstance(entry, dict)
            or entry.get("layout") != "per_token"
            or entry.get("expert") not in ("uint8", "uint16")
            or entry.get("weights") not in WEIGHT_MODES
            or not isinstance(entry.get("top_k"), int)
            or isinstance(entry.get("top_k"), bool)
            or not 1 <= entry["top_k"] <= MAX_TOP_K
        ):
            raise ValueError(f"unknown routing encoding {entry!r}")
        return RoutingEncoding(entry["expert"], entry["weights"], entry["top_k"])

    def manifest_entry(self) -> dict[str, Any]:
        return {"layout": "per_token", "expert": self.expert, "weights": self.weights, "top_k": self.top_k}

    @property
    def expert_type(self) -> pa.DataType:
        return pa.uint8() if self.expert == "uint8" else pa.uint16()

    @property
    def weight_type(self) -> pa.DataType:
        return {"fp32": pa.float32(), "fp16": pa.uint32(), "u8": pa.uint8()}[self.weights]

    @property
    def delta_coded(self) -> bool:
        """Whether weight columns hold integer codes that a row may store as differences between ranks."""
        return self.weights != "fp32"

    def schema(self) -> pa.Schema:
        fields = [
            pa.field("step", pa.int32(), nullable=False),
            pa.field("sequence", pa.int64(), nullable=False),
            pa.field("position", pa.int32(), nullable=False),
            pa.field("token_id", pa.int32(), nullable=False),
            pa.field("phase", pa.int8(), nullable=False),  # index into schema.PHASES
            pa.field("layer", pa.int16(), nullable=False),
            pa.field("dropped", pa.bool_(), nullable=False),
            pa.field("choices", pa.int8(), nullable=False),  # how many of the K choice columns this row uses
        ]
        fields += [pa.field(f"expert_{i}", self.expert_type, nullable=False) for i in range(self.top_k)]
        # Nullable: an engine import without gate weights stores null (a hook's missing weight is NaN).
        fields += [pa.field(f"weight_{i}", self.weight_type) for i in range(self.top_k)]
        # null: choice i has rank i (the router's output was in rank order, as the writer makes it)
        fields.append(pa.field("k", pa.list_(pa.int8())))
        if self.delta_coded:
            # true: weight_i holds code_i - code_{i+1} (the last used choice its code), see _delta_code
            fields.append(pa.field("weight_delta", pa.bool_(), nullable=False))
        if self.weights == "u8":
            fields += [
                pa.field("weight_offset", pa.float32(), nullable=False),
                pa.field("weight_scale", pa.float32(), nullable=False),
            ]
        return pa.schema(fields)

    # -- writing ------------------------------------------------------------------------------------
    def check_experts(self, experts: np.ndarray) -> None:
        limit = 1 << self.expert_type.bit_width
        if experts.size and (int(experts.min()) < 0 or int(experts.max()) >= limit):
            raise ValueError(
                f"expert id out of range for the trace ({int(experts.min())}..{int(experts.max())}, "
                f"the trace stores 0..{limit - 1})"
            )

    def encode_tokens(
        self,
        token_columns: dict[str, np.ndarray],
        experts: np.ndarray,
        weights: np.ndarray,
        choices: np.ndarray | None = None,
        k: np.ndarray | None = None,
        checked: bool = False,
        weight_valid: np.ndarray | None = None,
    ) -> pa.Table:
        """Build the stored table from per-token arrays and (tokens, k) experts and weights.

        ``phase`` is given as int8 codes. ``choices`` (per token) says how many leading columns of a row are
        real, when rows are padded; ``k`` (tokens, k) gives explicit ranks. Expert ids outside the encoding's
        range are refused, never wrapped (``checked``: the caller has already checked them).
        ``weight_valid`` (tokens, k) marks the weights that exist; the others are stored as null.
        """
        tokens, width = experts.shape
        if width > self.top_k:
            raise ValueError(f"{width} choices per token, the trace stores at most {self.top_k} (its layers' top-k)")
        if not checked:
            self.check_experts(experts)
        columns: dict[str, Any] = {name: token_columns[name] for name in TOKEN_COLUMNS}
        columns["choices"] = np.full(tokens, width, np.int8) if choices is None else choices.astype(np.int8, copy=False)
        expert_dtype = self.expert_type.to_pandas_dtype()
        # Cast and transpose in one pass each: column i of the stored table is row i of these.
        by_rank = np.ascontiguousarray(experts.T, dtype=expert_dtype)
        w = np.ascontiguousarray(weights.T, dtype=np.float32)
        null = None
        if weight_valid is not None and not weight_valid.all():
            null = np.ascontiguousarray(~weight_valid.T)
            w[null] = np.nan  # left out of the u8 range; stored as null below
        if self.weights == "fp16":
            round_to_half_mantissa(w)
            w = half_codes(w, out=w.view(np.uint32))  # w is this function's own array (or the caller's to give)
        elif self.weights == "u8":
            w, offset, scale = _quantize_u8(w)
            columns["weight_offset"] = np.full(tokens, offset, np.float32)
            columns["weight_scale"] = np.full(tokens, scale, np.float32)
        if self.delta_coded:
            used = np.full(tokens, width, np.int64) if choices is None else choices.astype(np.int64)
            w, columns["weight_delta"] = _delta_code(w, used, null, in_place=True)
        for i in range(self.top_k):
            if i < width:
                columns[f"expert_{i}"] = by_rank[i]
                columns[f"weight_{i}"] = w[i] if null is None else pa.array(w[i], mask=null[i])
            else:  # a layer with fewer choices than the trace's K: padding that `choices` masks out
                columns[f"expert_{i}"] = np.zeros(tokens, expert_dtype)
                columns[f"weight_{i}"] = np.zeros(tokens, w.dtype)
        if k is None:
            columns["k"] = pa.nulls(tokens, pa.list_(pa.int8()))
        else:
            offsets = pa.array(np.arange(0, tokens * width + 1, width, dtype=np.int32))
            columns["k"] = pa.ListArray.from_arrays(offsets, pa.array(k.reshape(-1).astype(np.int8)))
        schema = self.schema()
        return pa.table([columns[f.name] for f in schema], schema=schema)

    def encode_logical(self, table: pa.Table) -> pa.Table:
        """Logical routing rows (one per decision, schema.ROUTING) -> stored rows, exactly reversible.

        Consecutive rows belong to one token while the per-token columns stay equal and ``k`` counts up by
        one; tokens with fewer choices than the widest are padded (``choices``); a token whose choices do
        not run 0, 1, 2... keeps explicit ranks.
        """
        table = table.cast(ROUTING)
        n = table.num_rows
        cols = {name: table.column(name).to_numpy() for name in ROUTING.names if name != "phase"}
        import pyarrow.compute as pc  # here, not at the top: 30 ms of every report's start (issue 14)

        phase = pc.index_in(table.column("phase"), value_set=pa.array(PHASES))
        if phase.null_count:
            raise ValueError(f"phase must be one of {', '.join(PHASES)}")
        cols["phase"] = phase.to_numpy(zero_copy_only=False).astype(np.int8)
        k = cols["k"]
        starts = np.ones(n, bool)
        if n > 1:
            same = np.ones(n - 1, bool)
            for name in TOKEN_COLUMNS:
                same &= cols[name][1:] == cols[name][:-1]
            starts[1:] = ~(same & (k[1:] == k[:-1] + 1))
        first = np.flatnonzero(starts)
        lengths = np.diff(np.append(first, n))
        width = int(lengths.max()) if n else 1
        row = np.repeat(np.arange(len(first)), lengths)
        col = np.arange(n) - np.repeat(first, lengths)
        experts = np.zeros((len(first), width), np.int64)
        weights = np.zeros((len(first), width), np.float32)
        experts[row, col] = cols["expert"]
        weights[row, col] = cols["weight"]
        weight_valid = None
        if table.column("weight").null_count:
            weight_valid = np.ones((len(first), width), bool)
            weight_valid[row, col] = table.column("weight").is_valid().to_numpy(zero_copy_only=False)
        explicit = None
        if n and not np.array_equal(k, col):
            explicit = np.zeros((len(first), width), np.int8)
            explicit[row, col] = k
        token_columns = {name: cols[name][first] for name in TOKEN_COLUMNS}
        choices = None if (lengths == width).all() else lengths
        return self.encode_tokens(token_columns, experts, weights, choices, explicit, weight_valid=weight_valid)


# Elements per block of the element-wise passes below: their temporaries stay in the CPU cache and are
# recycled by the allocator, instead of whole-array temporaries that are fresh memory each call (page faults
# and memory bandwidth: measured 3-15x slower on the writer thread at prefill sizes, bench/writer_throughput.py).
_BLOCK = 1 << 15


def _blocks(n: int) -> range:
    return range(0, n, _BLOCK)


def round_to_half_mantissa(w: np.ndarray) -> None:
    """Round float32 values in place to 11 significant bits (half precision's mantissa), half to even.

    Integer arithmetic on the bit patterns: an order of magnitude faster than numpy's float16 casts, and no
    half-precision range limits (no overflow past 65,504, no subnormals below 6.1e-5). NaN and inf stay.
    """
    flat = w.reshape(-1)  # a view for the contiguous arrays the writer passes; a copy is written back below
    bits = flat.view(np.uint32)
    for start in _blocks(len(bits)):
        b = bits[start : start + _BLOCK]
        rounded = b >> np.uint32(13)
        rounded &= np.uint32(1)
        rounded += np.uint32(0x0FFF)
        rounded += b
        rounded &= np.uint32(0xFFFFE000)
        np.copyto(b, rounded, where=(b & np.uint32(0x7F800000)) != np.uint32(0x7F800000))
    if not np.shares_memory(flat, w):
        w[...] = flat.reshape(w.shape)


def half_codes(w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 values already rounded to 11 significant bits -> their 19-bit codes (sign, exponent, the 10
    mantissa bits that are left): the float32 bit pattern shifted right by 13. Codes of non-negative values
    rise with the value, so a row's codes in rank order never rise and their differences are small.

    ``out``: a contiguous uint32 array of w's shape to write the codes to (``w.view(np.uint32)`` itself: fresh
    memory costs more than the shift at prefill sizes)."""
    bits = np.ascontiguousarray(w).view(np.uint32).reshape(-1)
    if out is not None and (out.dtype != np.uint32 or out.shape != w.shape or not out.flags.c_contiguous):
        raise ValueError("half_codes: out must be a C-contiguous uint32 array of the input's shape")
    codes = np.empty(len(bits), np.uint32) if out is None else out.reshape(-1)
    for start in _blocks(len(bits)):
        b = bits[start : start + _BLOCK]
        out = codes[start : start + _BLOCK]
        # A NaN's payload may sit in the 13 bits shifted out: make it a quiet NaN that keeps one. (Found before
        # the shift: ``out`` may be ``w`` itself.)
        nan = ((b & np.uint32(0x7F800000)) == np.uint32(0x7F800000)) & ((b & np.uint32(0x007FFFFF)) != 0)
        np.right_shift(b, np.uint32(13), out=out)
        if nan.any():
            out[nan] = np.uint32(0x7FC00000 >> 13)
    return codes.reshape(w.shape)


def half_values(codes: np.ndarray) -> np.ndarray:
    """19-bit codes -> float32 values (the inverse of :func:`half_codes`)."""
    return (codes.astype(np.uint32) << np.uint32(13)).view(np.float32)


def _delta_code(codes: np.ndarray, used: np.ndarray, null: np.ndarray | None, in_place: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(choices, tokens) weight codes in rank order -> the stored codes and the per-token ``weight_delta`` flag.

    A token whose used codes never rise along the ranks (the usual case: non-negative weights ranked by size)
    stores code_i - code_{i+1} for each used choice but the last, which keeps its code; unused choices 0. The
    differences between neighbouring ranks are small numbers that zstd codes in fewer bits than the codes
    (bench/trace_bytes.py). Any other token (a missing, negative or NaN weight out of order) stores its codes.
    Exact both ways: a reader adds the stored values from choice i to the last. ``in_place``: the fast path
    writes the stored codes over ``codes`` (the writer's own array: no fresh memory).
    """
    width, tokens = codes.shape
    if width == 1:
        return codes, np.ones(tokens, bool)
    if null is None and bool((used == width).all()):
        # Fast path: every row uses every column (the capture pipeline's batches), block by block of tokens.
        ok = np.empty(tokens, bool)
        delta = codes if in_place else np.empty_like(codes)
        for start in _blocks(tokens):
            c = codes[:, start : start + _BLOCK]
            d = delta[:, start : start + _BLOCK]
            block_ok = ok[start : start + _BLOCK]
            np.logical_and.reduce(c[:-1] >= c[1:], axis=0, out=block_ok)
            rising = None if block_ok.all() else ~block_ok
            kept = c[:, rising] if rising is not None else None  # a copy: those rows keep their codes
            for i in range(width - 1):  # row i before row i + 1 is overwritten: safe in place
                np.subtract(c[i], c[i + 1], out=d[i])  # wraps where a code rises; restored below
            if not in_place:
                d[-1] = c[-1]
            if rising is not None:
                d[:, rising] = kept
        return delta, ok
    position = np.arange(width)[:, None]
    inside = position < used[None, :]
    signed = codes.astype(np.int64)
    ok = np.asarray(((signed[:-1] >= signed[1:]) | ~inside[1:]).all(axis=0))
    if null is not None:
        ok &= ~(null & inside).any(axis=0)
    following = np.zeros_like(signed)
    following[:-1] = signed[1:]
    last = position == used[None, :] - 1
    delta = np.where(inside & ~last, signed - following, np.where(inside, signed, 0))
    return np.where(ok[None, :], delta, signed).astype(codes.dtype), ok


def _undelta(stored: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """(tokens, K) stored codes and the per-token flag -> the codes (sums from each choice to the last)."""
    summed = np.cumsum(stored[:, ::-1].astype(np.int64), axis=1)[:, ::-1]
    return np.where(delta[:, None], summed, stored)


def _quantize_u8(w: np.ndarray) -> tuple[np.ndarray, float, float]:
    missing = np.isnan(w)
    if np.isinf(w).any():
        raise ValueError("infinite gate weight cannot be stored with weights='u8'")
    present = w[~missing]
    # The range always holds 0 (absmax-style, like int8 weight quantisation): measured 1.47 against 1.64 bytes per
    # decision with the segment's min..max on DeepSeek-V3-shaped weights (all in 0.27..0.41, so min..max was 2.9x
    # finer there); on weights that reach 0 (softmax routers) the two are the same quantiser. bench/trace_layouts.py.
    low = min(0.0, float(present.min())) if present.size else 0.0
    high = max(0.0, float(present.max())) if present.size else 0.0
    scale = np.float32((high - low) / _U8_STEPS).item()
    low = np.float32(low).item()
    q = np.rint((w - low) / scale) if scale > 0 else np.zeros(w.shape, np.float32)
    q = np.where(missing, U8_MISSING, np.clip(q, 0, _U8_STEPS)).astype(np.uint8)
    return q, low, scale


def decode(stored: pa.Table, encoding: RoutingEncoding, columns: list[str]) -> pa.Table:
    """Stored v2 rows -> the logical columns asked for, in token order then rank (pyarrow and numpy only;
    DuckDB reads through ``routing_select``)."""
    K = encoding.top_k
    choices = stored.column("choices").to_numpy()
    use = np.arange(K)[None, :] < choices[:, None]  # (tokens, K): which choice columns are real
    parent = pa.array(np.repeat(np.arange(stored.num_rows), choices.astype(np.int64)))

    def matrix(prefix: str) -> np.ndarray:
        return np.stack([stored.column(f"{prefix}_{i}").to_numpy() for i in range(K)], axis=1)

    out: dict[str, Any] = {}
    for name in columns:
        if name in ("step", "sequence", "position", "token_id", "layer", "dropped"):
            out[name] = stored.column(name).take(parent)
        elif name == "phase":
            codes = stored.column("phase").take(parent).combine_chunks()
            out[name] = pa.DictionaryArray.from_arrays(codes, pa.array(PHASES)).cast(pa.string())
        elif name == "expert":
            out[name] = pa.array(matrix("expert")[use].astype(np.int16))
        elif name == "weight":
            present = np.stack([stored.column(f"weight_{i}").is_valid().to_numpy(zero_copy_only=False) for i in range(K)], axis=1)[use]
            values = np.stack([stored.column(f"weight_{i}").fill_null(0).to_numpy() for i in range(K)], axis=1)
            if encoding.delta_coded:
                values = _undelta(values, stored.column("weight_delta").to_numpy(zero_copy_only=False))
            values = values[use]
            if encoding.weights == "fp16":
                values = half_values(values)
            elif encoding.weights == "u8":
                offset = np.repeat(stored.column("weight_offset").to_numpy(), choices)
                scale = np.repeat(stored.column("weight_scale").to_numpy(), choices)
                real = (offset + values.astype(np.float32) * scale).astype(np.float32)
                real[values == U8_MISSING] = np.nan
                values = real
            out[name] = pa.array(values.astype(np.float32, copy=False), mask=None if present.all() else ~present)
        elif name == "k":
            k = np.broadcast_to(np.arange(K, dtype=np.int8), use.shape)[use].copy()
            given = stored.column("k").combine_chunks()
            if given.null_count < len(given):
                # Explicit ranks: each present list holds at least `choices` values (padding after them).
                has = ~given.is_null().to_numpy(zero_copy_only=False)
                values = given.flatten().to_numpy()
                import pyarrow.compute as pc

                owner = pc.list_parent_indices(given).to_numpy()
                starts = given.offsets.to_numpy()[:-1]
                used = (np.arange(len(values)) - starts[owner]) < choices[owner]
                k[np.repeat(has, choices)] = values[used]
            out[name] = pa.array(k)
    return pa.table([out[c] for c in columns], names=columns)


def routing_select(files_sql: str, encoding: RoutingEncoding, rank: int, full_rank: bool = False) -> str:
    """The DuckDB SELECT that turns stored v2 rows into the logical routing view (plus ``rank``).

    One branch per choice column, glued with UNION ALL: measured faster than UNNEST over lists of the K
    columns (filters and projections reach each Parquet scan), at the price of rows coming rank by rank.
    A weight's code is computed once per branch (inner SELECT); DuckDB drops it when a query does not ask
    for ``weight``. ``full_rank``: every row of these files uses all K columns in rank order (the reader
    checked their footers), so no branch filters on ``choices`` or looks up an explicit rank.
    """
    phase = phase_sql()
    source = stored_source(files_sql)
    branches = []
    for i in range(encoding.top_k):
        where = "" if full_rank else f" WHERE choices > {i}"
        rank_sql, expert_sql = choice_sql(i, full_rank)
        rows = f"(SELECT *, {_code_sql(encoding, i)} AS weight_code_ FROM {source}{where})"
        branches.append(
            f"SELECT step, sequence, position, token_id, {phase} AS phase, layer, "
            f"{rank_sql} AS k, {expert_sql} AS expert, "
            f"{_weight_sql(encoding)} AS weight, dropped, CAST({rank} AS INTEGER) AS rank FROM {rows}"
        )
    return " UNION ALL ".join(branches)


def stored_source(files_sql: str) -> str:
    """The DuckDB scan of stored v2 routing files (the logical view's source and the contract check's)."""
    return f"read_parquet([{files_sql}], hive_partitioning = false, union_by_name = false)"


def phase_sql() -> str:
    """SQL for the logical ``phase`` of a stored row (NULL for a code that names no phase)."""
    return "CAST(CASE phase " + " ".join(f"WHEN {i} THEN '{name}'" for i, name in enumerate(PHASES)) + " END AS VARCHAR)"


def choice_sql(i: int, full_rank: bool) -> tuple[str, str]:
    """SQL for the logical ``k`` and ``expert`` of choice column i of a stored row (routing_select's branch i)."""
    rank_sql = f"CAST({i} AS TINYINT)" if full_rank else f"CAST(coalesce(k[{i + 1}], {i}) AS TINYINT)"
    return rank_sql, f"CAST(expert_{i} AS SMALLINT)"


def choice_used_sql(i: int, full_rank: bool) -> str:
    """SQL that is true where choice column i of a stored row is a logical row (routing_select's branch filter)."""
    return "true" if full_rank else f"coalesce(choices > {i}, false)"


def _code_sql(encoding: RoutingEncoding, i: int) -> str:
    """SQL for choice i's stored weight code: the sum of the stored values from choice i on in delta-coded
    rows (see _delta_code), the stored value itself otherwise. fp32 stores the weight itself."""
    if not encoding.delta_coded:
        return f"weight_{i}"
    summed = " + ".join(f"CAST(weight_{j} AS BIGINT)" for j in range(i, encoding.top_k))
    return f"CASE WHEN weight_delta THEN {summed} ELSE CAST(weight_{i} AS BIGINT) END"


def _weight_sql(encoding: RoutingEncoding) -> str:
    """SQL for the gate weight from ``weight_code_`` (exactly what half_values and decode compute)."""
    c = "weight_code_"
    if encoding.weights == "fp32":
        return c
    if encoding.weights == "u8":
        return f"CASE WHEN {c} = {U8_MISSING} THEN CAST('nan' AS FLOAT) ELSE CAST(weight_offset + {c} * weight_scale AS FLOAT) END"
    # fp16 codes: sign bit, 8 exponent bits, 10 mantissa bits of a float32 (half_codes). The product is exact
    # in DOUBLE (11 significant bits times a power of two) and so is its cast to FLOAT.
    sign, exponent, mantissa = f"({c} >> 18)", f"(({c} >> 10) & 255)", f"({c} & 1023)"
    return (
        f"CASE WHEN {exponent} = 255 THEN (CASE WHEN {mantissa} <> 0 THEN CAST('nan' AS FLOAT) "
        f"WHEN {sign} = 1 THEN CAST('-inf' AS FLOAT) ELSE CAST('inf' AS FLOAT) END) "
        f"ELSE CAST((1 - 2 * {sign}) * ((CASE WHEN {exponent} = 0 THEN 0 ELSE 1024 END) + {mantissa}) "
        f"* pow(2.0, greatest({exponent}, 1) - 137) AS FLOAT) END"
    )
