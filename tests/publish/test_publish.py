"""`paradiffusion publish` on a small data root, read back with the libraries users have."""

from __future__ import annotations

import json

import duckdb
import pyarrow.parquet as pq
import pytest

from paradiffusion.config import ConfigError
from publish.run import run_publish


def test_folder_loads_with_datasets_duckdb_card_and_croissant(data, make_cfg):
    root, raw = data
    cfg = make_cfg(root, "publish.shard_rows=7")
    summary = run_publish(cfg)
    out = root / "paraimage"
    # ParaImage-Big: kept images with a caption; ParaImage-Small: the approved rows
    with_caption = {c["key"] for c in raw["captions"]}
    big_keys = [k for k in raw["kept"] if k in with_caption]
    assert summary["rows_big"] == len(big_keys)
    assert summary["rejected"]["no_caption"] == len(raw["kept"]) - len(big_keys)
    from datasets import load_dataset

    big = load_dataset(str(out), "big", split="train")
    assert sorted(big["key"]) == big_keys
    small = load_dataset(str(out), "small", split="train")
    assert small.num_rows == len(raw["small"])
    # every caption with its source; the selected one is the configured rule's (paper prompt; fewest flags)
    row = big.filter(lambda r: r["key"] == raw["kept"][0])[0]
    assert {c["model_id"] for c in row["captions"]} == {"cogvlm", "llava"}
    assert row["caption_model"] == "llava"  # cogvlm's caption of this key has a flag, llava's none
    assert row["license"] in ("cc0", "cc-by") and row["alt_text"] == "alt 0"
    # annotators pseudonymised, stable per person
    assert all(a.startswith("annotator-") for a in small["annotator"])
    assert len(set(small["annotator"])) == 2 and "labelstudio" not in json.dumps(small.to_list())
    # bounded shards, duckdb reads them in place
    files = sorted((out / "data" / "big").glob("*.parquet"))
    assert all(pq.read_metadata(f).num_rows <= 7 for f in files)
    n = duckdb.sql(f"SELECT count(DISTINCT key) FROM read_parquet('{out}/data/big/*.parquet')").fetchall()[0][0]
    assert n == len(big_keys)
    # the card: the Hub's metadata parser
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert meta["license"] == "unknown" and meta["size_categories"] == ["n<1K"]
    assert {c["config_name"] for c in meta["configs"]} == {"big", "small"}
    assert "Table 1" in card.text and "too_small" in card.text and "unknown" in card.text
    assert "![assets/funnel-" in card.text
    # Croissant: mlcroissant validates it and its records iterate
    import mlcroissant as mlc

    ds = mlc.Dataset(jsonld=str(out / "croissant.json"))
    recs = list(ds.records("big"))
    assert sorted(r["big/key"].decode() for r in recs) == big_keys


def test_webdataset_and_images(data, make_cfg):
    root, raw = data
    cfg = make_cfg(
        root, "publish.shard_rows=5", "publish.webdataset=true", "publish.include_images=true", "publish.subsets=[big]"
    )
    summary = run_publish(cfg)
    out = root / "paraimage"
    with_caption = {c["key"] for c in raw["captions"]}
    expected = [k for k in raw["kept"] if k in with_caption and k != "00007"]  # 00007's bytes do not decode
    assert summary["rejected"]["image_decode_failed"] == 1
    import webdataset as wds

    index = json.loads((out / "webdataset" / "index.json").read_text())
    urls = [str(out / s["url"]) for s in index["subsets"]["big"]]
    seen = []
    for sample in wds.WebDataset(urls, shardshuffle=False):
        seen.append(sample["__key__"])
        meta = json.loads(sample["json"])
        assert sample["txt"].decode() == meta["caption"] and sample["jpg"][:2] == b"\xff\xd8"
    assert sorted(seen) == expected  # every row once
    from datasets import Image, load_dataset

    big = load_dataset(str(out), "big", split="train")
    assert isinstance(big.features["image"], Image) and big[0]["image"].size[1] == 12


