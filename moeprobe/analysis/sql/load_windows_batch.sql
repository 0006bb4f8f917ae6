-- Mean MaxVio_batch per window and layer, same windows as load_windows.sql.
SELECT (step - {start}) // {size} AS win, layer, avg(maxvio) AS maxvio_batch,
       min(step) AS first_step, max(step) AS last_step
FROM {steps_load}
GROUP BY ALL
ORDER BY ALL
