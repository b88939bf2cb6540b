"""One way to read a table: the committed shard list from the markers, on local disk and on S3.

For every table the project writes, a shard planted without a marker and a committed shard
whose marker was removed must be invisible to every reader: ``Table`` itself, DuckDB through
``Table.sql_source``, the caption selection view, the annotation drafts, the training caption
loader, and the images table's reader (img2dataset's ``_stats.json`` is its marker). Then the
next writer removes the leftovers (older than its run's start), on S3 too, with one log line.
"""

import datetime as _dt
import io
import logging
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eval.schemas import DPG_ANSWERS, EVAL_IMAGES, EVAL_METRICS, VOTES
from paradiffusion.schemas import TABLES
from paradiffusion.storage import Table, duckdb_connect, join
from training.latents import LATENTS
from training.text_cache import TEXT_CACHE

SCHEMAS = {
    **TABLES,
    "scores/_measure": TABLES["scores"],
    "eval/images": EVAL_IMAGES,
    "eval/metrics": EVAL_METRICS,
    "eval/metrics/dpg_answers": DPG_ANSWERS,
    "eval/votes/export": VOTES,
    "latents/stage1": LATENTS,
    "text_cache/stage1": TEXT_CACHE,
}


def _value(t: pa.DataType, key: str, i: int):
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return key if i == 0 else f"{key}-v{i}"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return b"\x00" * (t.byte_width if pa.types.is_fixed_size_binary(t) else 4)
    if pa.types.is_boolean(t):
        return True
    if pa.types.is_integer(t):
        return 3
    if pa.types.is_floating(t):
        return 0.5
    if pa.types.is_timestamp(t):
        return _dt.datetime(2024, 1, 1, tzinfo=_dt.timezone.utc)
    if pa.types.is_date(t):
        return _dt.date(2024, 1, 1)
    if pa.types.is_fixed_size_list(t):
        return [_value(t.value_type, key, 1)] * t.list_size
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return [_value(t.value_type, key, 1)]
    if pa.types.is_struct(t):
        return {f.name: _value(f.type, key, 1) for f in t}
    if pa.types.is_map(t):
        return [(_value(t.key_type, key, 1), _value(t.item_type, key, 1))]
    raise AssertionError(f"no sample value for {t}")


def rows(schema: pa.Schema, keys: list[str]) -> pa.Table:
    strings = [f.name for f in schema if pa.types.is_string(f.type)]
    key_col = "key" if "key" in schema.names else ("text_hash" if "text_hash" in schema.names else strings[0])
    data = []
    for k in keys:
        row = {f.name: _value(f.type, k, 0 if f.name == key_col else 1) for f in schema}
        if "caption" in schema.names:
            row["caption"] = f"a caption of {k}"
        if "finish_reason" in schema.names:
            row["finish_reason"] = "stop"
        data.append(row)
    return pa.Table.from_pylist(data, schema=schema), key_col


def plant(t: Table, schema: pa.Schema) -> str:
    """Two committed shards, a third whose marker is removed, a fourth planted without one;
    returns the name of the key column."""
    good, key_col = rows(schema, ["good-1"])
    t.write_shard("00000", good)
    t.write_shard("00001", rows(schema, ["good-2"])[0])
    t.write_shard("00002", rows(schema, ["unmarked"])[0])
    t.fs.rm(t.marker_file("00002"))  # a marker removed: the shard is no longer committed
    buf = io.BytesIO()
    pq.write_table(rows(schema, ["planted"])[0], buf)
    t.fs.pipe_file(t.shard_file("00003"), buf.getvalue())  # a shard whose marker never came
    return key_col


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "data")
    return join(request.getfixturevalue("s3_root"), "data")