@pytest.mark.slow  # three publishes (~60 s on the shared 2-core machine)
def test_republish_rewrites_only_changed_shards_and_kill_keeps_previous(data, monkeypatch, make_cfg, new_caption):
    root, raw = data
    cfg = make_cfg(root, "publish.shard_rows=4", "publish.subsets=[big]")
    first = run_publish(cfg)
    out = root / "paraimage"
    card1 = (out / "README.md").read_text()
    # more captions: one new caption set for two keys of the second scores shard
    import random

    import pyarrow as pa

    from paradiffusion.schemas import CAPTIONS
    from paradiffusion.storage import Table

    rng = random.Random(1)
    keys = [k for k in raw["kept"] if int(k) >= 25]
    new = [new_caption(rng, k, "qwen", 30, 100) for k in keys]
    Table(str(root / "captions"), CAPTIONS).write_shard("qwen-00000", pa.Table.from_pylist(new, schema=CAPTIONS))
    # a publish killed just before the card switch: the previous version stays readable and complete
    import publish.run as pr

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pr, "_card_text", killed)
    with pytest.raises(KeyboardInterrupt):
        run_publish(cfg)
    monkeypatch.undo()
    assert (out / "README.md").read_text() == card1
    from datasets import load_dataset

    assert load_dataset(str(out), "big", split="train").num_rows == first["rows_big"]
    second = run_publish(cfg)
    assert second["shards_written"] == 1  # keys 25.. are in the last chunk of scores shard 00001
    assert second["shards_unchanged"] == first["shards_written"] - 1
    big = load_dataset(str(out), "big", split="train")
    got = {r["key"]: {c["model_id"] for c in r["captions"]} for r in big}
    had = {c["key"] for c in raw["captions"]}
    assert all("qwen" in got[k] for k in keys)  # every key with the new captions, newly captioned ones too
    assert big.num_rows == first["rows_big"] + len(set(keys) - had) == len(set(got))


def test_missing_table_names_the_command(tmp_path, make_cfg):
    cfg = make_cfg(tmp_path / "empty")
    with pytest.raises(ConfigError, match="scores table missing.*make filter"):
        run_publish(cfg)


def test_config_errors_name_the_key(make_cfg):
    with pytest.raises(ConfigError, match="publish.subsets"):
        make_cfg("x", "publish.subsets=[huge]")
    with pytest.raises(ConfigError, match="publish.repo_id"):
        make_cfg("x", "publish.repo_id=noslash")


@pytest.mark.slow  # starts moto's S3 server
def test_publish_to_s3(data, s3_root, make_cfg):
    """The folder on an object store (moto's S3 server on 127.0.0.1): read back with duckdb over the URL."""
    root, raw = data
    out = f"{s3_root}/paraimage"
    summary = run_publish(make_cfg(root, f"publish.output={out}", "publish.subsets=[big]"))
    import fsspec

    from paradiffusion.storage import duckdb_connect

    fs, path = fsspec.core.url_to_fs(out)
    assert fs.exists(f"{path}/README.md") and fs.exists(f"{path}/croissant.json")
    con = duckdb_connect()
    n = con.execute(f"SELECT count(DISTINCT key) FROM read_parquet('{out}/data/big/*.parquet')").fetchall()[0][0]
    assert n == summary["rows_big"] > 0


