"""The trace-facing layer of the balancing lab: read routing, scores and bias from a ``Trace`` with DuckDB into
numpy, run strategies, and write a simulated routing back as a new trace.

Everything else in ``moeprobe.simulate`` is pure numpy; this module is the only one that knows about
traces, and it raises ``TraceError`` subclasses (one line, exit status 1 in the CLI) for what a trace lacks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..traces.errors import CorruptSegmentError, TraceError, TraceExistsError
from .data import BiasHistory, LayerData, SimRouting
from .deployment import Window
from .strategies import Strategy, run_strategy

if TYPE_CHECKING:
    import pyarrow as pa

    from ..analysis.session import Trace

RECORD_SCORES_HINT = "record it again with `moeprobe record --logits` to capture router scores"


class MissingDataError(TraceError):
    """The trace lacks what a strategy needs (router scores, bias) or the selection holds no routing."""


@dataclass
class ReplayInput:
    trace: Trace
    layers: list[LayerData]
    window: Window
    notes: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return int(self.trace.manifest.get("world_size", 1))


# -- reading ------------------------------------------------------------------------------------------
def _where(window: Window, layers: list[int] | None, step_column: str = "step") -> tuple[str, list[Any]]:
    clauses, params = [], []
    if window[0] is not None:
        clauses.append(f"{step_column} >= ?")
        params.append(window[0])
    if window[1] is not None:
        clauses.append(f"{step_column} < ?")
        params.append(window[1])
    if layers is not None:
        clauses.append(f"layer IN ({', '.join('?' for _ in layers)})")
        params.extend(layers)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def _column(table: pa.Table, name: str, dtype: type) -> np.ndarray:
    return np.asarray(table.column(name).to_numpy().astype(dtype, copy=False))


def _check_routing_contract(trace: Trace, table: pa.Table) -> None:
    """The replay uses every decision, so a row that breaks the routing table's contract is refused, named.

    (The report leaves such rows out and counts them; a replay without them would simulate a different run.)
    """
    for name in table.column_names:
        if name == "weight":
            continue  # nullable: engine imports carry expert ids only (a NULL weight reads as NaN, "not recorded")
        nulls = table.column(name).null_count
        if nulls:
            raise CorruptSegmentError(f"{trace.path}: routing has {nulls:,} NULL values in column {name!r}, which may not be NULL")
    import pyarrow.compute as pc

    lowest = pc.min(table.column("step")).as_py()
    if lowest is not None and lowest < 0:
        raise CorruptSegmentError(f"{trace.path}: routing rows with a negative step ({lowest})")


def _load_routing(trace: Trace, window: Window, layers: list[int] | None) -> pa.Table:
    where, params = _where(window, layers)
    return trace.sql(
        "SELECT layer, rank, step, sequence, position, token_id, CAST(phase = 'decode' AS TINYINT) AS phase, "
        f"k, expert, weight, dropped FROM routing{where} ORDER BY layer, rank, step, sequence, position, k",
        params,
    )


def _token_keys(table: pa.Table) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Columns per routing row and each row's token number (rows are sorted by token, then k)."""
    cols = {
        name: _column(table, name, np.int64)
        for name in ("layer", "rank", "step", "sequence", "position", "token_id", "phase", "k", "expert")
    }
    n = len(cols["layer"])
    new = np.zeros(n, dtype=bool)
    new[:1] = True
    for name in ("layer", "rank", "step", "sequence", "position"):
        new[1:] |= cols[name][1:] != cols[name][:-1]
    return cols, np.cumsum(new) - 1


def _list_matrix(column: pa.ChunkedArray | pa.Array, rows: int, width: int) -> np.ndarray:
    """A list<float> column whose non-null rows all have ``width`` values, as (non-null rows, width) float32."""
    if hasattr(column, "combine_chunks"):
        column = column.combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(values.astype(np.float32, copy=False).reshape(rows, width))


