"""Which experts which inputs go to: expert distribution per tag value (e.g. domain) in the three normalisations
of docs/metrics.md, mutual information between expert and tag, and vocabulary specialization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import choices as choices_mod
from . import coactivation, repetition, stats, stored
from .context import Context
from .quoting import sql_literal
from .sampling import Sample, copy_if_made

# A tag with more values than this (a request id, a prompt hash) is not a category: its MI would be noise and
# its count table as large as the trace.
MAX_TAG_VALUES = 64


@dataclass(frozen=True)
class TagLayer:
    layer: int
    top_k: int
    counts: np.ndarray  # values x experts: assignments (every choice rank) of sequences with each value
    mi: stats.MutualInformation

    @property
    def share(self) -> np.ndarray:
        """Mixtral Fig. 7: an expert's share of all assignments within a value; uniform is 1/E."""
        totals = self.counts.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(totals > 0, self.counts / totals, np.nan)

    @property
    def olmoe(self) -> np.ndarray:
        """OLMoE: k x share, the share of the value's tokens that use the expert at all; uniform is k/E."""
        return self.share * self.top_k

    @property
    def relative_load(self) -> np.ndarray:
        """DeepSeek-V3: relative load c_e / c_bar within the value (E x share); uniform is 1."""
        return np.asarray(self.share * self.counts.shape[1])


@dataclass(frozen=True)
class TagSpecialization:
    key: str
    values: list[str]
    layers: list[TagLayer]

    def layer(self, index: int) -> TagLayer:
        return next(item for item in self.layers if item.layer == index)


@dataclass(frozen=True)
class TagKey:
    key: str
    values: int
    sequences: int


def tag_keys(ctx: Context) -> list[TagKey]:
    got = ctx.query("tag_keys")
    return [TagKey(str(k), int(v), int(s)) for k, v, s in zip(got["key"], got["n_values"], got["sequences"], strict=True)]


def by_tag(ctx: Context, keys: list[str], counts: Sample | None = None, *, source: str | None = None) -> list[TagSpecialization]:
    """Expert distribution and NMI per layer for each tag key in ``keys`` (sequences without the key are out),
    over the sequences of ``counts`` (a non-materialised sample) or all kept sequences. ``source``: the same
    decisions as a cheaper table expression (``choices.decisions_sql``)."""
    if not keys:
        return []
    extra = {"keys": ", ".join(sql_literal(k) for k in keys)}
    if source is not None:
        extra["routing"] = source
    elif counts is not None:
        extra["routing"] = counts.table
    got = ctx.query("tag_counts", **extra)
    out: list[TagSpecialization] = []
    for key in keys:
        sel = got["key"] == key
        values = sorted({str(v) for v in got["value"][sel]})
        if not values:
            continue
        ordered = np.array(values, dtype=object)
        layers: list[TagLayer] = []
        for layer in sorted(ctx.layers):
            mask = sel & (got["layer"] == layer)
            if not mask.any():
                continue
            table = np.zeros((len(values), ctx.experts(layer)), np.int64)
            experts = got["expert"][mask].astype(np.int64)
            ok = experts < table.shape[1]
            rows = np.searchsorted(ordered, got["value"][mask].astype(str).astype(object))
            np.add.at(table, (rows[ok], experts[ok]), got["n"][mask][ok].astype(np.int64))
            layers.append(TagLayer(layer, ctx.top_k(layer), table, stats.mutual_information(table)))
        out.append(TagSpecialization(key, values, layers))
    return out


@dataclass(frozen=True)
class VocabLayer:
    layer: int
    value: float  # mean over token ids seen >= min_count times of their top expert's share
    random: float  # the same for random routing with the same occurrence counts
    token_ids: int  # ids counted
    token_ids_below: int  # ids seen fewer than min_count times, left out


@dataclass(frozen=True)
class Vocabulary:
    min_count: int
    layers: list[VocabLayer]


def vocabulary(ctx: Context, *, min_count: int = 10, counts: Sample | None = None, source: str | None = None) -> Vocabulary:
    """OLMoE's vocabulary specialization per layer (first choices), with its random-routing baseline, over the
    sequences of ``counts`` or all kept sequences. ``source``: the same first choices as a cheaper table
    expression (``choices.first_choices_sql``)."""
    routing = source if source is not None else counts.table if counts is not None else None
    got = ctx.query("vocab", **({"routing": routing} if routing is not None else {}))
    layers: list[VocabLayer] = []
    for layer in sorted(ctx.layers):
        sel = got["layer"] == layer
        occ, ids, shares = got["occurrences"][sel], got["token_ids"][sel], got["share_sum"][sel]
        keep = occ >= min_count
        n_ids = int(ids[keep].sum())
        if not sel.any():
            continue
        layers.append(
            VocabLayer(
                layer=layer,
                value=float(shares[keep].sum() / n_ids) if n_ids else math.nan,
                random=stats.random_vocab_specialization(ctx.experts(layer), occ[keep], ids[keep]),
                token_ids=n_ids,
                token_ids_below=int(ids[~keep].sum()),
            )
        )
    return Vocabulary(min_count, layers)


@dataclass(frozen=True)
class Specialization:
    tags: list[TagSpecialization]
    tags_skipped: list[TagKey]  # keys with too many distinct values
    vocabulary: Vocabulary
    repetition: list[repetition.RepetitionLayer]
    coactivation: list[coactivation.CoactivationLayer]
    counts_sample: Sample  # what tags and vocabulary counted
    sample: Sample  # what repetition and co-activation joined

    def _repr_html_(self) -> str:  # Jupyter
        from .display import specialization_html

        return specialization_html(self)


def compute(
    ctx: Context,
    counts: Sample,
    sample: Sample,
    *,
    keys: list[str] | None = None,
    min_count: int = 10,
    max_values: int = MAX_TAG_VALUES,
) -> Specialization:
    """Every specialization analysis. ``counts`` (not materialised) feeds the count tables, ``sample`` (copied
    when a self-join needs its rows, see ``sampling.copied``) the self-joins. ``keys`` None means every tag key
    with at most ``max_values`` values."""
    # A trace within both budgets (or budgets that pick the same sequences): the count tables read the rows the
    # token-level sample already holds, about twice as fast as decoding the segments again: the token table
    # copied from the stored rows (format 2), else the sample's copy.
    # Otherwise, on a format-2 trace, the stored rows of the counted sequences: one scan instead of the view's K.
    found = choices_mod.choices(ctx, sample) if counts.predicate == sample.predicate else None
    tag_source = vocab_source = None
    if found is not None and found.stored:
        tag_source, vocab_source = choices_mod.decisions_sql(found), choices_mod.first_choices_sql(found)
    else:
        counts = counts.reading(copy_if_made(ctx, sample))
        if not counts.materialized:
            tag_source, vocab_source = stored.decisions_sql(ctx, counts.predicate), stored.first_choices_sql(ctx, counts.predicate)
    known = tag_keys(ctx)
    if keys is None:
        chosen = [t.key for t in known if t.values <= max_values]
        skipped = [t for t in known if t.values > max_values]
    else:
        chosen, skipped = keys, []
    return Specialization(
        tags=by_tag(ctx, chosen, counts, source=tag_source),
        tags_skipped=skipped,
        vocabulary=vocabulary(ctx, min_count=min_count, counts=counts, source=vocab_source),
        repetition=repetition.compute(ctx, sample),
        coactivation=coactivation.compute(ctx, sample),
        counts_sample=counts,
        sample=sample,
    )
