-- How many steps had each token count, per layer: the random-routing MaxVio_batch baseline is simulated on
-- the same batch sizes, since small (decode) batches are far less even than large ones by chance alone.
SELECT layer, tokens, count(*) AS steps
FROM {steps_load}
GROUP BY ALL
ORDER BY layer, tokens