GOOD = ["good-1", "good-2"]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_reader_of_every_table_ignores_uncommitted_shards(root, name):
    schema = SCHEMAS[name]
    t = Table(join(root, name), schema)
    key_col = plant(t, schema)
    assert t.fs.exists(t.shard_file("00002")) and t.fs.exists(t.shard_file("00003"))

    assert t.done_shards() == {"00000", "00001"}
    assert sorted(t.read(columns=[key_col])[key_col].to_pylist()) == GOOD
    assert [s for s, _ in t.iter_shards(columns=[key_col])] == ["00000", "00001"]
    assert t.count_rows() == 2 and sorted(t.markers()) == ["00000", "00001"]
    assert [f.rsplit("/", 1)[-1] for f in t.files()] == ["part-00000.parquet", "part-00001.parquet"]
    con = duckdb_connect()
    got = con.execute(f"SELECT {key_col} FROM {t.sql_source()} ORDER BY 1").fetchall()
    assert [r[0] for r in got] == GOOD
    # a fresh Table (no schema) over the same folder reads the same
    assert sorted(Table(t.url).read(columns=[key_col])[key_col].to_pylist()) == GOOD


def test_caption_readers_ignore_uncommitted_shards(root):
    from captioning.small.annotations import draft_captions
    from captioning.store import create_selected_view
    from pipelines.config import load_config
    from training.data import load_caption_map

    cfg = load_config(None, [f"project.data_root={root}"])
    captions = Table(join(root, "captions"), TABLES["captions"])
    plant(captions, TABLES["captions"])
    con = duckdb_connect()
    create_selected_view(con, captions.url, cfg.caption.select)
    assert [r[0] for r in con.execute("SELECT key FROM selected_captions ORDER BY key").fetchall()] == GOOD
    drafts = draft_captions(cfg, ["good-1", "good-2", "unmarked", "planted"])
    assert sorted(drafts) == GOOD
    assert sorted(load_caption_map("captions", captions.url)) == GOOD

    small = Table(join(root, "small_train"), TABLES["small_train"])
    plant(small, TABLES["small_train"])
    assert sorted(load_caption_map("table", small.url)) == GOOD
    # every marker gone: the training loader says so instead of globbing what is left
    for s in ("00000", "00001"):
        small.fs.rm(small.marker_file(s))
    with pytest.raises(FileNotFoundError, match="no committed shard"):
        load_caption_map("table", small.url)


def test_images_reader_takes_only_shards_with_their_stats(root):
    """The images table is img2dataset's: ``<shard>_stats.json``, written last, is its marker."""
    from paradiffusion.images import image_shards

    fs, path = Table(join(root, "images")).fs, Table(join(root, "images")).path
    fs.makedirs(path, exist_ok=True)  # the bucket exists on S3: nothing is created there
    buf = io.BytesIO()
    pq.write_table(pa.table({"key": ["a"], "status": ["success"], "jpg": [b"x"]}), buf)
    for shard in ("00000", "00001"):
        fs.pipe_file(join(path, f"{shard}.parquet"), buf.getvalue())
    fs.pipe_file(join(path, "00000_stats.json"), b"{}")
    assert [s for s, _ in image_shards(join(root, "images"))] == ["00000"]


def test_the_next_writer_removes_leftovers_older_than_its_run(root, caplog):
    from paradiffusion import storage

    t = Table(join(root, "scores"), TABLES["scores"])
    plant(t, TABLES["scores"])
    t.fs.pipe_file(t._p(".tmp", "abc-part-00004.parquet"), b"PAR1 half")
    # a run that started before the leftovers were written (another rank, a little later) keeps them
    previous = storage.mark_run_start(time.time() - 60)
    try:
        assert t.clean_tmp() == 0
    finally:
        storage.reset_run_start(previous)
    assert t.fs.exists(t.shard_file("00003"))
    time.sleep(1.1)  # S3 keeps modification times in whole seconds
    with caplog.at_level(logging.INFO, logger="pd.storage"):
        assert t.clean_tmp(started=time.time() + storage._CLOCK_SLACK_S) == 3
    lines = [r.getMessage() for r in caplog.records if "leftover" in r.getMessage()]
    assert len(lines) == 1 and "removed 3 leftover file(s)" in lines[0] and t.url in lines[0]
    assert not t.fs.exists(t.shard_file("00002")) and not t.fs.exists(t.shard_file("00003"))
    assert sorted(t.read()["key"].to_pylist()) == GOOD
    assert t.clean_tmp() == 0  # nothing left, nothing logged twice
