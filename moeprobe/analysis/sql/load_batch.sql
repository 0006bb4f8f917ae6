-- MaxVio_batch per layer: mean and worst over steps (Wang et al. 2024 report the mean over steps).
SELECT layer,
       avg(maxvio) AS mean,
       max(maxvio) AS worst,
       arg_max(step, maxvio) AS worst_step,
       count(*) AS steps
FROM {steps_load}
GROUP BY layer
ORDER BY layer
