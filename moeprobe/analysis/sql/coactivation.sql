-- Co-activation (OLMoE): for every ordered pair of distinct experts chosen for the same token, how often;
-- divided later by how often the first one was chosen at all (N(i and j) / N(i)).
SELECT a.layer, a.expert AS i, b.expert AS j, count(*) AS n
FROM {sample} AS a
JOIN {sample} AS b
  ON b.rank = a.rank AND b.step = a.step AND b.sequence = a.sequence AND b.position = a.position
 AND b.layer = a.layer AND b.expert <> a.expert
GROUP BY ALL
ORDER BY ALL
