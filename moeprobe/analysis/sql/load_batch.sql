-- MaxVio_batch per layer: mean and worst over steps (Wang et al. 2024 report the mean over steps). Of steps tied
-- for the worst, the earliest: arg_max alone picks whichever row comes first, which depends on how DuckDB's
-- threads (or a distributed merge) ordered the aggregate, and the report must not change between runs.
SELECT layer,
       avg(maxvio) AS mean,
       max(maxvio) AS worst,
       arg_max(step, {'maxvio': maxvio, 'earlier': -step}) AS worst_step,
       count(*) AS steps
FROM {steps_load}
GROUP BY layer
ORDER BY layer
