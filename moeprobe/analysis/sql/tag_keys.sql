-- Tag keys and how many distinct values and sequences each has.
SELECT key, count(DISTINCT value) AS n_values, count(*) AS sequences
FROM tags
GROUP BY key
ORDER BY key
