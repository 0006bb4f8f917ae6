-- Load per window of consecutive steps, counted from the first step kept by the filters.
SELECT (step - {start}) // {size} AS win, layer, expert, sum(n)::BIGINT AS n
FROM {agg}
GROUP BY ALL
ORDER BY ALL
