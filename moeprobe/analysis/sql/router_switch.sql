-- Switch Transformer auxiliary loss terms per (layer, expert): f = share of tokens whose first choice is the
-- expert, P = mean router probability; the loss is E * sum_i f_i P_i (alpha left out).
-- Only tokens that have logits count, so f and P describe the same tokens.
WITH probs AS (
    SELECT layer, i, avg(v) AS p
    FROM (SELECT layer, unnest(range(len(p))) AS i, unnest(p) AS v FROM {tokens})
    GROUP BY ALL
), firsts AS (
    SELECT r.layer, r.expert AS i, count(*) AS n
    FROM {sample} AS r
    SEMI JOIN {tokens} AS t
      ON t.rank = r.rank AND t.step = r.step AND t.sequence = r.sequence AND t.position = r.position
     AND t.layer = r.layer
    WHERE r.k = 0
    GROUP BY ALL
)
SELECT p.layer, p.i AS expert, p.p, coalesce(f.n, 0) AS first
FROM probs AS p
LEFT JOIN firsts AS f USING (layer, i)
ORDER BY p.layer, p.i
