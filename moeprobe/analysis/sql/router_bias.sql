-- Bias-balanced routers (DeepSeek-V3): the share of tokens whose top-k chosen with the correction bias differs
-- from the top-k chosen without it. The bias in force at a step is the latest one recorded at or before it.
-- Both choices apply the same group limiting (n_group groups, topk_group kept).
WITH joined AS (
    SELECT t.layer, t.q, b.bias, t.top_k, m.n_group, m.topk_group
    FROM {tokens} AS t
    ASOF JOIN bias AS b ON t.rank = b.rank AND t.layer = b.layer AND t.step >= b.step
    JOIN {meta} AS m ON m.layer = t.layer
    WHERE len(b.bias) = len(t.q)
)
SELECT layer, count(*) AS tokens,
       count_if(
           mp_group_topk(list_transform(q, lambda v, i: v + bias[i]), n_group, topk_group, top_k)
           <> mp_group_topk(q, n_group, topk_group, top_k)
       ) AS flipped
FROM joined
GROUP BY layer
ORDER BY layer
