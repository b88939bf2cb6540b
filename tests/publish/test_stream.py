"""ParaImage-Big streamed per input shard gives the rows of one query over all the data."""

from __future__ import annotations

import datetime as dt
import io

import pyarrow as pa
import pyarrow.parquet as pq

from paradiffusion.schemas import CAPTIONS
from paradiffusion.storage import Table, duckdb_connect
from publish.rows import CAPTION_FIELDS, big_plan, big_sql, caption_lists
from publish.run import _rechunked
from publish.stream import iter_big_chunks


def _reference(con, plan) -> pa.Table:
    """The rows as one query over every table: the join, and each key's captions by DuckDB's ordered
    list aggregate over the usable captions (the exact trim test of the captioning stage)."""
    r = plan.route
    rows = con.sql(
        big_sql(r["captions"], r["scores"], f"({r['license']})", plan.extra_columns, plan.license_columns, r["rule"])
    ).to_arrow_table()
    fields = ", ".join(f"'{c}': {'coalesce(flags, []::VARCHAR[])' if c == 'flags' else c}" for c in CAPTION_FIELDS)
    lists = con.sql(
        f"SELECT key, list({{{fields}}} ORDER BY model_id, prompt_id, prompt_hash, model_revision) AS captions "
        f"FROM {r['captions']} WHERE finish_reason IS DISTINCT FROM 'error' AND caption IS NOT NULL "
        "AND length(trim(caption)) > 0 GROUP BY key"
    ).fetchall()
    by_key = dict(lists)
    return rows.add_column(
        rows.schema.get_field_index("caption_flags") + 1,
        "captions",
        pa.array([by_key.get(k) for k in rows["key"].to_pylist()]),
    )


def test_streamed_rows_equal_one_query_over_all_data(data, make_cfg, new_caption):
    root, raw = data
    import random

    rng = random.Random(3)
    kept = raw["kept"]
    # captions a trim empties (spaces, no-break spaces) are not usable; one key has only such a caption
    blank = [
        new_caption(rng, kept[0], "blank", 0, 200) | {"caption": "  \u00a0 "},
        new_caption(rng, kept[-1], "blank", 0, 201) | {"caption": "\u2003"},
        new_caption(rng, kept[1], "zeta", 12, 202) | {"caption": "\u00e9t\u00e9 \u00e0 la plage"},  # no ASCII letter
    ]
    Table(str(root / "captions"), CAPTIONS).write_shard("blank-00000", pa.Table.from_pylist(blank, schema=CAPTIONS))
    cfg = make_cfg(root)
    con = duckdb_connect()
    plan = big_plan(cfg, con)
    ref = _reference(con, plan)
    chunks = list(iter_big_chunks(con, plan, shard_rows=4))
    assert [c for c, _ in chunks][:2] == ["00000-000", "00000-001"]
    assert all(t.num_rows <= 4 for _, t in chunks)
    got = pa.concat_tables([t for _, t in chunks])
    assert got.column_names == ref.column_names
    assert got.to_pylist() == ref.to_pylist()
    assert plan.stats["rows"] == ref.num_rows
    assert kept[-1] not in got["key"].to_pylist()  # its only caption is blank: no selected caption
    entries = {r["key"]: r["captions"] for r in got.to_pylist()}
    assert "blank" not in {c["model_id"] for c in entries[kept[0]]}
    assert "zeta" in {c["model_id"] for c in entries[kept[1]]}


def test_caption_lists_order_ties_flags_and_missing_keys():
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)

    def row(key, model, minutes, caption, flags):
        return {
            "key": key,
            "caption": caption,
            "n_words": len(caption.split()),
            "model_id": model,
            "model_revision": "r1",
            "prompt_id": "paper",
            "prompt_hash": "h",
            "finish_reason": "stop",
            "created_at": t0 + dt.timedelta(minutes=minutes),
            "flags": flags,
        }

    caps = pa.Table.from_pylist(
        [
            row("b", "zeta", 0, "b by zeta", None),
            row("a", "alpha", 5, "a second run", ["repetition"]),
            row("a", "alpha", 1, "a first run", []),
            row("b", "alpha", 0, "b by alpha", None),
        ],
        schema=pa.schema([CAPTIONS.field(c) for c in ("key", *CAPTION_FIELDS, "created_at")]),
    )
    out = caption_lists(caps, pa.array(["b", "none", "a"])).to_pylist()
    assert [c["caption"] for c in out[0]] == ["b by alpha", "b by zeta"]  # by model
    assert out[0][0]["flags"] == []  # null flags: an empty list
    assert out[1] is None  # a key without captions
    assert [c["caption"] for c in out[2]] == ["a first run", "a second run"]  # a tie: by time
    assert list(out[2][1]) == list(CAPTION_FIELDS)


def test_shard_bytes_do_not_depend_on_how_rows_were_chunked():
    # distinct texts of a few MB (past the dictionary and a data page, as captions are)
    t = pa.table({"text": [f"caption {i:06d} " * 20 for i in range(20_000)], "n": list(range(20_000))})
    other = pa.Table.from_batches(t.to_batches(max_chunksize=3_000))

    def parquet(x):
        buf = io.BytesIO()
        pq.write_table(_rechunked(x), buf, compression="zstd")
        return buf.getvalue()

    def raw(x):
        buf = io.BytesIO()
        pq.write_table(x, buf, compression="zstd")
        return buf.getvalue()

    assert raw(t) != raw(other)  # what the fixed chunking is for
    assert parquet(t) == parquet(other)
