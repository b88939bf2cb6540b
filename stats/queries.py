"""The canned queries of `paradiffusion stats`, as SQL over the views of :mod:`stats.views`.

Each :class:`Query` names the views it needs; it runs only where they exist. Mean nouns (Table
1) is not SQL: :mod:`stats.nouns` tags a seeded sample of each source's captions.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Query:
    """One canned query: a title for the report, the SQL and the views it needs."""

    name: str
    title: str
    sql: str
    needs: tuple[str, ...]


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
    cols = []
    for w in keywords:
        pattern = "(?i)\\b" + "".join(c if c.isalnum() else "\\" + c for c in w) + "\\b"
        name = "".join(c if c.isalnum() else "_" for c in w)
        cols.append(f"round(100 * avg(regexp_matches(caption, '{pattern}')::INT), 1) AS pct_{name}")
    return ", ".join(cols)


def canned_queries(length_buckets: list[int], keywords: list[str], have: set[str]) -> list[Query]:
    """Every canned query, in report order; ``have`` is the set of views that exist."""
    labels = bucket_labels(length_buckets)
    label_sql = "[" + ", ".join(f"'{x}'" for x in labels) + "]"
    return [
        Query(
            "table1",
            "Table 1: images, mean short side and mean words per caption source",
            "SELECT source, count(*) AS images, round(avg(short_side), 1) AS mean_short_side, "
            "round(avg(n_words), 1) AS mean_words FROM caption_sources GROUP BY source ORDER BY source",
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
        Query("funnel", "Funnel: how many rows / keys reach each step", funnel_sql(have) or "", ()),
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
            "Caption quality flags and unfinished generations, by captioner",
            "SELECT model_id, prompt_id, flag, count(*) AS n FROM ("
            " SELECT model_id, prompt_id, unnest(flags) AS flag FROM captions"
            " UNION ALL SELECT model_id, prompt_id, 'finish_reason=' || finish_reason FROM captions"
            " WHERE finish_reason IS NOT NULL AND finish_reason <> 'stop'"
            " UNION ALL SELECT model_id, prompt_id, 'no words' FROM captions WHERE coalesce(n_words, 0) = 0"
            ") GROUP BY ALL ORDER BY model_id, prompt_id, n DESC, flag",
            ("captions",),
        ),
        Query(
            "captioners",
            "Captioners side by side",
            "SELECT model_id, prompt_id, count(*) AS captions, count(DISTINCT key) AS keys, "
            "round(avg(n_words), 1) AS mean_words, round(avg(seconds), 3) AS mean_seconds, "
            "round(100 * avg((finish_reason = 'length')::INT), 1) AS pct_truncated "
            "FROM captions GROUP BY ALL ORDER BY model_id, prompt_id",
            ("captions",),
        ),
        Query(
            "captioner_pairs",
            "Captioner against captioner on the keys both captioned",
            "WITH c AS (SELECT key, model_id || '/' || prompt_id AS source, n_words AS words FROM captions "
            " QUALIFY row_number() OVER (PARTITION BY key, model_id, prompt_id ORDER BY created_at) = 1) "
            "SELECT a.source AS source_a, b.source AS source_b, count(*) AS common_keys, "
            "round(avg(a.words), 1) AS mean_words_a, round(avg(b.words), 1) AS mean_words_b, "
            "round(avg(abs(a.words - b.words)), 1) AS mean_abs_diff, "
            "round(100 * avg((a.words > b.words)::INT), 1) AS pct_a_longer "
            "FROM c a JOIN c b ON a.key = b.key AND a.source < b.source GROUP BY ALL ORDER BY source_a, source_b",
            ("captions",),
        ),
        Query(
            "keywords",
            "Share of captions (%) that use each keyword (reads the caption text)",
            f"SELECT source, count(*) AS captions, {_keyword_columns(keywords)} "
            "FROM caption_sources GROUP BY source ORDER BY source",
            ("caption_sources",),
        ),
        Query(
            "annotation_progress",
            "Annotation progress: current state by annotator",
            "SELECT coalesce(annotator, 'unknown') AS annotator, "
            "count(*) FILTER (WHERE state = 'draft') AS draft, count(*) FILTER (WHERE state = 'submitted') AS submitted, "
            "count(*) FILTER (WHERE state = 'approved') AS approved, count(*) FILTER (WHERE state = 'rejected') AS rejected, "
            "count(*) AS keys FROM annotations_current GROUP BY ALL ORDER BY annotator",
            ("annotations_current",),
        ),
    ]


def funnel_sql(have: set[str]) -> str | None:
    """One row per pipeline step, for the tables that exist."""
    steps = {
        "images": [
            "SELECT 1 AS step, 'URLs tried (images rows)' AS stage, count(*) AS n FROM images",
            "SELECT 2 AS step, 'downloaded (status success)' AS stage, count(*) FILTER (WHERE status = 'success') AS n FROM images",
        ],
        "scores": [
            "SELECT 3 AS step, 'scored by the filter' AS stage, count(*) AS n FROM scores",
            "SELECT 4 AS step, 'kept by the filter' AS stage, count(*) FILTER (WHERE kept) AS n FROM scores",
        ],
        "captions": ["SELECT 5 AS step, 'captioned (any VLM)' AS stage, count(DISTINCT key) AS n FROM captions"],
        "candidates": ["SELECT 6 AS step, 'ParaImage-Small candidates' AS stage, count(*) AS n FROM candidates"],
        "annotations": [
            "SELECT 7 AS step, 'annotated (any version)' AS stage, count(DISTINCT key) AS n FROM annotations",
            "SELECT 8 AS step, 'approved descriptions' AS stage, count(DISTINCT key) FILTER (WHERE state = 'approved') AS n "
            "FROM annotations",
        ],
    }
    parts = [q for table, qs in steps.items() if table in have for q in qs]
    return "SELECT * FROM (" + " UNION ALL ".join(parts) + ") ORDER BY step" if parts else None