def _load_scores(trace: Trace, window: Window, layers: list[int] | None, tokens: int) -> np.ndarray | None:
    """Scores aligned with the routing's tokens (same order); NaN rows where a token has none."""
    where, params = _where(window, layers)
    count = trace.sql("SELECT count(*) AS n FROM scores").column("n")[0].as_py()
    if not count:
        return None
    table = trace.sql(
        f"WITH t AS (SELECT DISTINCT layer, rank, step, sequence, position FROM routing{where}) "
        "SELECT t.layer, len(s.scores) AS width, s.scores FROM t LEFT JOIN scores s "
        "USING (layer, rank, step, sequence, position) ORDER BY t.layer, t.rank, t.step, t.sequence, t.position",
        params,
    )
    if table.num_rows != tokens:
        raise CorruptSegmentError(
            f"{trace.path}: the scores table has more than one row for some tokens ({table.num_rows} rows for {tokens} tokens)"
        )
    widths = table.column("width").to_numpy(zero_copy_only=False)
    present = ~np.isnan(widths.astype(np.float64))
    if not present.any():
        return None
    width = int(np.nanmax(widths.astype(np.float64)))
    if (widths[present] != width).any():
        raise CorruptSegmentError(f"{trace.path}: scores rows of one trace have different lengths")
    scores = np.full((tokens, width), np.nan, dtype=np.float32)
    scores[present] = _list_matrix(table.column("scores"), int(present.sum()), width)
    return scores


def _load_bias(trace: Trace, layers: list[int] | None) -> dict[int, BiasHistory]:
    # No step filter: the bias in effect at the window's first step may have been set before it.
    where, params = _where((None, None), layers)
    table = trace.sql(f"SELECT layer, rank, step, bias FROM bias{where} ORDER BY layer, rank, step", params)
    if not table.num_rows:
        return {}
    layer_col = _column(table, "layer", np.int64)
    out = {}
    for layer in np.unique(layer_col):
        rows = np.flatnonzero(layer_col == layer)
        part = table.take(rows)
        widths = set(part.column("bias").combine_chunks().value_lengths().to_pylist())
        if len(widths) != 1:
            raise CorruptSegmentError(f"{trace.path}: bias rows of layer {layer} have different lengths")
        out[int(layer)] = BiasHistory(
            rank=_column(part, "rank", np.int64),
            steps=_column(part, "step", np.int64),
            bias=_list_matrix(part.column("bias"), len(rows), widths.pop()),
        )
    return out


def load_layers(
    trace: Trace, *, window: Window = (None, None), layers: list[int] | None = None, scores: bool = False
) -> ReplayInput:
    """Read the selected steps and layers of ``trace`` into one ``LayerData`` per MoE layer.

    With ``scores=True`` the captured router logits come too; tokens without them are left out (and said
    so in ``notes``), and a trace without any raises ``MissingDataError``.
    """
    metas = {int(meta["index"]): meta for meta in trace.layers}
    if layers is not None:
        unknown = sorted(set(layers) - set(metas))
        if unknown:
            raise MissingDataError(
                f"{trace.path}: no MoE layer {unknown[0]} (layers are {', '.join(map(str, sorted(metas)))})"
            )
    table = _load_routing(trace, window, layers)
    if not table.num_rows:
        what = "" if window == (None, None) else f" in steps {window_text(window)}"
        raise MissingDataError(f"{trace.path}: no routing recorded{what}")
    _check_routing_contract(trace, table)
    cols, token = _token_keys(table)
    tokens = int(token[-1]) + 1
    first = np.flatnonzero(np.r_[True, token[1:] != token[:-1]])  # first row of each token
    weights = _column(table, "weight", np.float32)
    dropped = table.column("dropped").to_numpy(zero_copy_only=False).astype(bool)
    logits = _load_scores(trace, window, layers, tokens) if scores else None
    if scores and logits is None:
        raise MissingDataError(f"{trace.path}: this trace has no router scores; {RECORD_SCORES_HINT}")
    bias = _load_bias(trace, layers)

    notes: list[str] = []
    token_layer = cols["layer"][first]
    out = []
    for layer in np.unique(token_layer):
        meta = metas.get(int(layer))
        if meta is None:
            raise MissingDataError(f"{trace.path}: routing rows for layer {layer}, which the manifest does not list")
        # Rows and tokens are sorted by layer first: each layer is one contiguous slice of both.
        tok = slice(*np.searchsorted(token_layer, [layer, layer + 1]))
        rows = slice(*np.searchsorted(cols["layer"], [layer, layer + 1]))
        # The replay indexes per-expert arrays by these ids: an id the manifest's expert count does not cover is
        # damaged data, to be named here rather than fail as an IndexError inside a strategy.
        ids = cols["expert"][rows]
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= int(meta["num_experts"])):
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise CorruptSegmentError(
                f"{trace.path}: routing rows for layer {layer} name expert {bad}, but the manifest gives that layer "
                f"{meta['num_experts']} experts"
            )
        data = _layer_data(meta, cols, token, first, tok, rows, weights, dropped)
        data.scores = None if logits is None else logits[tok]
        data.bias = bias.get(int(layer))
        if data.scores is not None:
            data = _only_scored(trace, data, notes)
        out.append(data)
    return ReplayInput(trace, out, window, notes)


