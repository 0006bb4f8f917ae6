-- Top-k as a sorted list of 1-based expert positions, and DeepSeek-V3's group-limited top-k: experts split in
-- g equal groups, a group scores the sum of its two best scores, the best tg groups are kept, then top-k inside.
CREATE OR REPLACE TEMP MACRO mp_topk(v, k) AS
    list_sort(list_slice(list_grade_up(list_transform(v, lambda z: -z)), 1, k));
CREATE OR REPLACE TEMP MACRO mp_group_topk(v, g, tg, k) AS mp_topk(
    list_transform(v, lambda val, i: CASE WHEN list_contains(
        list_slice(list_grade_up(list_transform(range(g), lambda gi: -list_sum(list_slice(list_sort(
            list_slice(v, gi * (len(v) // g) + 1, (gi + 1) * (len(v) // g)), 'DESC'), 1, 2)))), 1, tg),
        (i - 1) // (len(v) // g) + 1) THEN val ELSE -1e30 END),
    k);
