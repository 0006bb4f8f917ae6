-- The load_agg.sql aggregate for a counts trace: the loads table already holds one row per step, layer and
-- expert (per rank); ranks run their step N together, so their counts add up in the same step.
SELECT step, layer, expert, sum(tokens)::BIGINT AS n
FROM {loads} AS l
GROUP BY ALL
