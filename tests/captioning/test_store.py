"""The captions table (done keys, superseded rows, the selected caption) and work planning (chunks, buckets)."""

import datetime as dt
from pathlib import Path

import duckdb
import pyarrow as pa

from captioning.config import SelectPreference, SelectRule
from captioning.prep import caption_tag, nearest_bucket, plan_chunks, tag_prefix
from captioning.store import create_selected_view, dedupe, done_keys, read_state, select_captions
from paradiffusion.schemas import CAPTIONS
from paradiffusion.storage import Table

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def row(key, model="m/a", prompt="paper", caption="words " * 60, flags=(), finish="stop", minutes=0, phash="h1"):
    return {
        "key": key,
        "caption": caption,
        "n_words": len((caption or "").split()),
        "n_tokens": 10,
        "model_id": model,
        "model_revision": "r1",
        "prompt_id": prompt,
        "prompt_hash": phash,
        "finish_reason": finish,
        "created_at": T0 + dt.timedelta(minutes=minutes),
        "flags": list(flags),
    }


def table_of(rows):
    return pa.Table.from_pylist(rows, schema=CAPTIONS)


def test_select_prefers_configured_model_then_fewest_flags():
    rows = [
        row("k1", model="m/a"),
        row("k1", model="m/b"),
        row("k2", model="m/a", flags=["refusal"]),
        row("k2", model="m/b", flags=["too_short"]),
        row("k3", model="m/a", flags=["truncated", "repetition"], minutes=1),
        row("k3", model="m/a", prompt="short"),
        row("k4", model="m/a", finish="error", caption=None, flags=["error"]),
    ]
    rule = SelectRule(prefer=[SelectPreference(model="m/b")])
    got = {r["key"]: (r["model_id"], r["prompt_id"]) for r in select_captions(table_of(rows), rule).to_pylist()}
    # k1: preferred model; k2: m/a is a refusal (excluded); k3: no m/b caption, fewest flags wins; k4: only an error
    assert got == {"k1": ("m/b", "paper"), "k2": ("m/b", "paper"), "k3": ("m/a", "short")}
    latest = select_captions(table_of(rows), SelectRule(then="latest"))
    assert {r["key"]: r["prompt_id"] for r in latest.to_pylist()}["k3"] == "paper"


def test_a_caption_is_usable_exactly_when_trim_leaves_text():
    """The regex shortcut before DuckDB's trim keeps trim's meaning for every kind of blank: DuckDB's
    trim removes spaces and no-break spaces, not tabs or newlines; text without ASCII letters counts."""
    texts = [
        "",
        " ",
        "   ",
        "\u00a0",
        " \u00a0 ",
        "\t",
        "\n",
        " a ",
        "\u732b",
        "\u03a9\u03bc\u03ad\u03b3\u03b1",
        "1",
        "?",
    ]
    rows = [row(f"k{i:02d}", caption=t) for i, t in enumerate(texts)]
    got = {r["key"] for r in select_captions(table_of(rows), SelectRule()).to_pylist()}
    con = duckdb.connect()
    want = {f"k{i:02d}" for i, t in enumerate(texts) if con.execute("SELECT length(trim(?)) > 0", [t]).fetchone()[0]}
    assert got == want
    assert "k01" not in got and "k03" not in got and {"k05", "k08", "k11"} <= got


def test_view_over_parquet_agrees_with_function(tmp_path):
    rows = [
        row("k1"),
        row("k1", model="m/b", minutes=2),
        row("k2", model="m/b", flags=["empty"], caption=""),
        row("k2", model="m/a", prompt="short"),
    ]
    t = Table(str(tmp_path / "captions"), CAPTIONS)
    t.write_shard("a", table_of(rows[:2]))
    t.write_shard("b", table_of(rows[2:]))
    rule = SelectRule(prefer=[SelectPreference(prompt="short"), SelectPreference(model="m/a")])
    con = duckdb.connect()
    create_selected_view(con, t.url, rule)
    from_view = sorted(con.execute("SELECT key, model_id, prompt_id FROM selected_captions").fetchall())
    from_fn = sorted((r["key"], r["model_id"], r["prompt_id"]) for r in select_captions(t.read(), rule).to_pylist())
    assert from_view == from_fn == [("k1", "m/a", "paper"), ("k2", "m/a", "short")]
    assert con.execute("SELECT count(*) = count(DISTINCT key) FROM selected_captions").fetchone()[0]


