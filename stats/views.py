"""DuckDB views over every Parquet table, read in place (no second copy).

:func:`build_views` returns ``(name, sql)`` pairs for the tables that exist; :func:`views_sql`
renders them as a ``views.sql`` that the duckdb CLI can ``.read``. Base views read the
shard globs, so they see new shards without being regenerated; derived views add word counts,
the selected caption per key (the captioning stage's ``caption.select`` rule) and every
caption source in one shape.

Words: alt text and annotations are counted here as whitespace-separated tokens
(:func:`words_sql`, the same count as Python's ``len(t.split())`` for ASCII whitespace). VLM
captions use the ``n_words`` the captioner stored (``captioning.quality.words``: runs of letters
and digits, so a lone "-" is not a word), so Table 1 and the histogram never read the long
caption text; the ``caption_words`` view recounts them the whitespace way for ad-hoc checks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import fsspec
import pyarrow.parquet as pq

from paradiffusion.config import PipelinesConfig
from paradiffusion.images import IMAGE_COLUMNS
from paradiffusion.storage import join

#: Base tables: view name -> (folder under data_root, shard glob inside it).
BASE_TABLES = {
    "images": ("images", "*.parquet"),
    "scores": ("scores", "part-*.parquet"),
    "captions": ("captions", "part-*.parquet"),
    "candidates": ("candidates", "part-*.parquet"),
    "annotations": ("annotations", "part-*.parquet"),
    "small_train": ("small_train", "part-*.parquet"),
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


def selected_sql(captions_glob: str, cfg: PipelinesConfig) -> str:
    """The selected caption per key: the captioning stage's rule (``caption.select``), so the
    view, the annotation drafts and the captioner agree."""
    from captioning.store import selected_captions_sql

    return selected_captions_sql(f"read_parquet({_lit(captions_glob)}, union_by_name = true)", cfg.caption.select)


@dataclass
class Source:
    """Where one base table lives and whether it has shards."""

    name: str
    glob: str
    exists: bool
    columns: list[str]


def find_sources(cfg: PipelinesConfig) -> dict[str, Source]:
    """The base tables under ``data_root`` (and ``stats.images``), with their columns."""
    out = {}
    for name, (folder, pattern) in BASE_TABLES.items():
        url = cfg.stats.images if name == "images" and cfg.stats.images else join(cfg.project.data_root, folder)
        fs, path = fsspec.core.url_to_fs(url)
        files = sorted(fs.glob(join(path, pattern))) if fs.exists(path) else []
        cols: list[str] = []
        if files:
            cols = pq.read_schema(files[0], filesystem=fs).names
        if "://" not in url:
            url = os.path.abspath(url)  # views in a .duckdb file must not depend on the working folder
        out[name] = Source(name, join(url, pattern), bool(files), cols)
    return out


def build_views(cfg: PipelinesConfig, sources: dict[str, Source] | None = None) -> list[tuple[str, str]]:
    """``(view name, SELECT ...)`` for every view whose tables exist, in dependency order."""
    src = sources or find_sources(cfg)
    have = {n for n, s in src.items() if s.exists}
    views: list[tuple[str, str]] = []
    for name in BASE_TABLES:
        if name not in have:
            continue
        drop = [c for c in src[name].columns if c in HEAVY_COLUMNS]
        exclude = f" EXCLUDE ({', '.join(drop)})" if drop else ""
        views.append((name, f"SELECT *{exclude} FROM read_parquet({_lit(src[name].glob)}, union_by_name = true)"))
    if "captions" in have:
        views.append(("caption_words", f"SELECT *, {words_sql('caption')} AS words FROM captions"))
        views.append(("selected_captions", selected_sql(src["captions"].glob, cfg)))
    if "annotations" in have:
        views.append(
            (
                "annotations_current",
                "SELECT * FROM annotations QUALIFY row_number() OVER (PARTITION BY key ORDER BY version DESC) = 1",
            )
        )
        views.append(
            (
                "annotations_approved",
                "SELECT * FROM annotations WHERE state = 'approved' "
                "QUALIFY row_number() OVER (PARTITION BY key ORDER BY version DESC) = 1",
            )
        )
    if "scores" in have:
        size = "least(s.width, s.height) AS short_side"
        parts = [
            f"SELECT 'alt_text' AS source, s.key, s.caption, {words_sql('s.caption')} AS n_words, "
            f"least(s.width, s.height) AS short_side FROM scores s WHERE s.kept"
        ]
        if "captions" in have:
            n = "c.n_words" if "n_words" in src["captions"].columns else words_sql("c.caption")
            parts.append(
                f"SELECT 'vlm:' || c.model_id || '/' || c.prompt_id AS source, c.key, c.caption, {n} AS n_words, "
                f"{size} FROM captions c JOIN scores s USING (key)"
            )
        if "annotations" in have:
            parts.append(
                f"SELECT 'annotations_approved' AS source, a.key, a.text AS caption, {words_sql('a.text')} AS n_words, "
                f"{size} FROM annotations_approved a JOIN scores s USING (key)"
            )
        views.append(("caption_sources", "\nUNION ALL\n".join(parts)))
    return views


def views_sql(views: list[tuple[str, str]], missing: list[str]) -> str:
    """The ``views.sql`` text: ``duckdb -c ".read views.sql" -c "SELECT ..."``."""
    lines = [
        "-- DuckDB views over the ParaDiffusion tables, read in place. Written by `paradiffusion stats`.",
        '-- Use: duckdb -c ".read views.sql" -c "SELECT source, count(*) FROM caption_sources GROUP BY 1"',
    ]
    if missing:
        lines.append(f"-- Tables not found when this was written (no view): {', '.join(missing)}")
    for name, sql in views:
        lines.append(f"CREATE OR REPLACE VIEW {name} AS\n{sql};")
    return "\n\n".join(lines) + "\n"
