"""Where format 2's routing bytes go, and what other layouts and quantizers of the same data would cost.

Answers one question with numbers: can the DeepSeek-V3-shaped synthetic data (bench/dsv3.py, the data of
bench/trace_bytes.py) be stored in <= 1.5 bytes per routing decision with 8-bit weights, and how? The routing is
written through the real CapturePipeline and ShardWriter (weights u8, fp16 and fp32); every alternative below is
the SAME stored table with some columns replaced, written with the writer's own Parquet settings
(``writer._write_options``: zstd level 1, byte-stream-split expert and weight columns, ...), so the figures are
whole-trace bytes per decision, comparable with each other and with bench/trace_bytes.py:

- the layout as written, and per column group (expert ids, weights, the rest), and at higher zstd levels;
- choices sorted by expert id instead of by rank: ids as sorted values or as gaps, weight codes in id order,
  and the rank kept exactly, either as an explicit ``k`` list for the rows whose stored weights do not imply it
  (ties broken by column index) or by putting tied choices in rank order (gaps then taken modulo 256);
- today's layout with the top rank's weight difference replaced by the row's code sum (weights normalised
  by the router sum to a near-constant, so one code per row is almost implied by the others);
- other 8-bit quantizers of the same float32 weights (offset 0 instead of the segment's minimum, 7 bits),
  with the largest error each makes against the float32 weight;
- zeroth-order entropies per column, the estimate of what a lossless coder of these codes could reach.

    python bench/trace_layouts.py [--decode-steps 32]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.trace_bytes import record, workload  # noqa: E402
from moeprobe.traces.writer import _write_options  # noqa: E402


def stored_table(path: Path) -> pa.Table:
    files = sorted((path / "rank=0" / "routing").glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


def bytes_per_decision(table: pa.Table, decisions: int, level: int = 1) -> float:
    options = _write_options("routing", table.schema)
    options["compression_level"] = level
    buffer = io.BytesIO()
    pq.write_table(table, buffer, **options)
    return len(buffer.getvalue()) / decisions


def column_bytes(table: pa.Table, decisions: int, names: list[str]) -> float:
    """Compressed bytes per decision of some columns, from the footer of the table written as the writer would."""
    options = _write_options("routing", table.schema)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, **options)
    meta = pq.ParquetFile(io.BytesIO(buffer.getvalue())).metadata
    total = 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            column = group.column(c)
            if column.path_in_schema.split(".")[0] in names:
                total += column.total_compressed_size
    return total / decisions


def matrix(table: pa.Table, prefix: str, k: int) -> np.ndarray:
    return np.stack([table.column(f"{prefix}_{i}").to_numpy() for i in range(k)], axis=1).astype(np.int64)


def codes_of(table: pa.Table, k: int) -> np.ndarray:
    """(tokens, K) weight codes in rank order (the stored differences summed back, as the reader does)."""
    stored = matrix(table, "weight", k)
    delta = table.column("weight_delta").to_numpy(zero_copy_only=False)
    summed = np.cumsum(stored[:, ::-1], axis=1)[:, ::-1]
    return np.where(delta[:, None], summed, stored)


def with_columns(table: pa.Table, columns: dict[str, pa.Array | np.ndarray]) -> pa.Table:
    for name, values in columns.items():
        array = values if isinstance(values, pa.Array) else pa.array(values, type=table.schema.field(name).type)
        table = table.set_column(table.schema.get_field_index(name), name, array)
    return table


def implied_ranks(codes: np.ndarray) -> np.ndarray:
    """Rank of each column implied by its code: larger code first, equal codes by column index."""
    k = codes.shape[1]
    column = np.arange(k)[None, :]
    ranks = np.zeros_like(codes)
    for i in range(k):
        mine = codes[:, i : i + 1]
        ranks[:, i] = ((codes > mine) | ((codes == mine) & (column < i))).sum(axis=1)
    return ranks


def entropy(values: np.ndarray) -> float:
    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def by_expert_tables(table: pa.Table, codes: np.ndarray, k: int, code_type: np.dtype) -> tuple[dict[str, pa.Table], float]:
    """The table with each row's choices sorted by expert id (weights follow), in the variants measured; and
    the share of rows that need an explicit ``k`` list when ties are broken by column index."""
    experts = matrix(table, "expert", k)
    order = np.argsort(experts, axis=1, kind="stable")  # order[r, j]: the true rank of stored column j
    ids = np.take_along_axis(experts, order, axis=1)
    id_codes = np.take_along_axis(codes, order, axis=1)
    gaps = ids.copy()
    gaps[:, 1:] = ids[:, 1:] - ids[:, :-1]
    base = {f"weight_{i}": id_codes[:, i].astype(code_type) for i in range(k)}
    base["weight_delta"] = np.zeros(len(ids), bool)
    # Rows whose stored codes do not imply the true rank (tied codes, ties broken by column index) keep it.
    wrong = (implied_ranks(id_codes) != order).any(axis=1)
    offsets = pa.array(np.arange(0, len(ids) * k + 1, k, dtype=np.int32))
    explicit = pa.ListArray.from_arrays(offsets, pa.array(order.reshape(-1).astype(np.int8)), mask=pa.array(~wrong))
    out = {
        # Not exact (tied codes lose their rank): what the layout costs before it keeps the rank.
        "id gaps, ties NOT kept": with_columns(table, {**base, **{f"expert_{i}": gaps[:, i] for i in range(k)}}),
        "sorted ids, k list": with_columns(table, {**base, **{f"expert_{i}": ids[:, i] for i in range(k)}, "k": explicit}),
        "id gaps, k list": with_columns(table, {**base, **{f"expert_{i}": gaps[:, i] for i in range(k)}, "k": explicit}),
    }
    # Tied codes in rank order instead (a tie group sits where its smallest id would, members by rank): the
    # implied rank is then exact without a k list, and the ids of such rows are no longer ascending (gaps mod 256).
    group = np.where(id_codes[:, :, None] == id_codes[:, None, :], ids[:, None, :], 1 << 20).min(axis=2)
    tied_order = np.argsort(group * k + order, axis=1)
    ids2 = np.take_along_axis(ids, tied_order, axis=1)
    codes2 = np.take_along_axis(id_codes, tied_order, axis=1)
    assert (implied_ranks(codes2) == np.take_along_axis(order, tied_order, axis=1)).all()
    gaps2 = ids2.copy()
    gaps2[:, 1:] = (ids2[:, 1:] - ids2[:, :-1]) % 256
    out["id gaps mod 256, ties in rank order"] = with_columns(
        table,
        {
            **{f"expert_{i}": gaps2[:, i] for i in range(k)},
            **{f"weight_{i}": codes2[:, i].astype(code_type) for i in range(k)},
            "weight_delta": np.zeros(len(ids), bool),
        },
    )
    return out, float(wrong.mean())


def requantized(table: pa.Table, weights: np.ndarray, k: int, low: float, scale: float) -> tuple[pa.Table, float]:
    """The u8 table with the float32 weights (rank order) quantized as w = low + q * scale, q in 0..254,
    stored as differences between ranks as the writer does; and the largest error against the float32 weight."""
    q = np.clip(np.rint((weights - low) / scale), 0, 254).astype(np.int64)
    assert (q[:, :-1] >= q[:, 1:]).all()  # ranked weights: every row delta-codes
    stored = q.copy()
    stored[:, :-1] = q[:, :-1] - q[:, 1:]
    error = float(np.abs((np.float32(low) + q.astype(np.float32) * np.float32(scale)) - weights).max())
    columns: dict[str, pa.Array | np.ndarray] = {f"weight_{i}": stored[:, i].astype(np.uint8) for i in range(k)}
    columns["weight_offset"] = np.full(len(q), low, np.float32)
    columns["weight_scale"] = np.full(len(q), scale, np.float32)
    return with_columns(table, columns), error


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decode-steps", type=int, default=32)
    args = parser.parse_args()
    print("load average: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    steps = workload(args.decode_steps)
    decisions = sum(r.decisions for r, *_ in steps)
    out = Path(tempfile.mkdtemp(prefix="trace_layouts_"))
    rows: list[tuple[str, float, str]] = []
    try:
        tables = {}
        for weights in ("u8", "fp16", "fp32"):
            size, recorded = record(out / weights, steps, weights)
            assert recorded == decisions, (recorded, decisions)
            tables[weights] = stored_table(out / weights)
            rows.append((f"{weights}: as written by the capture pipeline", size / decisions, ""))
        k = sum(1 for name in tables["u8"].schema.names if name.startswith("expert_"))
        for weights in ("u8", "fp16"):
            table = tables[weights]
            assert table.column("k").null_count == len(table) and (table.column("choices").to_numpy() == k).all()
            experts = [f"expert_{i}" for i in range(k)]
            weight_columns = [f"weight_{i}" for i in range(k)] + ["weight_delta"]
            rest = [n for n in table.schema.names if n not in experts + weight_columns]
            rows.append((f"{weights}: rank order (today), written again", bytes_per_decision(table, decisions), ""))
            rows.append((f"{weights}:   of which expert ids", column_bytes(table, decisions, experts), ""))
            rows.append((f"{weights}:   of which weights", column_bytes(table, decisions, weight_columns), ""))
            rows.append((f"{weights}:   of which the rest", column_bytes(table, decisions, rest), ""))
            for level in (3, 9, 19):
                rows.append((f"{weights}: rank order, zstd level {level}", bytes_per_decision(table, decisions, level), ""))
            codes = codes_of(table, k)
            variants, needing = by_expert_tables(table, codes, k, np.dtype(np.uint8 if weights == "u8" else np.uint32))
            for name, variant in variants.items():
                note = f"{needing:.1%} of rows need k" if "k list" in name else ""
                rows.append((f"{weights}: by expert id, {name}", bytes_per_decision(variant, decisions), note))
            if weights == "u8":
                sums = codes.sum(axis=1)
                residual = ((sums - int(np.median(sums))) % 256).astype(np.uint8)
                summed = with_columns(table, {"weight_0": residual})
                rows.append(("u8: rank order, top rank's difference -> row code sum", bytes_per_decision(summed, decisions),
                             f"row sums span {int(sums.min())}..{int(sums.max())}"))
                ids_bits = sum(entropy(matrix(table, "expert", k)[:, i]) for i in range(k)) / k
                stored = matrix(table, "weight", k)
                delta_bits = [entropy(stored[:, i]) for i in range(k)]
                sum_bits = entropy(sums)
                print(f"u8 zeroth-order entropies, bits per decision: expert id by rank {ids_bits:.2f}; "
                      f"code {entropy(codes.reshape(-1)):.2f} (all ranks), by rank "
                      + " ".join(f"{entropy(codes[:, i]):.2f}" for i in range(k))
                      + f"; rank differences {sum(delta_bits) / k:.2f}; with the row sum for the top rank "
                      f"{(sum(delta_bits[1:]) + sum_bits) / k:.2f}")
                floor = (ids_bits + (sum(delta_bits[1:]) + sum_bits) / k) / 8
                print(f"u8 estimate for ids + weights at these codes (sum of the entropies above): {floor:.3f} B/decision")
                # Other quantizers of the same float32 weights (the fp32 trace, same rows in the same order).
                exact = np.stack([tables["fp32"].column(f"weight_{i}").to_numpy() for i in range(k)], axis=1)
                low, high = float(exact.min()), float(exact.max())
                for name, q_low, q_scale in (
                    ("segment min..max / 254 (today)", low, (high - low) / 254),
                    ("0..max / 254 (offset 0)", 0.0, high / 254),
                    ("min..max / 127 (7 bits)", low, (high - low) / 127),
                ):
                    variant, error = requantized(table, exact, k, np.float32(q_low).item(), np.float32(q_scale).item())
                    rows.append((f"u8 quantizer {name}", bytes_per_decision(variant, decisions), f"max abs error {error:.2e}"))
                print(f"float32 weights span {low:.4f}..{high:.4f}")
        print(f"{decisions:,} decisions (DeepSeek-V3 shape, bench/trace_bytes.py's data)")
        print(f"{'layout':62s} {'B/decision':>10s}")
        for name, value, note in rows:
            print(f"{name:62s} {value:10.3f}  {note}")
    finally:
        shutil.rmtree(out)
    print("load average: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
