"""The ``captions`` table: what is done, removing superseded rows, and the selected caption.

Rows are one per key x (model, revision, prompt text). Captions of different models
and prompts coexist; within one caption set a key has one row. Two cases could leave
a second row for a key: an ``error`` row retried by a later run, and ``--recaption``.
:func:`dedupe` removes the older row (shard by shard, through atomic rewrites), at the
start and at the end of every run, so a run killed between the two heals on the next.

The *selected caption* picks one caption per key among all sets by a configured rule
(:class:`captioning.config.SelectRule`). It is one SQL statement
(:func:`selected_captions_sql`), used by :func:`select_captions` on Arrow tables and
by :func:`create_selected_view` as a DuckDB view over the Parquet shards in place, so
the Python function and the SQL view cannot disagree.
"""

from __future__ import annotations

from collections import defaultdict

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from captioning.config import SelectRule
from paradiffusion.log import get_logger
from paradiffusion.storage import Table

log = get_logger("captioning")

_STATE_COLUMNS = ["key", "model_id", "model_revision", "prompt_hash", "finish_reason", "created_at"]


def _set_shards(table: Table, prefix: str) -> list[str]:
    return sorted(s for s in table.done_shards() if s.startswith(prefix))


def read_state(table: Table, prefix: str) -> pa.Table:
    """Key, status and shard name of every committed row whose shard name starts with ``prefix``."""
    parts = []
    for s in _set_shards(table, prefix):
        t = pq.read_table(table.shard_file(s), filesystem=table.fs, columns=_STATE_COLUMNS)
        parts.append(t.append_column("shard", pa.array([s] * t.num_rows, pa.string())))
    if not parts:
        schema = pa.schema([table.schema.field(c) for c in _STATE_COLUMNS] + [pa.field("shard", pa.string())])
        return schema.empty_table()
    return pa.concat_tables(parts)


def done_keys(state: pa.Table, model_id: str, revision: str | None, phash: str) -> set[str]:
    """Keys with a caption (any finish reason but ``error``) from this exact model, revision and prompt."""
    if state.num_rows == 0:
        return set()
    mask = pc.and_(
        pc.and_(pc.equal(state["model_id"], model_id), pc.equal(state["prompt_hash"], phash)),
        pc.not_equal(state["finish_reason"], "error"),
    )
    rev = pc.is_null(state["model_revision"]) if revision is None else pc.equal(state["model_revision"], revision)
    mask = pc.and_(mask, rev)
    return set(state.filter(pc.fill_null(mask, False))["key"].to_pylist())


def dedupe(table: Table, prefix: str) -> int:
    """Keep one row per key among the shards of one caption set; returns rows removed.

    The winner is the newest non-error row (newest error row if all failed). Shards
    that lose rows are rewritten under the same name (atomic, committed by marker).
    """
    state = read_state(table, prefix)
    if state.num_rows == 0:
        return 0
    best: dict[str, tuple] = {}
    rows = zip(
        state["key"].to_pylist(),
        state["finish_reason"].to_pylist(),
        state["created_at"].to_pylist(),
        state["shard"].to_pylist(),
        strict=True,
    )
    entries = []
    for key, reason, created, shard in rows:
        rank = (reason != "error", created.timestamp() if created else 0.0, shard)
        entries.append((key, rank, shard))
        if key not in best or rank > best[key]:
            best[key] = rank
    losers: dict[str, list[str]] = defaultdict(list)
    for key, _rank, shard in entries:
        if shard != best[key][2]:  # the winner's own shard keeps its rows (a writer never repeats a key)
            losers[shard].append(key)
    removed = 0
    for shard, keys in losers.items():
        full = pq.read_table(table.shard_file(shard), filesystem=table.fs)
        drop = pa.array(sorted(set(keys)), pa.string())
        keep = full.filter(pc.invert(pc.is_in(full["key"], value_set=drop)))
        removed += full.num_rows - keep.num_rows
        table.write_shard(shard, keep, meta={"deduped": full.num_rows - keep.num_rows})
    if removed:
        log.info("removed %d superseded caption row(s) from %d shard(s)", removed, len(losers))
    return removed