def test_the_card_reads_the_stats_stage_cache_and_says_the_same(data, make_cfg, caplog):
    """After `make stats`, the card's Table 1 / histogram / funnel come from the stats stage's partial
    aggregates (brought up to date, not recomputed) and equal the card made from the rows."""
    from huggingface_hub import DatasetCard

    from stats.run import run_stats

    root, _ = data
    run_publish(make_cfg(root, "publish.subsets=[big]"))
    plain = DatasetCard.load(root / "paraimage" / "README.md").text
    run_stats(make_cfg(root), quiet=True)
    summary_before = json.loads((root / "stats" / "_summary.json").read_text())
    assert summary_before["keyed_mode"] == "full"
    caplog.clear()
    run_publish(make_cfg(root, "publish.subsets=[big]"))
    assert "statistics for the card failed" not in caplog.text
    cached = DatasetCard.load(root / "paraimage" / "README.md").text

    def section(text):  # the tables, without the query times printed under them
        import re

        text = re.sub(r"<sub>.*?</sub>", "", text)
        return text[text.index("Table 1") : text.index("Table 1") + 1500]

    assert "Table 1" in cached and section(cached) == section(plain)
    keyed = root / "stats" / "derived" / "keyed"
    assert keyed.is_dir() and json.loads((keyed / "keyed.json").read_text())["generation"]


def test_the_card_queries_run_under_the_stats_stage_memory_limit(data, make_cfg, monkeypatch, caplog):
    """The card's statistics are the stats stage's queries over every row: they run under
    ``stats.memory_limit`` (publish's own 256 MB for its rows ran out at 4 M caption rows and the
    card lost its statistics), on their own connection beside the rows."""
    import duckdb

    import stats.run as sr

    root, _ = data
    seen = []
    run_query = sr.run_query

    def recording(con, q, *a, **k):
        seen.append(con.execute("SELECT current_setting('memory_limit')").fetchone()[0])
        return run_query(con, q, *a, **k)

    monkeypatch.setattr(sr, "run_query", recording)
    run_publish(make_cfg(root, "publish.subsets=[big]", "stats.memory_limit=3GB"))
    assert "statistics for the card failed" not in caplog.text
    ref = duckdb.connect()
    ref.execute("SET memory_limit = '3GB'")
    want = ref.execute("SELECT current_setting('memory_limit')").fetchone()[0]
    assert len(seen) == 3 and set(seen) == {want}


def test_a_failed_shard_write_stops_the_run_and_keeps_the_previous_version(data, monkeypatch, make_cfg, new_caption):
    """Shards are written by a writer thread while the next ones are joined: a write that fails there
    is the run's error (not a log line), the chunks still waiting for the writer are not written,
    and the card still names the previous version's files."""
    root, raw = data
    cfg = make_cfg(root, "publish.shard_rows=2", "publish.subsets=[big]")
    first = run_publish(cfg)
    out = root / "paraimage"
    card1 = (out / "README.md").read_text()
    before = {p.name for p in (out / "data" / "big").iterdir()}
    # new captions for every kept key: every shard of the next version is new
    import random

    import pyarrow as pa

    import publish.run as pr
    from paradiffusion.schemas import CAPTIONS
    from paradiffusion.storage import Table

    rng = random.Random(2)
    new = [new_caption(rng, k, "qwen", 30, 100) for k in raw["kept"]]
    Table(str(root / "captions"), CAPTIONS).write_shard("qwen-00000", pa.Table.from_pylist(new, schema=CAPTIONS))
    put = pr.Folder.put
    data_puts = []

    def failing_put(self, rel, data):
        if rel.startswith("data/"):
            data_puts.append(rel)
            if len(data_puts) == 2:
                raise OSError(28, "No space left on device")
        return put(self, rel, data)

    monkeypatch.setattr(pr.Folder, "put", failing_put)
    with pytest.raises(OSError, match="No space left"):
        run_publish(cfg)
    monkeypatch.undo()
    # nothing started after the failure: at most the shards the other writers had in hand
    assert 2 <= len(data_puts) <= 1 + pr._WRITERS < first["shards_written"]
    assert (out / "README.md").read_text() == card1
    added = {p.name for p in (out / "data" / "big").iterdir()} - before
    assert 1 <= len(added) == len(data_puts) - 1  # written, unused until a run completes
    from datasets import load_dataset

    assert load_dataset(str(out), "big", split="train").num_rows == first["rows_big"]
