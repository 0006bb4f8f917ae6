-- One row per token and layer that has router logits (sampled sequences only):
--   q        the score the router ranks experts by: softmax probability, or sigmoid score for sigmoid routers
--   p        the router distribution: q itself for softmax, sigmoid scores normalised to sum 1 otherwise
--   entropy  H(p) / ln E
--   margin   q of the k-th minus q of the (k+1)-th best expert (NULL when k = E)
--   lse      logsumexp of the logits, for the ST-MoE z-loss
WITH s AS (
    SELECT sc.rank, sc.step, sc.sequence, sc.position, sc.layer, sc.scores AS x,
           m.experts, m.top_k, m.sigmoid, list_max(sc.scores) AS mx
    FROM {scores} AS sc
    JOIN {meta} AS m USING (layer)
    WHERE {sampled} AND len(sc.scores) = m.experts
), e AS (
    SELECT *, list_transform(x, lambda v: exp(v - mx)) AS ex FROM s
), es AS (
    -- Each list's sum once per row: inside a lambda, list_sum(ex) would be summed again for every element.
    SELECT *, list_sum(ex) AS ex_sum FROM e
), q AS (
    SELECT *,
           CASE WHEN sigmoid THEN list_transform(x, lambda v: 1.0 / (1.0 + exp(-v)))
                ELSE list_transform(ex, lambda v: v / ex_sum) END AS q,
           mx + ln(ex_sum) AS lse
    FROM es
), qs AS (
    SELECT *, CASE WHEN sigmoid THEN list_sum(q) END AS q_sum FROM q
), p AS (
    SELECT *, CASE WHEN sigmoid THEN list_transform(q, lambda v: v / q_sum) ELSE q END AS p,
           list_sort(q, 'DESC') AS ordered
    FROM qs
)
SELECT rank, step, sequence, position, layer, top_k, experts, q, p, lse,
       -list_sum(list_transform(p, lambda v: CASE WHEN v > 0 THEN v * ln(v) ELSE 0 END)) / ln(experts) AS entropy,
       CASE WHEN top_k < experts THEN ordered[top_k] - ordered[top_k + 1] END AS margin
FROM p