# --------------------------------------------------------------------------- selection
def _quote(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def usable_caption_sql(alias: str = "") -> str:
    """A caption the selection can pick: not an error, not NULL, text left after DuckDB's ``trim``.
    ``trim`` costs ~9 s per million captions of ~640 characters, so a caption with an ASCII letter or
    digit (which no trim can empty) passes on a regex match first (~0.5 s); only the others are trimmed.
    ``alias``: the table's prefix in the query (``"c."``)."""
    c = f"{alias}caption"
    return (
        f"{alias}finish_reason IS DISTINCT FROM 'error' AND {c} IS NOT NULL "
        f"AND (regexp_matches({c}, '[0-9A-Za-z]') OR length(trim({c})) > 0)"
    )


def selected_captions_sql(source: str, rule: SelectRule) -> str:
    """SQL selecting one caption per key from ``source`` (a table name or ``read_parquet(...)``).

    Order of preference: the first matching ``rule.prefer`` entry, then ``rule.then``
    (fewest flags, latest or longest), then the newest. Error rows, empty captions
    and captions with any of ``rule.exclude_flags`` never win.
    """
    cases = []
    for i, p in enumerate(rule.prefer):
        conds = []
        if p.model is not None:
            conds.append(f"model_id = {_quote(p.model)}")
        if p.prompt is not None:
            conds.append(f"prompt_id = {_quote(p.prompt)}")
        if conds:
            cases.append(f"WHEN {' AND '.join(conds)} THEN {i}")
    prefer = f"CASE {' '.join(cases)} ELSE {len(rule.prefer)} END" if cases else "0"
    then = {
        "fewest_flags": "len(coalesce(flags, []::VARCHAR[])) ASC, n_words DESC",
        "latest": "created_at DESC",
        "longest": "n_words DESC",
    }[rule.then]
    where = [usable_caption_sql()]
    if rule.exclude_flags:
        excluded = ", ".join(_quote(f) for f in rule.exclude_flags)
        where.append(f"NOT list_has_any(coalesce(flags, []::VARCHAR[]), [{excluded}]::VARCHAR[])")
    return (
        "SELECT * EXCLUDE (_pick) FROM (\n"
        f"  SELECT *, row_number() OVER (PARTITION BY key ORDER BY {prefer}, {then}, created_at DESC, "
        "model_id, prompt_id) AS _pick\n"
        f"  FROM {source}\n"
        f"  WHERE {' AND '.join(where)}\n"
        ") WHERE _pick = 1"
    )


def select_captions(captions: pa.Table, rule: SelectRule) -> pa.Table:
    """One caption per key from an Arrow ``captions`` table, by ``rule`` (the same SQL as the view)."""
    import duckdb

    con = duckdb.connect()
    try:
        con.register("captions_in", captions)
        return con.sql(selected_captions_sql("captions_in", rule) + " ORDER BY key").to_arrow_table()
    finally:
        con.close()


def create_selected_view(con, captions_url: str, rule: SelectRule, name: str = "selected_captions") -> str:
    """Create (or replace) a DuckDB view of the selected captions over the table's committed shards in place.

    Returns the SQL of the view. ``con`` is a ``duckdb`` connection (:func:`paradiffusion.storage.duckdb_connect`
    for a URL); the view lists the shards committed when it is made (their markers, never a glob:
    a shard without a marker is not read), so make it again to see shards committed later.
    """
    from paradiffusion.schemas import CAPTIONS

    source = Table(captions_url, CAPTIONS).sql_source()
    sql = f"CREATE OR REPLACE VIEW {name} AS\n{selected_captions_sql(source, rule)}"
    con.execute(sql)
    return sql
