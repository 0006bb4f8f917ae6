-- First choices (k = 0) per layer and expert: the load a top-1 view of the router would see.
SELECT layer, expert, count(*)::BIGINT AS n
FROM {routing} AS r
WHERE k = 0
GROUP BY ALL
