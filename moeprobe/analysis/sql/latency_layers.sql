-- Router and MoE block time per layer (milliseconds): p50, p90, p99 and max over the kept steps, for all
-- steps together (phase NULL, all_phases = 1) and per phase. The phase of a step comes from the steps table.
WITH timed AS (
    SELECT l.layer, l.router_ms, l.block_ms, coalesce(st.phase, 'unknown') AS phase
    FROM {latency} AS l
    LEFT JOIN steps AS st ON st.rank = l.rank AND st.step = l.step
)
SELECT layer, phase, grouping(phase) AS all_phases,
       count(router_ms) AS router_n,
       quantile_cont(router_ms, 0.5) AS router_p50,
       quantile_cont(router_ms, 0.9) AS router_p90,
       quantile_cont(router_ms, 0.99) AS router_p99,
       max(router_ms) AS router_max,
       count(block_ms) AS block_n,
       quantile_cont(block_ms, 0.5) AS block_p50,
       quantile_cont(block_ms, 0.9) AS block_p90,
       quantile_cont(block_ms, 0.99) AS block_p99,
       max(block_ms) AS block_max
FROM timed
GROUP BY GROUPING SETS ((layer), (layer, phase))
ORDER BY layer, all_phases DESC, phase
