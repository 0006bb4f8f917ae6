-- Per step and layer, the load of each EP rank (the placement maps each expert to a rank); balancedness is mean / max
-- over the EP ranks, ranks that received nothing counting as 0 in the mean.
WITH per_rank AS (
    SELECT a.step, a.layer, {ep_of_expert} AS ep, sum(a.n) AS n
    FROM {agg} AS a
    JOIN {meta} AS m USING (layer)
    GROUP BY ALL
), per_layer AS (
    SELECT step, layer, sum(n) / {ep_size} AS mean, max(n) AS top
    FROM per_rank
    GROUP BY ALL
)
SELECT step, layer, mean, top FROM per_layer
