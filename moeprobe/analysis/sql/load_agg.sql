-- Expert load per step, layer and expert: the one pass over the routing table that the load metrics, the
-- EP-rank view, the windows and the latency correlation all reuse (materialised once per filters). Ranks run
-- their step N together, so their decisions add up in the same step. Dropped choices (over capacity) still
-- count: load is what the router asked of each expert. Only the count: every extra column read here costs
-- about a quarter more on 100 M rows, so first choices and drops have their own, cheaper queries.
SELECT step, layer, expert, count(*)::BIGINT AS n
FROM {routing} AS r
GROUP BY ALL
