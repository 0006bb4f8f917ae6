-- Vocabulary specialization (OLMoE): per layer and token id, the share of the id's occurrences whose first
-- choice (k = 0, the layer's top-1) is its most common expert. Returned as a histogram over occurrence counts
-- (ids seen n times, and the sum of their shares) so that the random-routing baseline can use the same counts.
-- token_id -1 marks tokens fed as embeddings, which have no id.
WITH per_expert AS (
    SELECT layer, token_id, expert, count(*) AS n
    FROM {routing} AS r
    WHERE k = 0 AND token_id >= 0
    GROUP BY ALL
), per_id AS (
    SELECT layer, token_id, sum(n) AS occurrences, max(n) AS top
    FROM per_expert
    GROUP BY ALL
)
SELECT layer, occurrences, count(*) AS token_ids, sum(top / occurrences) AS share_sum
FROM per_id
GROUP BY ALL
ORDER BY layer, occurrences
