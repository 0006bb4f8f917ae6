-- How a layer's block time tracks its step's busiest expert: Pearson r and the least-squares slope
-- (ms per assignment) of block_ms against the max expert load of the same step and layer.
SELECT l.layer,
       count(*) AS n,
       corr(l.block_ms, s.top) AS r,
       regr_slope(l.block_ms, s.top) AS slope
FROM {latency} AS l
JOIN {steps_load} AS s ON s.step = l.step AND s.layer = l.layer
WHERE l.block_ms IS NOT NULL
GROUP BY l.layer
ORDER BY l.layer