def _layer_data(
    meta: dict[str, Any],
    cols: dict[str, np.ndarray],
    token: np.ndarray,
    first: np.ndarray,
    tok: slice,
    rows: slice,
    weights: np.ndarray,
    dropped: np.ndarray,
) -> LayerData:
    """One layer's tokens (``tok``) and routing rows (``rows``) as (T, k) arrays, -1 where a choice is missing."""
    k = cols["k"][rows]
    width = max(int(meta["top_k"]), int(k.max()) + 1)
    count = tok.stop - tok.start
    experts = np.full((count, width), -1, dtype=np.int32)
    w = np.zeros((count, width), dtype=np.float32)
    d = np.zeros((count, width), dtype=bool)
    local = token[rows] - tok.start
    experts[local, k] = cols["expert"][rows]
    w[local, k] = weights[rows]
    d[local, k] = dropped[rows]
    head = first[tok]
    return LayerData(
        index=int(meta["index"]),
        meta=meta,
        step=cols["step"][head],
        sequence=cols["sequence"][head],
        position=cols["position"][head],
        rank=cols["rank"][head],
        token_id=cols["token_id"][head],
        phase=cols["phase"][head].astype(np.int8),
        experts=experts,
        weights=w,
        dropped=d,
    )


def _only_scored(trace: Trace, data: LayerData, notes: list[str]) -> LayerData:
    """Keep the tokens that have router scores; say how many did not."""
    assert data.scores is not None
    if data.scores.shape[1] != data.num_experts:
        raise CorruptSegmentError(
            f"{trace.path}: layer {data.index} scores have {data.scores.shape[1]} values, "
            f"the manifest says {data.num_experts} experts"
        )
    have = ~np.isnan(data.scores).any(axis=1)
    if not have.any():
        raise MissingDataError(f"{trace.path}: layer {data.index} has no router scores; {RECORD_SCORES_HINT}")
    if have.all():
        return data
    notes.append(f"layer {data.index}: {int((~have).sum())} of {len(have)} tokens have no scores; left out")
    return data.subset(have)


def check_requirements(strategies: list[Strategy], data: ReplayInput) -> None:
    """Fail early, with the reason, when a strategy needs what the trace did not record."""
    for strategy in strategies:
        if strategy.needs_recorded_bias:
            missing = [layer.index for layer in data.layers if layer.bias is None]
            if missing:
                raise MissingDataError(
                    f"{data.trace.path}: strategy {strategy.text!r} needs the recorded router bias, "
                    f"which layer {missing[0]} does not have (only models with e_score_correction_bias record one)"
                )


def run(strategy: Strategy, data: ReplayInput) -> list[SimRouting]:
    return [run_strategy(strategy, layer) for layer in data.layers]


# -- writing ------------------------------------------------------------------------------------------
def _float_lists(rows: np.ndarray) -> pa.Array:
    """(N, E) float32 -> list<float32> without a Python loop over rows."""
    import pyarrow as pa

    rows = np.ascontiguousarray(rows, dtype=np.float32)
    offsets = np.arange(len(rows) + 1, dtype=np.int32) * np.int32(rows.shape[1])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(rows.reshape(-1)))


def scores_table(
    step: np.ndarray, sequence: np.ndarray, position: np.ndarray, layer: int, logits: np.ndarray
) -> pa.Table:
    """Rows of the scores table for one layer's tokens: what ``record --logits`` writes."""
    import pyarrow as pa

    from ..traces.schema import TABLES

    n = len(logits)
    return pa.table(
        {
            "step": np.broadcast_to(step, n).astype(np.int32),
            "sequence": np.broadcast_to(sequence, n).astype(np.int64),
            "position": np.broadcast_to(position, n).astype(np.int32),
            "layer": np.full(n, layer, dtype=np.int16),
            "scores": _float_lists(logits),
        },
        schema=TABLES["scores"],
    )


def bias_table(steps: np.ndarray, layer: int, bias: np.ndarray) -> pa.Table:
    """Rows of the bias table: ``bias[i]`` (E,) in effect from ``steps[i]`` on."""
    import pyarrow as pa

    from ..traces.schema import TABLES

    return pa.table(
        {
            "step": np.asarray(steps).astype(np.int32),
            "layer": np.full(len(steps), layer, dtype=np.int16),
            "bias": _float_lists(np.atleast_2d(bias)),
        },
        schema=TABLES["bias"],
    )


