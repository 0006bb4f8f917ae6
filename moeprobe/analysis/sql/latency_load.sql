-- How a layer's block time tracks its step's busiest expert: Pearson r and the least-squares slope
-- (ms per assignment) of block_ms against the max expert load of the same step and layer, over all kept steps
-- (all_phases = 1) and per phase. Per phase matters: one prefill step is both the slowest and the busiest, so
-- over all steps r is close to 1 whatever the decode steps do.
WITH timed AS (
    SELECT l.layer, l.block_ms, s.top, coalesce(st.phase, 'unknown') AS phase
    FROM {latency} AS l
    JOIN {steps_load} AS s ON s.step = l.step AND s.layer = l.layer
    LEFT JOIN steps AS st ON st.rank = l.rank AND st.step = l.step
    WHERE l.block_ms IS NOT NULL
)
SELECT layer, phase, grouping(phase) AS all_phases,
       count(*) AS n,
       corr(block_ms, top) AS r,
       regr_slope(block_ms, top) AS slope
FROM timed
GROUP BY GROUPING SETS ((layer), (layer, phase))
ORDER BY layer, all_phases DESC, phase
