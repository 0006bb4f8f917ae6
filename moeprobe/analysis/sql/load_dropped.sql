-- Choices dropped over capacity, per layer and expert. Parquet statistics skip every row group without a drop,
-- so on a trace that has none this reads almost nothing.
SELECT layer, expert, count(*)::BIGINT AS dropped
FROM {routing} AS r
WHERE dropped
GROUP BY ALL
ORDER BY layer, expert
