-- Consecutive-token repetition (Mixtral §5): token t and t+1 of the same sequence, in the same layer.
-- "first" compares first choices; "any" counts tokens whose expert set shares at least one expert with the
-- next token's (|S_t ∩ S_t+1| >= 1). Both count over the pairs whose two tokens are present.
WITH first_pairs AS (
    SELECT a.layer, count(*) AS pairs, count_if(a.expert = b.expert) AS first_same
    FROM {sample} AS a
    JOIN {sample} AS b
      ON b.rank = a.rank AND b.sequence = a.sequence AND b.layer = a.layer AND b.position = a.position + 1
    WHERE a.k = 0 AND b.k = 0
    GROUP BY a.layer
), overlapping AS (
    SELECT layer, count(*) AS any_same
    FROM (
        SELECT DISTINCT a.rank, a.sequence, a.layer, a.position
        FROM {sample} AS a
        JOIN {sample} AS b
          ON b.rank = a.rank AND b.sequence = a.sequence AND b.layer = a.layer
         AND b.position = a.position + 1 AND b.expert = a.expert
    )
    GROUP BY layer
)
SELECT f.layer, f.pairs, f.first_same, coalesce(o.any_same, 0) AS any_same
FROM first_pairs AS f
LEFT JOIN overlapping AS o USING (layer)
ORDER BY f.layer