def _routing_rows(layer: LayerData, sim: SimRouting, rows: np.ndarray) -> pa.Table:
    import pyarrow as pa

    from ..traces.schema import PHASES, TABLES

    experts = sim.experts[rows]
    valid = experts >= 0
    token, rank = np.nonzero(valid)
    tok = rows[token]
    phases = np.asarray(PHASES, dtype=object)[layer.phase[tok]]
    return pa.table(
        {
            "step": layer.step[tok].astype(np.int32),
            "sequence": layer.sequence[tok].astype(np.int64),
            "position": layer.position[tok].astype(np.int32),
            "token_id": layer.token_id[tok].astype(np.int32),
            "phase": pa.array(phases, pa.string()),
            "layer": np.full(len(tok), layer.index, dtype=np.int16),
            "k": rank.astype(np.int8),
            "expert": experts[valid].astype(np.int16),
            "weight": sim.weights[rows][valid].astype(np.float32),
            "dropped": sim.dropped[rows][valid],
        },
        schema=TABLES["routing"],
    )


def write_simulated_trace(
    data: ReplayInput, sims: list[SimRouting], strategy: Strategy, out: Path, *, force: bool = False
) -> Path:
    """Write ``sims`` (one per layer of ``data``) as a new trace at ``out``.

    The manifest copies the source's model and layers (top_k updated when the strategy changed k) and
    says where it came from in ``options.simulated_from``. Steps and tags are copied for the selected
    steps; an evolved bias is written to the bias table; latency and scores are not (nothing was run).
    """
    from ..traces import ShardWriter, prepare_trace_dir

    source = data.trace
    if Path(out).resolve() == source.path.resolve():
        # --force would delete the source before its steps and tags are copied.
        raise TraceExistsError(f"{out}: is the trace being simulated; write the simulation somewhere else")
    manifest = source.manifest
    top_k = {layer.index: sim.top_k for layer, sim in zip(data.layers, sims, strict=True)}
    layers = [
        {**meta, "top_k": top_k.get(int(meta["index"]), meta["top_k"])}
        for meta in source.layers
        if int(meta["index"]) in top_k
    ]
    options = {
        "simulated_from": {
            "trace": str(source.path.resolve()),
            "strategy": strategy.text,
            "steps": window_text(data.window),
            "layers": sorted(top_k),
            "created_at": time.time(),
        },
        # Simulated weights are computed, not captured: keep them exact (the source's rounding is already in
        # the scores they came from), so that a simulated trace reads back what the simulator produced.
        "weights": "fp32",
    }
    prepare_trace_dir(out, force=force)
    ranks = sorted({int(r) for layer in data.layers for r in np.unique(layer.rank)})
    world_size = max(int(manifest.get("world_size", 1)), ranks[-1] + 1)
    # Rank 0 first: its writer owns manifest.json.
    for rank in ranks:
        writer = ShardWriter(out, model=dict(manifest["model"]), layers=layers, options=options, rank=rank, world_size=world_size)
        decisions = 0
        for layer, sim in zip(data.layers, sims, strict=True):
            rows = np.flatnonzero(layer.rank == rank)
            table = _routing_rows(layer, sim, rows)
            decisions += table.num_rows
            writer.append("routing", table)
            if sim.bias is not None and sim.bias_steps is not None:
                writer.append("bias", bias_table(sim.bias_steps, layer.index, sim.bias))
        where, params = _where(data.window, None)
        clause = (where + " AND" if where else " WHERE") + " rank = ?"
        steps = source.sql(f"SELECT step, phase, batch, tokens, started_at, wall_ms FROM steps{clause}", [*params, rank])
        writer.append("steps", steps)
        tags = source.sql("SELECT sequence, key, value FROM tags WHERE rank = ?", [rank])
        writer.append("tags", tags)
        first = data.layers[0]
        mine = first.rank == rank
        writer.counters["steps"] = int(len(np.unique(first.step[mine])))
        writer.counters["tokens"] = int(mine.sum())
        writer.counters["decisions"] = decisions
        writer.close("complete")
    return out


def window_text(window: Window) -> str:
    lo, hi = window
    return f"{'' if lo is None else lo}:{'' if hi is None else hi}"
