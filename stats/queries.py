"""The canned queries of `paradiffusion stats`, as SQL over the views of :mod:`stats.views`.

Each :class:`Query` names the views it needs; it runs only where they exist. Mean nouns (Table
1) is not SQL: :mod:`stats.nouns` tags a seeded sample of each source's captions.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Query:
    """One canned query: a title for the report, the SQL over the raw views, the views it needs,
    and the same query over the partial aggregates (:mod:`stats.aggregates`), where it has one."""

    name: str
    title: str
    sql: str
    needs: tuple[str, ...]
    agg_sql: str | None = None


def captioner_pairs_sql(latest: str) -> str:
    """Caption set against caption set on their common images; ``latest`` gives one row per
    (key, source): the words of the newest non-error caption."""
    return (
        f"WITH c AS ({latest}) "
        "SELECT a.source AS source_a, b.source AS source_b, count(*) AS common_images, "
        "round(avg(a.words), 1) AS mean_words_a, round(avg(b.words), 1) AS mean_words_b, "
        "round(avg(abs(a.words - b.words)), 1) AS mean_abs_diff, "
        "round(100 * avg((a.words > b.words)::INT), 1) AS pct_a_longer "
        "FROM c a JOIN c b ON a.key = b.key AND a.source < b.source GROUP BY ALL ORDER BY source_a, source_b"
    )


#: The newest non-error caption's words per (key, caption set), over the raw rows; captions of one
#: instant: the longest (a tie broken the same way by every path, so incremental equals full).
LATEST_WORDS_SQL = (
    "SELECT key, source, arg_max(n_words, row(created_at, n_words)) AS words FROM vlm_captions "
    "WHERE finish_reason IS DISTINCT FROM 'error' GROUP BY key, source"
)


def bucket_labels(edges: list[int]) -> list[str]:
    """``[25, 50]`` -> ``['<25', '25-49', '>=50']`` (a word count n is in [lo, hi))."""
    labels = [f"<{edges[0]}"]
    labels += [f"{lo}-{hi - 1}" for lo, hi in zip(edges, edges[1:], strict=False)]
    return labels + [f">={edges[-1]}"]


def bucket_case(col: str, edges: list[int]) -> str:
    """SQL ``CASE`` giving the bucket index (0-based) of a word count."""
    whens = " ".join(f"WHEN {col} < {e} THEN {i}" for i, e in enumerate(edges))
    return f"CASE {whens} ELSE {len(edges)} END"


def _keyword_columns(keywords: list[str]) -> str:
    from stats.derived import keyword_column

    cols = []
    for w in sorted(set(keywords)):
        c = keyword_column(w)
        cols.append(f"round(100 * avg({c}::INT), 1) AS pct_{c[3:]}")
    return ", ".join(cols)


def canned_queries(length_buckets: list[int], keywords: list[str], have: set[str]) -> list[Query]:
    """Every canned query, in report order; ``have`` is the set of views that exist.

    Images are counted as distinct keys: a source can hold two rows for one image (two approved
    annotators under ``train_rule: each``), and Table 1 says so in ``captions``. Where the
    partial aggregates exist (the ``agg_*`` and ``keyed_*`` views), each query carries its
    ``agg_sql`` too: the same rows from the merged partials.
    """
    agg = _agg_sql(length_buckets, keywords, have) if "agg_sets" in have or "agg_alt" in have else {}
    return [
        Query(q.name, q.title, q.sql, q.needs, agg.get(q.name)) for q in _raw_queries(length_buckets, keywords, have)
    ]


def _raw_queries(length_buckets: list[int], keywords: list[str], have: set[str]) -> list[Query]:
    labels = bucket_labels(length_buckets)
    label_sql = "[" + ", ".join(f"'{x}'" for x in labels) + "]"
    return [
        Query(
            "table1",
            "Table 1: images, captions, mean short side (over images) and mean words (over captions) per source",
            "WITH per_image AS (SELECT source, key, max(short_side) AS short_side, count(*) AS captions, "
            "sum(n_words) AS words FROM caption_sources GROUP BY source, key) "
            "SELECT source, count(*) AS images, sum(captions) AS captions, round(avg(short_side), 1) AS mean_short_side, "
            "round(sum(words) / sum(captions), 1) AS mean_words FROM per_image GROUP BY source ORDER BY source",
            ("caption_sources",),
        ),
        Query(
            "length_histogram",
            f"Caption length (words) by source, buckets {', '.join(labels)}",
            f"WITH b AS (SELECT source, {bucket_case('n_words', length_buckets)} AS bucket FROM caption_sources "
            "WHERE n_words IS NOT NULL) "
            f"SELECT source, bucket, {label_sql}[bucket + 1] AS words, count(*) AS captions, "
            "round(100.0 * count(*) / sum(count(*)) OVER (PARTITION BY source), 1) AS pct "
            "FROM b GROUP BY source, bucket ORDER BY source, bucket",
            ("caption_sources",),
        ),
        Query(
            "prompt_versions",
            "Prompt versions: each caption set (model x prompt text) is its own source",
            "SELECT source, prompt_hash, first_used, captions FROM prompt_versions "
            "ORDER BY model_id, model_revision, prompt_id, prompt_version",
            ("prompt_versions",),
        ),
        Query(
            "funnel",
            "Funnel: images (distinct keys) at each step, each step a subset of the step it counts from",
            funnel_sql(have) or "",
            (),
        ),
        Query(
            "download",
            "Download: rows by img2dataset status",
            "SELECT status, count(*) AS n FROM images GROUP BY status ORDER BY n DESC",
            ("images",),
        ),
        Query(
            "reject_reasons",
            "Filter: rejected images by reason",
            "SELECT reject_reason, count(*) AS n, round(100.0 * count(*) / sum(count(*)) OVER (), 1) AS pct "
            "FROM scores WHERE NOT kept GROUP BY reject_reason ORDER BY n DESC, reject_reason",
            ("scores",),
        ),
        Query(
            "quality_flags",
            "Caption quality flags and unfinished generations, by source (caption set)",
            "SELECT source, flag, count(*) AS n FROM ("
            " SELECT source, unnest(flags) AS flag FROM vlm_captions"
            " UNION ALL SELECT source, 'finish_reason=' || finish_reason FROM vlm_captions"
            " WHERE finish_reason IS NOT NULL AND finish_reason <> 'stop'"
            " UNION ALL SELECT source, 'no words' FROM vlm_captions WHERE coalesce(n_words, 0) = 0"
            ") GROUP BY ALL ORDER BY source, n DESC, flag",
            ("vlm_captions",),
        ),
        Query(
            "captioners",
            "Captioners side by side (one row per caption set)",
            "SELECT source, count(*) AS captions, count(DISTINCT key) AS images, "
            "round(avg(n_words), 1) AS mean_words, round(avg(seconds), 3) AS mean_seconds, "
            "round(100 * avg((finish_reason = 'length')::INT), 1) AS pct_truncated "
            "FROM vlm_captions GROUP BY ALL ORDER BY source",
            ("vlm_captions",),
        ),
        Query(
            "captioner_pairs",
            "Caption set against caption set on the images both captioned",
            captioner_pairs_sql(LATEST_WORDS_SQL),
            ("vlm_captions",),
        ),
        Query(
            "keywords",
            "Share of captions (%) that use each keyword (the text is read once per shard: stats.derived)",
            f"SELECT source, count(*) AS captions, {_keyword_columns(keywords)} "
            "FROM caption_keywords GROUP BY source ORDER BY source"
            if keywords
            else "",
            ("caption_keywords",),
        ),
        Query(
            "annotation_progress",
            "Annotation progress: each annotator's latest text per image, by review state",
            "SELECT coalesce(annotator, 'unknown') AS annotator, max(annotator_email) AS email, "
            "count(*) FILTER (WHERE state = 'draft') AS draft, count(*) FILTER (WHERE state = 'submitted') AS submitted, "
            "count(*) FILTER (WHERE state = 'approved') AS approved, count(*) FILTER (WHERE state = 'rejected') AS rejected, "
            "count(*) AS texts FROM annotations_current GROUP BY ALL ORDER BY annotator",
            ("annotations_current",),
        ),
    ]


#: Steps of the funnel: (name, label, the table it needs, SQL of its keys, the step it counts from).
#: Each step's population is its keys that are also in its parent step's population, so a step
#: can never be larger than the one it comes from; keys of a table outside the parent's
#: population are counted in ``outside`` (e.g. scores of images that are not downloaded here).
FUNNEL_STEPS: tuple[tuple[str, str, str, str, str | None], ...] = (
    ("urls", "URLs tried", "images", "SELECT DISTINCT key FROM images", None),
    ("downloaded", "downloaded", "images", "SELECT DISTINCT key FROM images WHERE status = 'success'", "urls"),
    ("scored", "scored by the filter", "scores", "SELECT DISTINCT key FROM scores", "downloaded"),
    ("kept", "kept by the filter", "scores", "SELECT DISTINCT key FROM scores WHERE kept", "scored"),
    (
        "captioned",
        "captioned (a VLM caption with words)",
        "captions",
        "SELECT DISTINCT key FROM captions WHERE coalesce(n_words, 0) > 0 AND finish_reason IS DISTINCT FROM 'error'",
        "kept",
    ),
    ("candidates", "ParaImage-Small candidates", "candidates", "SELECT DISTINCT key FROM candidates", "kept"),
    (
        "annotated",
        "annotated (any text)",
        "annotations",
        "SELECT DISTINCT key FROM annotations WHERE parent_version IS NULL",
        "candidates",
    ),
    (
        "approved",
        "with an approved text",
        "annotations",
        "SELECT DISTINCT key FROM annotation_texts WHERE state = 'approved'",
        "annotated",
    ),
)


def funnel_plan(have: set[str]) -> list[tuple[str, str, str, str, str | None]]:
    """The funnel steps whose table exists, each with the step it counts from: its own parent, or
    the nearest earlier step that exists (annotations count from the kept set when there are no
    candidates)."""
    parent_of = {name: parent for name, _, _, _, parent in FUNNEL_STEPS}
    present = [s for s in FUNNEL_STEPS if s[2] in have]
    names = {s[0] for s in present}
    out = []
    for name, label, table, keys_sql, parent in present:
        while parent is not None and parent not in names:
            parent = parent_of[parent]
        out.append((name, label, table, keys_sql, parent))
    return out


def funnel_sql(have: set[str]) -> str | None:
    """One row per step whose table exists: ``step, stage, images, of_step, pct_of_parent, outside``.

    A step whose parent's table is missing counts from the nearest earlier step that exists
    (annotations count from the kept set when there are no candidates).
    """
    present = funnel_plan(have)
    if not present:
        return None
    ctes, rows = [], []
    for i, (name, label, _, keys_sql, parent) in enumerate(present, start=1):
        ctes.append(f"t_{name} AS ({keys_sql})")
        if parent is None:
            ctes.append(f"p_{name} AS (SELECT key FROM t_{name})")
        else:
            ctes.append(f"p_{name} AS (SELECT key FROM t_{name} SEMI JOIN p_{parent} USING (key))")
        step_of = {n: j for j, (n, *_rest) in enumerate(present, start=1)}
        rows.append(
            f"SELECT {i} AS step, '{label}' AS stage, (SELECT count(*) FROM p_{name}) AS images, "
            + (
                f"{step_of[parent]} AS of_step, (SELECT count(*) FROM p_{parent}) AS parent_images, "
                if parent
                else "NULL::INT AS of_step, NULL::BIGINT AS parent_images, "
            )
            + f"(SELECT count(*) FROM t_{name}) - (SELECT count(*) FROM p_{name}) AS outside"
        )
    return (
        f"WITH {', '.join(ctes)} SELECT step, stage, images, of_step, "
        "round(100.0 * images / nullif(parent_images, 0), 1) AS pct_of_parent, outside FROM ("
        + " UNION ALL ".join(rows)
        + ") ORDER BY step"
    )


def _agg_sql(length_buckets: list[int], keywords: list[str], have: set[str]) -> dict[str, str]:
    """The canned queries over the partial aggregates: sums over every committed shard's partials,
    labelled through the merged prompt versions, the key-level numbers joined in. Each mirrors
    its raw query's arithmetic (``100 * (a / b)`` where the raw one takes ``100 * avg``) so the
    rounded results are the same."""
    from stats.aggregates import SET_JOIN
    from stats.derived import keyword_column, keyword_sql
    from stats.views import words_sql

    labels = bucket_labels(length_buckets)
    label_sql = "[" + ", ".join(f"'{x}'" for x in labels) + "]"
    kws = [keyword_column(w) for w in sorted(set(keywords))]
    vlm = "agg_sets" in have
    alt = "agg_alt" in have
    ann = "annotations_approved" in have
    out: dict[str, str] = {}
    sets_by_source = "FROM agg_sets p JOIN agg_prompt_versions v ON " + SET_JOIN
    if alt and "keyed_table1" in have:
        counts = ["SELECT 'alt_text' AS source, sum(rows) AS captions, sum(words_sum) AS words FROM agg_alt"]
        if vlm:
            counts.append(f"SELECT v.source, sum(p.words_rows), sum(p.words_sum) {sets_by_source} GROUP BY v.source")
        if ann:
            counts.append(
                f"SELECT 'annotations_approved', count(*), sum({words_sql('text')}) FROM annotations_approved"
            )
        out["table1"] = (
            "WITH c AS (" + " UNION ALL ".join(counts) + ") "
            "SELECT k.source, k.images, c.captions, round(k.ss_sum / nullif(k.ss_n, 0), 1) AS mean_short_side, "
            "round(c.words / c.captions, 1) AS mean_words FROM keyed_table1 k JOIN c USING (source) ORDER BY source"
        )
        lengths = ["SELECT 'alt_text' AS source, n_words, n FROM agg_alt_lengths"]
        if vlm:
            lengths.append(
                "SELECT v.source, p.n_words, p.n FROM agg_lengths p JOIN agg_prompt_versions v ON " + SET_JOIN
            )
        if ann:
            lengths.append(f"SELECT 'annotations_approved', {words_sql('text')}, 1 FROM annotations_approved")
        out["length_histogram"] = (
            "WITH l AS (" + " UNION ALL ".join(lengths) + "), "
            f"b AS (SELECT source, {bucket_case('n_words', length_buckets)} AS bucket, sum(n)::BIGINT AS n "
            "FROM l WHERE n_words IS NOT NULL GROUP BY ALL) "
            f"SELECT source, bucket, {label_sql}[bucket + 1] AS words, n AS captions, "
            "round(100.0 * n / sum(n) OVER (PARTITION BY source), 1) AS pct FROM b ORDER BY source, bucket"
        )
        if kws:
            kw_parts = [
                "SELECT 'alt_text' AS source, rows AS captions" + "".join(f", {c}" for c in kws) + " FROM agg_alt"
            ]
            if vlm:
                kw_parts.append(
                    "SELECT v.source, p.words_rows" + "".join(f", p.{c}" for c in kws) + f" {sets_by_source}"
                )
            if ann:
                kw_parts.append(
                    "SELECT 'annotations_approved', 1"
                    + "".join(f", {keyword_sql('text', w)}::BIGINT" for w in sorted(set(keywords)))
                    + " FROM annotations_approved"
                )
            pct = ", ".join(f"round(100 * (sum({c}) / sum(captions)), 1) AS pct_{c[3:]}" for c in kws)
            out["keywords"] = (
                "WITH k AS (" + " UNION ALL ".join(kw_parts) + ") "
                f"SELECT source, sum(captions)::BIGINT AS captions, {pct} FROM k GROUP BY source "
                "HAVING sum(captions) > 0 ORDER BY source"
            )
        out["reject_reasons"] = (
            "SELECT reject_reason, sum(n)::BIGINT AS n, "
            "round(100.0 * sum(n)::BIGINT / sum(sum(n)::BIGINT) OVER (), 1) AS pct "
            "FROM agg_rejects GROUP BY reject_reason ORDER BY n DESC, reject_reason"
        )
    if vlm:
        out["prompt_versions"] = (
            "SELECT source, prompt_hash, first_used, captions FROM agg_prompt_versions "
            "ORDER BY model_id, model_revision, prompt_id, prompt_version"
        )
        out["quality_flags"] = (
            "SELECT v.source, p.flag, sum(p.n)::BIGINT AS n FROM agg_flags p JOIN agg_prompt_versions v ON "
            + SET_JOIN
            + " GROUP BY ALL ORDER BY source, n DESC, flag"
        )
        if "keyed_captioners" in have:
            out["captioners"] = (
                "WITH s AS (SELECT v.source, sum(p.rows)::BIGINT AS captions, sum(p.n_words_sum) AS nw, "
                "sum(p.n_words_n) AS nn, sum(p.seconds_sum) AS ss, sum(p.seconds_n) AS sn, "
                f"sum(p.length_n) AS ln, sum(p.finish_n) AS fn {sets_by_source} GROUP BY v.source) "
                "SELECT s.source, s.captions, k.images, round(nw / nullif(nn, 0), 1) AS mean_words, "
                "round(ss / nullif(sn, 0), 3) AS mean_seconds, round(100 * (ln / nullif(fn, 0)), 1) AS pct_truncated "
                "FROM s JOIN keyed_captioners k USING (source) ORDER BY source"
            )
        if "keyed_pairs" in have:
            out["captioner_pairs"] = "SELECT * FROM keyed_pairs ORDER BY source_a, source_b"
    if "keyed_funnel" in have:
        out["funnel"] = "SELECT * FROM keyed_funnel ORDER BY step"
    return out
