"""DuckDB views over every Parquet table, read in place (no second copy).

:func:`build_views` returns ``(name, sql)`` pairs for the tables that exist; :func:`views_sql`
renders them as a ``views.sql`` that the duckdb CLI can ``.read``. Base views read the
*committed* shards only: the files are listed from the commit markers (``Table.files()``; for
img2dataset's ``images``, the shards with their ``_stats.json``) when ``make stats`` writes the
views, never a ``part-*`` glob, so a shard without a marker (in flight, or left by a killed run)
is never counted. Rerun ``make stats`` after new shards are committed to see them. Derived views:

- ``prompt_versions``: one row per caption set, i.e. model (+ revision) x prompt *text*. A
  prompt id whose text changed (a new ``prompt_hash``) is a new version, numbered by first use
  (``prompt_version`` 1, 2, ...), and its captions are a source of their own, never mixed with
  the old text's.
- ``vlm_captions``: the captions with their ``source`` label,
  ``vlm:<model>[@<revision>]/<prompt id>#v<version>``.
- ``selected_captions``: the captioning stage's ``caption.select`` rule.
- ``annotation_texts`` (each imported text with its review state), ``annotations_current``
  (each annotator's latest text per key), ``annotations_approved`` (the stage-3 rule,
  ``annotations.train_rule``): the SQL of :mod:`captioning.small.texts`.
- ``caption_sources``: every caption source in one shape (``source``, ``key``, ``caption``,
  ``n_words``, ``short_side``): the kept alt texts, each VLM source (captions with words), the
  approved annotations (``short_side`` from ``scores``, null where an image has no score).
  Statistics count *images* as distinct keys per source.
- ``caption_words`` / ``caption_keywords``: per caption, the whitespace word count and the
  keyword flags, from the ``derived`` cache (:mod:`stats.derived`: the text is read once per
  shard) or, without it, from the text.

Words: alt text and annotations are counted as whitespace-separated tokens (:func:`words_sql`, the
same count as Python's ``len(t.split())`` for ASCII whitespace). VLM captions use the
``n_words`` the captioner stored (``captioning.quality.words``: runs of letters and digits, so a
lone "-" is not a word), so Table 1 and the histogram never read the long caption text;
``caption_words`` has the whitespace count of every VLM caption for ad-hoc checks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import fsspec
import pyarrow.parquet as pq

from paradiffusion.config import RootConfig
from paradiffusion.images import IMAGE_COLUMNS
from paradiffusion.storage import Table, join

#: Base tables: view name -> folder under data_root. ``images`` is img2dataset's output (a shard is
#: complete when its ``_stats.json`` exists); the others are ``Table``s (committed by marker).
BASE_TABLES = {
    "images": "images",
    "scores": "scores",
    "captions": "captions",
    "candidates": "candidates",
    "annotations": "annotations",
    "small_train": "small_train",
}

#: Columns left out of the base views (image bytes and embeddings: large, never aggregated).
HEAVY_COLUMNS = set(IMAGE_COLUMNS) | {"image_embedding", "text_embedding"}


def words_sql(col: str) -> str:
    """SQL for the number of whitespace-separated words of a text column (0 for null/blank).

    The same count as Python's ``len(text.split())`` for ASCII whitespace. Text whose words are
    separated by single spaces (most of it) is counted as spaces + 1; only text with runs of
    whitespace, tabs or newlines, or leading/trailing blanks is split into a list. Both avoid a
    regex split, which is several times slower in DuckDB on long captions.
    """
    ws = "chr(9) || chr(10) || chr(11) || chr(12) || chr(13)"
    split = f"len(list_filter(string_split(translate({col}, {ws}, '     '), ' '), lambda w: w <> ''))"
    irregular = f"regexp_matches({col}, '\\s\\s|^\\s|\\s$|[\\t\\n\\v\\f\\r]|^$')"
    return (
        f"(CASE WHEN {col} IS NULL THEN 0 WHEN {irregular} THEN {split} "
        f"ELSE strlen({col}) - strlen(replace({col}, ' ', '')) + 1 END)"
    )


def _lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def files_sql(files: list[str]) -> str:
    """``read_parquet`` of an explicit list of shard files (the committed ones)."""
    return "read_parquet([" + ", ".join(_lit(f) for f in files) + "], union_by_name = true)"


def selected_sql(files: list[str], cfg: RootConfig) -> str:
    """The selected caption per key: the captioning stage's rule (``caption.select``), so the
    view, the annotation drafts and the captioner agree."""
    from captioning.store import selected_captions_sql

    return selected_captions_sql(files_sql(files), cfg.caption.select)


@dataclass
class Source:
    """Where one base table lives, its committed shard files and their columns."""

    name: str
    url: str
    files: list[str]
    columns: list[str]
    shards: list[str] = field(default_factory=list)  # shard names, in the order of ``files``

    @property
    def exists(self) -> bool:
        return bool(self.files)


def committed_files(name: str, url: str) -> list[tuple[str, str]]:
    """``(shard, file URL)`` of the committed shards of one base table, sorted by shard."""
    from paradiffusion.images import image_shards

    if name == "images":
        return image_shards(url)
    t = Table(url)
    if not t.exists():
        return []
    shards = sorted(t.done_shards())
    return list(zip(shards, t.files(), strict=True))


def find_sources(cfg: RootConfig) -> dict[str, Source]:
    """The base tables under ``data_root`` (and ``stats.images``): their committed shard files
    and columns (the union over the shards, so a column added later is seen)."""
    out = {}
    for name, folder in BASE_TABLES.items():
        url = cfg.stats.images if name == "images" and cfg.stats.images else join(cfg.project.data_root, folder)
        if "://" not in url:
            url = os.path.abspath(url)  # views in a .duckdb file must not depend on the working folder
        found = committed_files(name, url)
        fs = fsspec.core.url_to_fs(url)[0]
        cols: list[str] = []
        for _, f in found[:1] if name in ("images", "scores", "captions") else found:
            cols += [c for c in pq.read_schema(fsspec.core.url_to_fs(f)[1], filesystem=fs).names if c not in cols]
        out[name] = Source(name, url, [f for _, f in found], cols, [s for s, _ in found])
    return out


def vlm_words_sql(columns: list[str], alias: str = "") -> str:
    """A VLM caption's word count: the ``n_words`` the captioner stored, else recounted."""
    a = f"{alias}." if alias else ""
    return f"{a}n_words" if "n_words" in columns else words_sql(f"{a}caption")


