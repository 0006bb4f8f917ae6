-- One row per (step, layer): the busiest expert's load, the step's token count and its MaxVio_batch.
WITH per_step AS (
    SELECT step, layer, max(n) AS top, sum(n) AS total
    FROM {agg}
    GROUP BY ALL
)
SELECT p.step, p.layer, p.top, p.total,
       p.total // m.top_k AS tokens,
       p.top * m.experts / p.total - 1 AS maxvio
FROM per_step AS p
JOIN {meta} AS m USING (layer)
