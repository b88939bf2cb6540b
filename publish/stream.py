"""ParaImage-Big's rows in bounded memory: the committed tables routed to their input shard, then joined per shard.

The rows of ParaImage-Big are the join of the kept ``scores`` rows, each key's selected caption
(``captioning.store.selected_captions_sql``), the list of every caption of the key and the licence
columns of the downloaded shards, ordered by input shard (``_unit``) and key. Done as one DuckDB
query over the whole data, the ordered list aggregate, the window and the final sort hold every
caption at once (1.5 GiB at 200 k caption rows, growing with the data). Here the same SQL runs
once per input shard:

1. route: one streaming pass over each table (the captions joined to the ``key -> input shard``
   map of the kept keys) appends each record batch's rows to an Arrow IPC file of its input shard
   in a scratch folder (uncompressed, written and memory-mapped back at disk speed; Parquet would
   spend its encoding time on files read once);
2. per input shard, in order: the same query (:func:`publish.rows.big_sql`) over that shard's
   files only, rows cut into output chunks of at most ``publish.shard_rows``.

Memory is bounded by the largest input shard (its rows and captions), not by the data: DuckDB runs
under a memory limit with a spill folder, and the route holds one record batch at a time.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from captioning.store import usable_caption_sql
from paradiffusion.log import get_logger

log = get_logger("publish")

#: DuckDB's working memory for the publish queries (beyond it, DuckDB spills to the scratch folder).
MEMORY_LIMIT = "256MB"
BATCH_ROWS = 16_384
#: The caption columns the per-shard query reads (the selection rule's and the ``captions`` lists').
ROUTED_CAPTION_COLUMNS = (
    "key",
    "caption",
    "n_words",
    "model_id",
    "model_revision",
    "prompt_id",
    "prompt_hash",
    "finish_reason",
    "created_at",
    "flags",
)
#: The captioning stage's usable caption, as its selection filters (regex before DuckDB's costly trim).
USABLE_CAPTION = usable_caption_sql("c.")


def limit_memory(con, scratch: str) -> None:
    """DuckDB under a memory limit, spilling to ``scratch``; insertion order not kept (the queries sort)."""
    con.execute(f"SET memory_limit = '{MEMORY_LIMIT}'")
    con.execute(f"SET temp_directory = '{os.path.join(scratch, 'spill').replace(chr(39), chr(39) * 2)}'")
    con.execute("SET preserve_insertion_order = false")


class Router:
    """Appends record batches to one Arrow IPC file per (table, input shard) under ``folder``."""

    def __init__(self, folder: str):
        self.folder = folder
        self.writers: dict[tuple[str, str], ipc.RecordBatchFileWriter] = {}
        self.schemas: dict[str, pa.Schema] = {}
        self.seen: set[str] = set()

    def path(self, name: str, unit: str) -> str:
        return os.path.join(self.folder, f"{name}-{unit}.arrow")

    def route(self, name: str, reader: pa.RecordBatchReader) -> None:
        """Rows of ``reader`` (with a ``_unit`` column) to the files of their unit, ``_unit`` dropped."""
        self.schemas[name] = reader.schema.remove(reader.schema.get_field_index("_unit"))
        for batch in reader:
            if not batch.num_rows:
                continue
            units = batch.column("_unit")
            rest = batch.drop_columns(["_unit"])
            uniq = pc.unique(units).to_pylist()
            for u in uniq:
                # one unit in the batch (the usual case when a table is written in key order): no copy
                piece = rest if len(uniq) == 1 else rest.filter(pc.equal(units, u))
                w = self.writers.get((name, u))
                if w is None:
                    w = self.writers[(name, u)] = ipc.new_file(self.path(name, u), self.schemas[name])
                    self.seen.add(u)
                w.write_batch(piece)

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        self.writers.clear()

    def units(self) -> list[str]:
        return sorted(self.seen)

    def read(self, name: str, unit: str) -> pa.Table:
        """The unit's rows of ``name`` (memory-mapped), or no rows with the table's schema."""
        p = self.path(name, unit)
        if not os.path.exists(p):
            return self.schemas[name].empty_table()
        with pa.memory_map(p) as src:
            return ipc.open_file(src).read_all()


def iter_big_chunks(con, plan, shard_rows: int) -> Iterator[tuple[str, pa.Table]]:
    """``(chunk id, rows)`` of ParaImage-Big: the rows of :func:`publish.rows.big_sql` per input shard,
    ordered by key, in chunks of at most ``shard_rows`` (``chunk id`` = ``<input shard>-<n>``)."""
    from publish.rows import big_sql, caption_lists

    with tempfile.TemporaryDirectory(prefix="paradiffusion-publish-") as scratch:
        limit_memory(con, scratch)
        router = Router(scratch)
        r = plan.route
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE _kept AS SELECT key, {r['unit']} AS _unit FROM {r['scores']} WHERE kept"
        )
        # the kept scores rows, each key's usable captions and its licence columns, to their input shard
        router.route(
            "s",
            con.sql(f"SELECT {r['unit']} AS _unit, * EXCLUDE (filename) FROM {r['scores']} WHERE kept").to_arrow_reader(
                BATCH_ROWS
            ),
        )
        router.route(
            "c",
            con.sql(
                f"SELECT k._unit, {', '.join('c.' + c for c in ROUTED_CAPTION_COLUMNS)} "
                f"FROM {r['captions']} c JOIN _kept k ON k.key = c.key WHERE {USABLE_CAPTION}"
            ).to_arrow_reader(BATCH_ROWS),
        )
        if r["license"]:
            router.route(
                "l",
                con.sql(f"SELECT k._unit, l.* FROM ({r['license']}) l JOIN _kept k ON k.key = l.key").to_arrow_reader(
                    BATCH_ROWS
                ),
            )
        con.execute("DROP TABLE _kept")
        router.close()
        for unit in router.units():
            tables = {n: router.read(n, unit) for n in router.schemas}
            for n, t in tables.items():
                con.register(f"_unit_{n}", t)
            sql = big_sql(
                "_unit_c",
                "_unit_s",
                "_unit_l" if "l" in tables else None,
                plan.extra_columns,
                plan.license_columns,
                r["rule"],
            )
            t = con.sql(sql).to_arrow_table()
            plan.stats["rows"] += t.num_rows
            t = t.add_column(
                t.schema.get_field_index("caption_flags") + 1, "captions", caption_lists(tables["c"], t["key"])
            )
            for n in tables:
                con.unregister(f"_unit_{n}")
            del tables
            for i, start in enumerate(range(0, t.num_rows, shard_rows)):
                yield f"{unit}-{i:03d}", t.slice(start, shard_rows)
            del t
