"""Mergeable partial aggregates: what lets every canned query answer in about a second at 10 M rows.

Two levels, both under ``<stats.output>/derived`` beside the per-row cache of :mod:`stats.derived`:

1. **Per committed shard** (written with the shard's per-row cache, committed by the same
   ``<shard>.json``): small tables that add up across shards. ``captions``: per caption set
   (model, revision, prompt id, prompt text hash) the row count, first use, sums and counts of
   words / seconds / finish reasons / keyword flags (``sets``), the count per exact word count
   (``lengths``: any bucket edges are applied at query time) and per quality flag (``flags``).
   ``scores``: the kept alt texts' sums and keyword flags (``alt``), their word counts
   (``alt_lengths``) and the rejects by reason (``rejects``). A new or rewritten shard costs only
   its own partials.
2. **Key level** (``keyed/``, :mod:`stats.keyed`): the numbers that need the keys of every
   shard together: distinct images per source and their mean short side (Table 1), distinct
   images per caption set (captioners), the funnel's nested key sets and the caption-set pairs.
   These cannot be added up shard by shard (a key may be in two shards) but can key by key:
   they are kept as totals over the keys and updated for the keys of the shards that changed.

The canned queries (:mod:`stats.queries`, ``agg_sql``) merge these at query time: sums over the
partials of every committed shard, labels from the merged prompt versions, the key-level
results joined in. The raw views stay for ad-hoc SQL and give the same rows (tested).

Key hashes: DuckDB's 64-bit ``hash(key)``. Two different keys sharing a hash would be counted as
one image; for n keys the chance of any such pair is about n^2 / 2^65 (3 in a million at 10 M
keys). Strings instead of hashes made the key-level pass about 1.5x slower here.
"""

from __future__ import annotations

import os
from pathlib import Path

from paradiffusion.log import get_logger

log = get_logger("stats")

#: The partial tables each cached table writes per shard.
PARTS: dict[str, tuple[str, ...]] = {
    "captions": ("sets", "lengths", "flags"),
    "scores": ("alt", "alt_lengths", "rejects"),
}

SET_COLS = "model_id, model_revision, prompt_id, prompt_hash"
HAS_WORDS = "coalesce(n_words, 0) > 0 AND finish_reason IS DISTINCT FROM 'error'"


def _q(s: str) -> str:
    return s.replace("'", "''")


def _lit(s: str) -> str:
    return "'" + _q(s) + "'"


def partial_sql(table: str, part: str, rows: str, keywords: list[str]) -> str:
    """``SELECT`` of one partial table over ``rows`` (a shard's per-row cache)."""
    from stats.derived import keyword_column

    kws = [keyword_column(w) for w in sorted(set(keywords))]
    if table == "captions":
        if part == "sets":
            kw = "".join(f", sum({c}::BIGINT) FILTER ({HAS_WORDS}) AS {c}" for c in kws)
            return (
                f"SELECT {SET_COLS}, sid, count(*) AS rows, min(created_at) AS first_used, "
                "count(n_words) AS n_words_n, sum(n_words) AS n_words_sum, count(seconds) AS seconds_n, "
                "sum(seconds::DOUBLE) AS seconds_sum, count(finish_reason) AS finish_n, "
                "count(*) FILTER (finish_reason = 'length') AS length_n, "
                f"count(*) FILTER ({HAS_WORDS}) AS words_rows, sum(n_words) FILTER ({HAS_WORDS}) AS words_sum{kw} "
                f"FROM {rows} GROUP BY ALL"
            )
        if part == "lengths":
            return f"SELECT {SET_COLS}, n_words, count(*) AS n FROM {rows} WHERE {HAS_WORDS} GROUP BY ALL"
        if part == "flags":
            # the quality_flags query's rows, counted per shard
            return (
                f"SELECT {SET_COLS}, flag, count(*) AS n FROM ("
                f" SELECT {SET_COLS}, unnest(flags) AS flag FROM {rows}"
                f" UNION ALL SELECT {SET_COLS}, 'finish_reason=' || finish_reason FROM {rows}"
                " WHERE finish_reason IS NOT NULL AND finish_reason <> 'stop'"
                f" UNION ALL SELECT {SET_COLS}, 'no words' FROM {rows} WHERE coalesce(n_words, 0) = 0"
                ") GROUP BY ALL"
            )
    if table == "scores":
        if part == "alt":
            kw = "".join(f", sum({c}::BIGINT) FILTER (kept) AS {c}" for c in kws)
            return f"SELECT count(*) FILTER (kept) AS rows, sum(words) FILTER (kept) AS words_sum{kw} FROM {rows}"
        if part == "alt_lengths":
            return f"SELECT words AS n_words, count(*) AS n FROM {rows} WHERE kept GROUP BY ALL"
        if part == "rejects":
            return f"SELECT reject_reason, count(*) AS n FROM {rows} WHERE NOT kept GROUP BY ALL"
    raise ValueError(f"no partial {table}.{part}")


