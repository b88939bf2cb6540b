"""Text-derived columns, computed once per shard and kept beside the report: the ``derived`` cache.

Reading a million long captions takes seconds; the statistics that need the text (word counts
recounted from it, keyword shares) need only a few numbers per caption. So ``make stats`` reads
each committed shard's text once and writes, under ``<stats.output>/derived/<table>/``::

    <shard>.parquet   one row per row of the source shard: key (+ the caption set's columns),
                      words (whitespace tokens), kw_<word> (does the text use the keyword?)
    <shard>.json      what it was made from: the source shard's commit marker and the keywords

A shard is recomputed when its commit marker changes (a rewrite, e.g. the captioner's dedupe),
when the keyword list gains a word, or when the cache file is missing; the cache of a shard
that is gone is removed. It covers ``captions`` (VLM text) and ``scores`` (alt text); the
annotations are few and are read directly.

This is a cache owned by ``stats``: the captioning stage's table is not touched (its own
``n_words`` uses the captioner's word rule; ``words`` here is the whitespace count every other
source uses). Every file is written to a temporary name and renamed, so a killed run leaves no
half file; the marker is written last.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from paradiffusion.log import get_logger
from paradiffusion.storage import Table

log = get_logger("stats")

#: table -> (text column, the other columns copied into the cache: every column a canned query
#: reads, so the per-shard partial aggregates and the key-level pass never open the source shard)
TEXT_TABLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "captions": (
        "caption",
        (
            "key",
            "model_id",
            "model_revision",
            "prompt_id",
            "prompt_hash",
            "finish_reason",
            "n_words",
            "seconds",
            "created_at",
            "flags",
        ),
    ),
    "scores": ("caption", ("key", "kept", "width", "height", "reject_reason")),
}

#: Bumped when the cache's columns or partials change: every shard is computed again.
CACHE_VERSION = 3


def keyword_column(word: str) -> str:
    return "kw_" + "".join(c if c.isalnum() else "_" for c in word.lower())


def keyword_sql(col: str, word: str) -> str:
    """SQL: does ``col`` contain ``word`` as a whole word (case-insensitive)? False for null."""
    pattern = "(?i)\\b" + "".join(c if c.isalnum() else "\\" + c for c in word) + "\\b"
    return f"coalesce(regexp_matches({col}, '{pattern}'), false)"


@dataclass
class DerivedState:
    """What :func:`refresh` found and did, per table."""

    folders: dict[str, str] = field(default_factory=dict)  # table -> cache folder (only complete ones)
    files: dict[str, list[str]] = field(default_factory=dict)  # table -> per-row cache file of each committed shard
    idents: dict[str, dict[str, dict]] = field(default_factory=dict)  # table -> shard -> what its cache was made from
    computed: dict[str, int] = field(default_factory=dict)  # table -> shards (re)computed this run
    reused: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def cache_dir(stats_dir: str | Path) -> Path:
    return Path(stats_dir) / "derived"


def refresh(con, stats_dir: str | Path, tables: dict[str, str], keywords: list[str]) -> DerivedState:
    """Bring the cache of each table in ``tables`` (name -> table folder) up to date.

    ``con`` is a DuckDB connection (its threads do the reading). Returns the folders that now
    hold one cache file per committed shard. Beside each shard's per-row file it writes the
    shard's partial aggregates (:func:`stats.aggregates.write_partials`); the ``.json`` written
    last commits all of them.
    """
    import duckdb

    from stats.aggregates import PARTS, write_partials
    from stats.views import words_sql

    state = DerivedState()
    t0 = time.perf_counter()
    want_kw = sorted({w for w in keywords})
    for name, url in tables.items():
        if name not in TEXT_TABLES:
            continue
        text, keep = TEXT_TABLES[name]
        src = Table(url)
        done = sorted(src.done_shards())
        if not done or "://" in url:
            continue  # an object-store table is read in place by the views, never cached locally
        folder = cache_dir(stats_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        present = {p.stem for p in folder.glob("*.json")}
        for stale in present - set(done):
            (folder / f"{stale}.json").unlink(missing_ok=True)
            (folder / f"{stale}.parquet").unlink(missing_ok=True)
            for part in PARTS[name]:
                (folder / f"{stale}.{part}.parquet").unlink(missing_ok=True)
        computed = reused = 0
        idents: dict[str, dict] = {}
        markers = src.markers()
        for shard in done:
            marker = markers[shard]
            # the partials hold sums per keyword: a changed keyword list recomputes them
            ident = {"marker": marker, "keywords": want_kw, "version": CACHE_VERSION, "duckdb": duckdb.__version__}
            meta = folder / f"{shard}.json"
            files = [folder / f"{shard}.parquet", *(folder / f"{shard}.{p}.parquet" for p in PARTS[name])]
            if meta.exists() and all(f.exists() for f in files):
                old = json.loads(meta.read_text())
                if old == ident:
                    reused += 1
                    idents[shard] = ident
                    continue
            meta.unlink(missing_ok=True)  # uncommitted while its files are replaced
            cols = [c for c in keep]
            have = set(_schema_names(src.shard_file(shard)))
            select = [c if c in have else f"NULL AS {c}" for c in cols]
            if name == "captions" and "n_words" not in have and text in have:
                select[cols.index("n_words")] = f"{words_sql(text)} AS n_words"  # what the views count then
            # the key as a 64-bit hash: the key-level pass joins and counts these, not strings
            select.append("hash(key) AS kh")
            if name == "captions":  # the caption set as one number: the key-level pass groups by (sid, kh)
                select.append("hash(model_id, model_revision, prompt_id, prompt_hash) AS sid")
            select.append(f"{words_sql(text)} AS words" if text in have else "0 AS words")
            for w in want_kw:
                select.append(f"{keyword_sql(text, w) if text in have else 'false'} AS {keyword_column(w)}")
            tmp = folder / f".{shard}.parquet.tmp"
            con.execute(
                f"COPY (SELECT {', '.join(select)} FROM read_parquet('{_q(src.shard_file(shard))}')) "
                f"TO '{_q(str(tmp))}' (FORMAT parquet, COMPRESSION zstd)"
            )
            os.replace(tmp, folder / f"{shard}.parquet")
            write_partials(con, name, folder, shard, want_kw)
            tmp_meta = folder / f".{shard}.json.tmp"
            tmp_meta.write_text(json.dumps(ident))
            os.replace(tmp_meta, meta)
            computed += 1
            idents[shard] = ident
        state.folders[name] = str(folder)
        state.files[name] = [str(folder / f"{s}.parquet") for s in done]
        state.idents[name] = idents
        state.computed[name] = computed
        state.reused[name] = reused
        if computed:
            log.info("derived %s: read the text of %d shard(s), %d reused", name, computed, reused)
    state.seconds = time.perf_counter() - t0
    return state


def _schema_names(path: str) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_schema(path).names


def _q(s: str) -> str:
    return s.replace("'", "''")