def test_done_keys_and_dedupe(tmp_path):
    t = Table(str(tmp_path / "captions"), CAPTIONS)
    pre = tag_prefix("m/a", "r1", "h1")
    t.write_shard(pre + "p--s--1", table_of([row("k1"), row("k2", finish="error", caption=None, flags=["error"])]))
    t.write_shard(pre + "p--s--2", table_of([row("k2", minutes=5)]))  # the retried k2
    t.write_shard(pre + "p--s--3", table_of([row("k1", minutes=9)]))  # a recaption of k1
    t.write_shard("other.r1.zz--s--1", table_of([row("k3", model="m/b", phash="h2")]))  # another set: untouched
    assert done_keys(read_state(t, pre), "m/a", "r1", "h1") == {"k1", "k2"}
    assert done_keys(read_state(t, pre), "m/a", "r2", "h1") == set()
    assert dedupe(t, pre) == 2
    got = t.read()
    assert sorted(got["key"].to_pylist()) == ["k1", "k2", "k3"]
    by_key = {r["key"]: r for r in got.to_pylist()}
    assert by_key["k1"]["created_at"] == T0 + dt.timedelta(minutes=9)
    assert by_key["k2"]["finish_reason"] == "stop"
    assert dedupe(t, pre) == 0


def test_chunks_are_bucketed_and_named_by_content():
    ratios = [0.5, 1.0, 2.0]
    assert nearest_bucket(100, 100, ratios) == 1 and nearest_bucket(300, 100, ratios) == 2
    assert nearest_bucket(None, 5, ratios) == -1
    from captioning.config import ImagePrep

    prep = ImagePrep(aspect_buckets=ratios)
    keys = [("a", 100, 100), ("b", 300, 100), ("c", 100, 300), ("d", 110, 100), ("e", 290, 100)]
    tag = caption_tag("org/model", "r1", "paper", "h1")
    chunks = plan_chunks(tag, {"s0": keys}, {"s0": "file.parquet"}, prep, 2)
    assert [c.keys for c in chunks] == [["c", "a"], ["d", "b"], ["e"]]
    assert all(c.name.startswith(tag + "--s0--") for c in chunks)
    again = plan_chunks(tag, {"s0": list(reversed(keys))}, {"s0": "file.parquet"}, prep, 2)
    assert [c.name for c in again] == [c.name for c in chunks]
    # With the input shard's row groups known, a chunk takes consecutive row groups (each read once)
    rgs = {"s0": {"a": 0, "b": 0, "c": 1, "d": 1, "e": 2}}
    local = plan_chunks(tag, {"s0": keys}, {"s0": "file.parquet"}, prep, 2, rgs)
    assert [(c.keys, c.row_groups) for c in local] == [(["a", "b"], [0]), (["c", "d"], [1]), (["e"], [2])]


def test_resize_modes_and_bucket_sizes():
    from PIL import Image

    from captioning.config import ImagePrep
    from captioning.prep import bucket_size, resize

    assert bucket_size(1.0, 448 * 448, 28) == (448, 448)
    w, h = bucket_size(2.0, 448 * 448, 28)
    assert w % 28 == 0 and h % 28 == 0 and abs(w / h - 2.0) < 0.1
    big = Image.new("RGB", (3000, 1000))
    assert resize(big, ImagePrep(resize="max_side", max_side=1024), -1).size == (1024, 341)
    assert resize(Image.new("RGB", (300, 100)), ImagePrep(resize="max_side"), -1).size == (300, 100)  # never enlarged
    prep = ImagePrep(resize="bucket", aspect_buckets=[1.0, 2.0], bucket_pixels=128 * 128, size_multiple=16)
    a = resize(Image.new("RGB", (900, 500)), prep, -1)
    b = resize(Image.new("RGB", (700, 330)), prep, -1)
    assert a.size == b.size  # one bucket, one shape: a batch of them needs no padding
    assert resize(big, ImagePrep(resize="none"), -1).size == (3000, 1000)


def test_actor_pool_follows_gpus_and_actors_per_gpu():
    from captioning.pipeline import actor_pool_size
    from pipelines.config import load_config

    pipelines = Path(__file__).resolve().parents[2] / "pipelines.yaml"

    def cfg(*sets):
        return load_config([pipelines], list(sets)).caption

    assert actor_pool_size(8, cfg()) == (8, 1.0)
    assert actor_pool_size(8, cfg("caption.resources.actors_per_gpu=2")) == (16, 0.5)
    assert actor_pool_size(8, cfg("caption.resources.num_actors=3")) == (3, 1.0)
    assert actor_pool_size(0, cfg()) == (1, 0.0)
    assert actor_pool_size(4, cfg("caption.captioners.cogvlm.device=cpu")) == (1, 0.0)
