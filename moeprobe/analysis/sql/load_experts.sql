-- Whole-window load of every (layer, expert) that received something; experts absent here have load 0.
SELECT layer, expert, sum(n)::BIGINT AS n
FROM {agg}
GROUP BY ALL
ORDER BY layer, expert
