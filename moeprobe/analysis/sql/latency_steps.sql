-- Time spent in MoE blocks per forward call (summed over layers): p50, p90, p99 and max, and the clocks used.
WITH per_step AS (
    SELECT rank, step, sum(block_ms) AS moe_ms, sum(router_ms) AS router_ms
    FROM {latency}
    GROUP BY ALL
)
SELECT count(*) AS steps,
       quantile_cont(moe_ms, 0.5) AS moe_p50,
       quantile_cont(moe_ms, 0.9) AS moe_p90,
       quantile_cont(moe_ms, 0.99) AS moe_p99,
       max(moe_ms) AS moe_max,
       quantile_cont(router_ms, 0.5) AS router_p50,
       (SELECT string_agg(DISTINCT clock, ',' ORDER BY clock) FROM {latency}) AS clocks
FROM per_step
