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
2. **Key level** (``keyed/``): the numbers that need the keys of every shard together: distinct
   images per source and their mean short side (Table 1), distinct images per caption set
   (captioners), the funnel's nested key sets and the caption-set pairs. These cannot be added
   up shard by shard (a key may be in two shards); they are computed in one pass over the
   per-row caches (64-bit key hashes and a few numbers per row, never the source shards or the
   text) when any input changed, and kept with a fingerprint of their inputs.

The canned queries (:mod:`stats.queries`, ``agg_sql``) merge these at query time: sums over the
partials of every committed shard, labels from the merged prompt versions, the key-level
results joined in. The raw views stay for ad-hoc SQL and give the same rows (tested).

Key hashes: DuckDB's 64-bit ``hash(key)``. Two different keys sharing a hash would be counted as
one image; for n keys the chance of any such pair is about n^2 / 2^65 (3 in a million at 10 M
keys). Strings instead of hashes made the key-level pass about 1.5x slower here.
"""

from __future__ import annotations

import json
import os
import time
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
#: Bumped when the key-level pass changes.
KEYED_VERSION = 3


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

#: The key-level results (level 2) and the view each is read through.
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


# --------------------------------------------------------------------------- level 2: keys
def _fingerprint_raw(src) -> list:
    """What a raw (uncached) table's shards are, for the key-level fingerprint: name, size, time."""
    import fsspec

    out = []
    for f in src.files:
        fs, path = fsspec.core.url_to_fs(f)
        info = fs.info(path)
        out.append([f, info.get("size"), str(info.get("mtime") or info.get("LastModified") or info.get("ETag") or "")])
    return out


def keyed_fingerprint(state, sources, cfg) -> dict:
    return {
        "version": KEYED_VERSION,
        "cached": {t: state.idents.get(t, {}) for t in PARTS},
        "raw": {n: _fingerprint_raw(sources[n]) for n in ("images", "candidates", "annotations")},
        "train_rule": cfg.annotations.train_rule,
    }


