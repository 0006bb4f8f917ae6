-- Router confidence per layer: mean normalised entropy, mean top-k margin, and the ST-MoE z-loss
-- mean_t (logsumexp x_t)^2.
SELECT layer, count(*) AS tokens, avg(entropy) AS entropy, avg(margin) AS margin, avg(lse * lse) AS z_loss
FROM {tokens}
GROUP BY layer
ORDER BY layer
