-- DeepSeek-V3 sequence-wise balance loss per layer (alpha left out), averaged over sequences:
--   L = sum_i f_i P_i, f_i = E / (k T) * #{t : i in TopK(t)}, P_i = mean over the sequence's T tokens of the
--   normalised score of expert i. TopK is what the router actually chose (the routing table).
WITH probs AS (
    SELECT rank, sequence, layer, i, avg(v) AS p
    FROM (SELECT rank, sequence, layer, unnest(range(len(p))) AS i, unnest(p) AS v FROM {tokens})
    GROUP BY ALL
), lengths AS (
    SELECT rank, sequence, layer, count(*) AS t, any_value(experts) AS experts, any_value(top_k) AS top_k
    FROM {tokens}
    GROUP BY ALL
), chosen AS (
    SELECT r.rank, r.sequence, r.layer, r.expert AS i, count(*) AS c
    FROM {sample} AS r
    SEMI JOIN {tokens} AS t
      ON t.rank = r.rank AND t.step = r.step AND t.sequence = r.sequence AND t.position = r.position
     AND t.layer = r.layer
    GROUP BY ALL
), per_sequence AS (
    SELECT c.rank, c.sequence, c.layer, sum(l.experts / (l.top_k * l.t) * c.c * p.p) AS loss
    FROM chosen AS c
    JOIN probs AS p USING (rank, sequence, layer, i)
    JOIN lengths AS l USING (rank, sequence, layer)
    GROUP BY ALL
)
SELECT layer, avg(loss) AS loss, count(*) AS sequences
FROM per_sequence
GROUP BY layer
ORDER BY layer