def write_partials(con, table: str, folder: Path, shard: str, keywords: list[str]) -> None:
    """Write one shard's partial tables from its per-row cache file (temp name, then renamed)."""
    rows = f"read_parquet('{_q(str(folder / f'{shard}.parquet'))}')"
    for part in PARTS[table]:
        tmp = folder / f".{shard}.{part}.parquet.tmp"
        con.execute(f"COPY ({partial_sql(table, part, rows, keywords)}) TO '{_q(str(tmp))}' (FORMAT parquet)")
        os.replace(tmp, folder / f"{shard}.{part}.parquet")


def part_files(folder: str, shards: list[str], part: str) -> list[str]:
    return [str(Path(folder) / f"{s}.{part}.parquet") for s in shards]


def _files_sql(files: list[str]) -> str:
    return "read_parquet([" + ", ".join(_lit(f) for f in files) + "], union_by_name = true)"


def _pv_sql(sets: str) -> str:
    """The prompt_versions view's rows, merged from the ``sets`` partials."""
    from stats.views import source_label_sql

    return (
        f"SELECT {source_label_sql()} AS source, * FROM (SELECT model_id, model_revision, prompt_id, "
        "prompt_hash, dense_rank() OVER (PARTITION BY model_id, coalesce(model_revision, ''), prompt_id "
        "ORDER BY first_used, prompt_hash) AS prompt_version, first_used, captions, sid FROM ("
        f"SELECT {SET_COLS}, sid, min(first_used) AS first_used, sum(rows)::BIGINT AS captions FROM {sets} "
        "GROUP BY ALL))"
    )


SET_JOIN = (
    "p.model_id = v.model_id AND p.prompt_id = v.prompt_id AND p.prompt_hash = v.prompt_hash "
    "AND coalesce(p.model_revision, '') = coalesce(v.model_revision, '')"
)

#: The key-level results (level 2, :mod:`stats.keyed`), each read through a ``keyed_<name>`` view.
KEYED = ("table1", "captioners", "funnel", "pairs")


def agg_views(state, keyed_dir: str | None) -> list[tuple[str, str]]:
    """Views over the partials of every committed shard (and the key-level results)."""
    views: list[tuple[str, str]] = []
    for table, parts in PARTS.items():
        folder = state.folders.get(table)
        shards = list(state.idents.get(table, {}))
        if folder is None or not shards:
            continue
        for part in parts:
            views.append((f"agg_{part}", f"SELECT * FROM {_files_sql(part_files(folder, sorted(shards), part))}"))
    if any(n == "agg_sets" for n, _ in views):
        views.append(("agg_prompt_versions", _pv_sql("agg_sets")))
    if keyed_dir:
        for name in KEYED:
            f = Path(keyed_dir) / f"{name}.parquet"
            if f.exists():
                views.append((f"keyed_{name}", f"SELECT * FROM read_parquet({_lit(str(f))})"))
    return views