def refresh_keyed(con, out: Path, state, sources, cfg) -> tuple[str, bool, float]:
    """Bring the key-level results up to date; returns (folder, recomputed?, seconds).

    Recomputed from the per-row caches when the fingerprint of the inputs changed (any shard's
    cache, the uncached tables' files, the annotation rule); each result is written to a temp
    name and renamed, ``keyed.json`` last.
    """
    from captioning.small.texts import approved_sql, texts_sql
    from stats.queries import captioner_pairs_sql, funnel_sql
    from stats.views import files_sql

    t0 = time.perf_counter()
    folder = Path(out) / "derived" / "keyed"
    folder.mkdir(parents=True, exist_ok=True)
    fp = keyed_fingerprint(state, sources, cfg)
    meta = folder / "keyed.json"
    if meta.exists() and json.loads(meta.read_text()) == fp and all((folder / f"{n}.parquet").exists() for n in KEYED):
        return str(folder), False, time.perf_counter() - t0
    meta.unlink(missing_ok=True)
    have = {n for n, s in sources.items() if s.exists}
    lean: list[tuple[str, str]] = []
    if "scores" in have:
        lean.append(
            (
                "scores",
                "SELECT kh AS key, kept, least(width, height) AS short_side, reject_reason "
                f"FROM {_files_sql(state.files['scores'])}",
            )
        )
    if "captions" in have:
        lean.append(
            (
                "captions",
                f"SELECT kh AS key, sid, {SET_COLS}, n_words, finish_reason, created_at "
                f"FROM {_files_sql(state.files['captions'])}",
            )
        )
        lean.append(
            (
                "l_pv",
                _pv_sql(_files_sql(part_files(state.folders["captions"], sorted(state.idents["captions"]), "sets"))),
            )
        )
        lean.append(("vlm_captions", f"SELECT v.source, p.* FROM captions p JOIN l_pv v ON {SET_JOIN}"))
    if "images" in have:
        lean.append(("images", f"SELECT hash(key) AS key, status FROM {files_sql(sources['images'].files)}"))
    if "candidates" in have:
        lean.append(("candidates", f"SELECT hash(key) AS key FROM {files_sql(sources['candidates'].files)}"))
    if "annotations" in have:
        email = "" if "annotator_email" in sources["annotations"].columns else ", NULL::VARCHAR AS annotator_email"
        lean.append(
            (
                "annotations",
                f"SELECT * REPLACE (hash(key) AS key){email} FROM {files_sql(sources['annotations'].files)}",
            )
        )
        lean.append(("annotation_texts", texts_sql("annotations")))
        lean.append(("annotations_approved", approved_sql("annotations", cfg.annotations.train_rule)))
    for name, sql in lean:
        con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS {sql}")
    # one row per (caption set, key), grouped once and shared by Table 1, captioners and the pairs
    if "captions" in have:
        con.execute(
            "CREATE OR REPLACE TEMP TABLE sk AS SELECT v.source, p.key, p.hw, p.ne, p.words FROM ("
            "SELECT sid, key, bool_or(hw) AS hw, count(*) FILTER (ne) AS ne, "
            "arg_max(n_words, created_at) FILTER (ne) AS words FROM ("
            "SELECT *, coalesce(n_words, 0) > 0 AND finish_reason IS DISTINCT FROM 'error' AS hw, "
            "finish_reason IS DISTINCT FROM 'error' AS ne FROM captions) GROUP BY ALL) p "
            "JOIN l_pv v USING (sid)"
        )
    if "scores" in have:
        con.execute(
            "CREATE OR REPLACE TEMP TABLE sg AS SELECT key, any_value(short_side) AS short_side FROM scores GROUP BY key"
        )
    results: dict[str, str] = {}
    if "scores" in have:
        parts = [
            "SELECT 'alt_text' AS source, key, any_value(short_side) AS short_side FROM scores WHERE kept GROUP BY key"
        ]
        if "captions" in have:
            parts.append("SELECT k.source, k.key, s.short_side FROM sk k LEFT JOIN sg s USING (key) WHERE k.hw")
        if "annotations" in have:
            parts.append(
                "SELECT 'annotations_approved', a.key, s.short_side FROM (SELECT DISTINCT key FROM annotations_approved) a "
                "LEFT JOIN sg s USING (key)"
            )
        results["table1"] = (
            "SELECT source, count(*) AS images, sum(short_side) AS ss_sum, count(short_side) AS ss_n FROM ("
            + " UNION ALL ".join(parts)
            + ") GROUP BY source"
        )
    else:
        results["table1"] = "SELECT NULL::VARCHAR AS source, 0 AS images, 0 AS ss_sum, 0 AS ss_n WHERE false"
    if "captions" in have:
        results["captioners"] = "SELECT source, count(*) AS images FROM sk GROUP BY source"
        results["pairs"] = captioner_pairs_sql("SELECT key, source, words FROM sk WHERE ne > 0")
    else:
        results["captioners"] = "SELECT NULL::VARCHAR AS source, 0 AS images WHERE false"
        results["pairs"] = "SELECT NULL::VARCHAR AS source_a, NULL::VARCHAR AS source_b WHERE false"
    fsql = funnel_sql(have)
    results["funnel"] = fsql or "SELECT NULL::INT AS step WHERE false"
    for name, sql in results.items():
        tmp = folder / f".{name}.parquet.tmp"
        con.execute(f"COPY ({sql}) TO '{_q(str(tmp))}' (FORMAT parquet)")
        os.replace(tmp, folder / f"{name}.parquet")
    tmp = folder / ".keyed.json.tmp"
    tmp.write_text(json.dumps(fp, default=str))
    os.replace(tmp, meta)
    secs = time.perf_counter() - t0
    log.info("key-level results (distinct images, funnel, caption-set pairs) computed in %.1f s", secs)
    return str(folder), True, secs