def vlm_has_words_sql(columns: list[str], alias: str = "") -> str:
    """Which VLM caption rows a VLM source counts: with words, not failed generations."""
    a = f"{alias}." if alias else ""
    return f"coalesce({vlm_words_sql(columns, alias)}, 0) > 0 AND {a}finish_reason IS DISTINCT FROM 'error'"


def source_label_sql(alias: str = "") -> str:
    """SQL of a VLM caption set's ``source`` label (needs ``prompt_version``)."""
    a = f"{alias}." if alias else ""
    return (
        f"'vlm:' || {a}model_id || coalesce('@' || {a}model_revision, '') || '/' || {a}prompt_id "
        f"|| '#v' || {a}prompt_version"
    )


def build_views(
    cfg: RootConfig, sources: dict[str, Source] | None = None, derived: dict[str, list[str]] | None = None
) -> list[tuple[str, str]]:
    """``(view name, SELECT ...)`` for every view whose tables exist, in dependency order.

    ``derived`` maps a table (``captions``, ``scores``) to its :mod:`stats.derived` per-row cache
    files (one per committed shard); without it the word and keyword views read the text.
    """
    from captioning.small.texts import approved_sql, texts_sql
    from stats.derived import keyword_column, keyword_sql

    src = sources or find_sources(cfg)
    derived = derived or {}
    have = {n for n, s in src.items() if s.exists}
    keywords = sorted(set(cfg.stats.keywords))
    views: list[tuple[str, str]] = []
    for name in BASE_TABLES:
        if name not in have:
            continue
        drop = [c for c in src[name].columns if c in HEAVY_COLUMNS]
        exclude = f" EXCLUDE ({', '.join(drop)})" if drop else ""
        views.append((name, f"SELECT *{exclude} FROM {files_sql(src[name].files)}"))
    if "captions" in have:
        cols = src["captions"].columns
        rev = "model_revision" if "model_revision" in cols else "NULL::VARCHAR"
        # the label is built here, once per caption set, and joined to the rows (not concatenated per row)
        views.append(
            (
                "prompt_versions",
                f"SELECT {source_label_sql()} AS source, * FROM (SELECT model_id, model_revision, prompt_id, "
                "prompt_hash, dense_rank() OVER (PARTITION BY model_id, coalesce(model_revision, ''), prompt_id "
                "ORDER BY first_used, prompt_hash) AS prompt_version, first_used, captions FROM ("
                f"SELECT model_id, {rev} AS model_revision, prompt_id, prompt_hash, min(created_at) AS first_used, "
                "count(*) AS captions FROM captions GROUP BY ALL))",
            )
        )
        crev = "c.model_revision" if "model_revision" in cols else "NULL"
        views.append(
            (
                "vlm_captions",
                "SELECT v.source, v.prompt_version, c.* FROM captions c JOIN prompt_versions v "
                "ON c.model_id = v.model_id AND c.prompt_id = v.prompt_id AND c.prompt_hash = v.prompt_hash "
                f"AND coalesce({crev}, '') = coalesce(v.model_revision, '')",
            )
        )
        if "captions" in derived:
            views.append(
                (
                    "caption_words",
                    f"SELECT v.source, d.* EXCLUDE (kh) FROM {files_sql(derived['captions'])} d "
                    "JOIN prompt_versions v ON d.model_id = v.model_id AND "
                    "d.prompt_id = v.prompt_id AND d.prompt_hash = v.prompt_hash "
                    "AND coalesce(d.model_revision, '') = coalesce(v.model_revision, '')",
                )
            )
        else:
            views.append(("caption_words", f"SELECT *, {words_sql('caption')} AS words FROM vlm_captions"))
        views.append(("selected_captions", selected_sql(src["captions"].files, cfg)))
    if "annotations" in have:
        cols = src["annotations"].columns
        base = (
            "annotations"
            if "annotator_email" in cols
            else "(SELECT *, NULL::VARCHAR AS annotator_email FROM annotations)"
        )
        views.append(("annotation_texts", texts_sql(base)))
        views.append(("annotations_current", "SELECT * FROM annotation_texts WHERE NOT superseded"))
        views.append(("annotations_approved", approved_sql(base, cfg.annotations.train_rule)))
    if "scores" in have:
        size = "least(s.width, s.height) AS short_side"
        # the same populations in both views: what Table 1 counts is what the keyword shares are of
        text_parts = [
            f"SELECT 'alt_text' AS source, s.key, s.caption, {words_sql('s.caption')} AS n_words, "
            f"{size} FROM scores s WHERE s.kept"
        ]
        alt_kw = files_sql(derived["scores"]) if "scores" in derived else "scores"
        kw_alt = ", ".join(
            (keyword_column(w) if "scores" in derived else f"{keyword_sql('caption', w)} AS {keyword_column(w)}")
            for w in keywords
        )
        kw_parts = [f"SELECT 'alt_text' AS source, key{', ' + kw_alt if kw_alt else ''} FROM {alt_kw} WHERE kept"]
        if "captions" in have:
            n = vlm_words_sql(src["captions"].columns, "c")
            has_words = vlm_has_words_sql(src["captions"].columns, "c")
            text_parts.append(
                f"SELECT c.source, c.key, c.caption, {n} AS n_words, {size} "
                f"FROM vlm_captions c LEFT JOIN scores s USING (key) WHERE {has_words}"
            )
            if "captions" in derived:
                # the same rows as Table 1's VLM sources: with words (the captioner's count), not errors
                kw_v = ", ".join(f"w.{keyword_column(w)}" for w in keywords)
                w_n = "coalesce(w.n_words, 0)" if "n_words" in src["captions"].columns else "w.words"
                kw_parts.append(
                    f"SELECT w.source, w.key{', ' + kw_v if kw_v else ''} FROM caption_words w "
                    f"WHERE {w_n} > 0 AND w.finish_reason IS DISTINCT FROM 'error'"
                )
            else:
                kw_v = ", ".join(f"{keyword_sql('c.caption', w)} AS {keyword_column(w)}" for w in keywords)
                kw_parts.append(
                    f"SELECT c.source, c.key{', ' + kw_v if kw_v else ''} FROM vlm_captions c WHERE {has_words}"
                )
        if "annotations" in have:
            text_parts.append(
                f"SELECT 'annotations_approved' AS source, a.key, a.text AS caption, {words_sql('a.text')} AS n_words, "
                f"{size} FROM annotations_approved a LEFT JOIN scores s USING (key)"
            )
            kw_a = ", ".join(f"{keyword_sql('a.text', w)} AS {keyword_column(w)}" for w in keywords)
            kw_parts.append(
                f"SELECT 'annotations_approved' AS source, a.key{', ' + kw_a if kw_a else ''} "
                "FROM annotations_approved a"
            )
        views.append(("caption_sources", "\nUNION ALL\n".join(text_parts)))
        views.append(("caption_keywords", "\nUNION ALL\n".join(kw_parts)))
    return views


def views_sql(views: list[tuple[str, str]], missing: list[str], derived: dict[str, str] | None = None) -> str:
    """The ``views.sql`` text: ``duckdb -c ".read views.sql" -c "SELECT ..."``; ``derived`` maps a
    table to its cache folder (named in a comment)."""
    lines = [
        "-- DuckDB views over the ParaDiffusion tables, read in place. Written by `paradiffusion stats`.",
        '-- Use: duckdb -c ".read views.sql" -c "SELECT source, count(DISTINCT key) FROM caption_sources GROUP BY 1"',
    ]
    if derived:
        lines.append(
            "-- caption_words and caption_keywords read the derived cache ("
            + ", ".join(derived.values())
            + "): the text read once per shard; rerun `make stats` after new shards to refresh it."
        )
    if missing:
        lines.append(f"-- Tables not found when this was written (no view): {', '.join(missing)}")
    for name, sql in views:
        lines.append(f"CREATE OR REPLACE VIEW {name} AS\n{sql};")
    return "\n\n".join(lines) + "\n"
