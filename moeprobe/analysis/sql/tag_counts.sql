-- Assignments per (tag value, layer, expert) for the tag keys asked for. Routing is summed per sequence first,
-- so the join with tags runs on one row per sequence x layer x expert rather than one per decision.
WITH per_sequence AS (
    SELECT rank, sequence, layer, expert, count(*) AS n
    FROM {routing} AS r
    GROUP BY ALL
)
SELECT t.key, t.value, p.layer, p.expert, sum(p.n)::BIGINT AS n
FROM per_sequence AS p
JOIN tags AS t ON t.rank = p.rank AND t.sequence = p.sequence
WHERE t.key IN ({keys})
GROUP BY ALL
ORDER BY ALL
