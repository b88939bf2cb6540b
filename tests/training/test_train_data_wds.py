"""Training from WebDataset tar shards (data.format: webdataset): the Parquet input's plan, split,
resume and counts, from a published dataset folder."""

from __future__ import annotations

import datetime as dt
import io
import itertools
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from train_fixtures import write_image_shards

from paradiffusion.config import ConfigError
from training.data import BucketedImageData

SIZES = [(40, 40), (64, 32), (32, 64), (48, 40)]


def _txt(key: str) -> str:
    return f"A long paragraph describing image {key} in detail."


def tars_from_images(images, out, subset="big") -> list[str]:
    """One tar per img2dataset shard, the same rows in the same order, in publish's layout
    (webdataset/<subset>/*.tar + webdataset/index.json); returns every key."""
    import webdataset as wds

    (out / "webdataset" / subset).mkdir(parents=True)
    entries, keys = [], []
    for shard in sorted(images.glob("*.parquet")):
        rows = pq.read_table(shard).to_pylist()
        rel = f"webdataset/{subset}/{shard.stem}.tar"
        with wds.TarWriter(str(out / rel)) as w:
            for r in rows:
                meta = {"key": r["key"], "alt_text": r["caption"], "width": r["width"], "height": r["height"]}
                w.write({"__key__": r["key"], "jpg": r["jpg"], "txt": _txt(r["key"]), "json": json.dumps(meta)})
                keys.append(r["key"])
        entries.append({"url": rel, "rows": len(rows), "sha256": "x"})
    (out / "webdataset" / "index.json").write_text(json.dumps({"version": "v1", "subsets": {subset: entries}}))
    return keys


def _args(**kw):
    args = {"batch_size": 2, "resolution": 16, "bucket_step": 4, "shuffle_buffer": 4, "seed": 3, "num_workers": 0}
    args.update(kw)
    return args


def _wds(path, **kw):
    return BucketedImageData(str(path), format="webdataset", **_args(**kw))


def _batches(d, n):
    return list(itertools.islice(iter(d), n))


@pytest.mark.parametrize("rank", [0, 1])
def test_same_rows_same_order_give_the_parquet_batches(tmp_path, rank):
    """Tars holding the images table's rows in its order (one tar per shard) give, batch for batch,
    the Parquet input's batches: keys, captions, crops and flips, and the same counts."""
    write_image_shards(tmp_path / "images", per_shard=[7, 5, 6], sizes=SIZES, corrupt=1, missing_caption=1)
    tars_from_images(tmp_path / "images", tmp_path / "pub")
    kw = {"random_crop": True, "rank": rank, "world_size": 2}
    pq_data = BucketedImageData(str(tmp_path / "images"), **_args(**kw))
    wds_data = _wds(tmp_path / "pub", **kw)
    assert [(r.key, r.shard, r.row, r.bucket, r.captions) for r in wds_data.rows] == [
        (r.key, r.shard, r.row, r.bucket, r.captions) for r in pq_data.rows
    ]
    n = 2 * len(pq_data.plan(0)) + 1  # two epochs and a bit
    ref, got = _batches(pq_data, n), _batches(wds_data, n)
    assert [b["keys"] for b in got] == [b["keys"] for b in ref]
    assert [b["captions"] for b in got] == [b["captions"] for b in ref]
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(ref, got, strict=True))
    assert wds_data.counts == pq_data.counts
    assert wds_data.state_dict() == pq_data.state_dict()


def test_each_tar_is_streamed_once_an_epoch(tmp_path, monkeypatch):
    """A rank streams each tar holding its rows once an epoch (batches of rare buckets gather rows of
    tars read long before: those are held, not read again), small shuffle buffer and all."""
    import training.data_wds as wds_mod

    write_image_shards(tmp_path / "images", per_shard=[5, 4, 6, 5], sizes=SIZES)
    tars_from_images(tmp_path / "images", tmp_path / "pub")
    reads = []
    real = wds_mod.read_images
    monkeypatch.setattr(wds_mod, "read_images", lambda url, wanted: reads.append(url) or real(url, wanted))
    d = _wds(tmp_path / "pub", rank=0, world_size=2, shuffle_buffer=2, batch_size=3)
    shards = {d.shards[r.shard] for r in d.rows}
    per_epoch = len(d.plan(0))
    seen = Counter(k for b in _batches(d, 2 * per_epoch) for k in b["keys"])
    assert set(seen.values()) == {2} and len(seen) == len(d.rows)
    assert sorted(reads) == sorted(list(shards) * 2)
    assert not d._held  # nothing kept past the epoch's last batch


def test_every_sample_once_per_epoch_over_two_ranks_and_exact_resume(tmp_path):
    """Published tars (the index, .txt captions): each of 2 ranks sees its rows once an epoch, the
    ranks' rows are disjoint and cover the data (less the uneven remainder, counted); a run
    stopped mid-epoch and resumed from its position yields the uninterrupted run's batches, with
    loader processes, batch by batch (keys, captions, pixels)."""
    write_image_shards(tmp_path / "images", per_shard=[9, 6, 5], sizes=SIZES)
    keys = tars_from_images(tmp_path / "images", tmp_path / "pub")
    ranks = [_wds(tmp_path / "pub", rank=r, world_size=2, caption_source="txt") for r in (0, 1)]
    own = [{r.key for r in d.rows} for d in ranks]
    assert not own[0] & own[1]
    assert len(own[0] | own[1]) + ranks[0].counts["skipped: uneven split across ranks"] == len(keys)
    assert sum(d.counts["rows"] for d in ranks) == len(keys)
    assert [len(b) for b in ranks[0].plan(0)] == [len(b) for b in ranks[1].plan(0)]
    for d, mine in zip(ranks, own, strict=True):
        seen = Counter(k for b in _batches(d, 3 * len(d.plan(0))) for k in b["keys"])
        assert set(seen) == mine and set(seen.values()) == {3}
    for b in _batches(ranks[0], 2):
        assert b["captions"] == [_txt(k) for k in b["keys"]]

    kw = {"rank": 1, "world_size": 2, "caption_source": "txt", "random_crop": True, "num_workers": 2}
    ref = _batches(_wds(tmp_path / "pub", **kw), 9)
    first = _wds(tmp_path / "pub", **kw)
    it = iter(first)
    for _ in range(4):  # "killed" after 4 batches
        next(it)
    state = first.state_dict()
    resumed = _wds(tmp_path / "pub", **kw)
    resumed.load_state_dict(state)
    rest = _batches(resumed, 5)
    for a, b in zip(ref[4:], rest, strict=True):
        assert a["keys"] == b["keys"] and a["captions"] == b["captions"]
        assert torch.equal(a["pixel_values"], b["pixel_values"])


def _jpeg(w=40, h=40) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


def test_bad_members_are_counted_by_reason_and_skipped(tmp_path):
    """A sample without .txt, with a .json that does not parse, without an image, with bytes that do
    not decode, and a tar cut in the middle of a member: each counted with its reason; the rest trains."""
    import webdataset as wds

    base = tmp_path / "pub" / "webdataset" / "big"
    base.mkdir(parents=True)
    meta = json.dumps({"width": 40, "height": 40})
    with wds.TarWriter(str(base / "a.tar")) as w:
        for i in range(6):
            w.write({"__key__": f"a{i}", "jpg": _jpeg(), "txt": f"caption {i}", "json": meta})
        w.write({"__key__": "no_txt", "jpg": _jpeg(), "json": meta})
        w.write({"__key__": "bad_json", "jpg": _jpeg(), "txt": "x", "json": "{not json"})
        w.write({"__key__": "no_image", "txt": "x", "json": meta})
        w.write({"__key__": "bad_image", "jpg": b"\xff\xd8\xff nope", "txt": "x", "json": meta})
        w.write({"__key__": "empty_txt", "jpg": _jpeg(), "txt": "  ", "json": meta})
    with wds.TarWriter(str(base / "b.tar")) as w:
        for i in range(5):
            w.write({"__key__": f"b{i}", "jpg": _jpeg(48, 40), "txt": f"caption b{i}", "json": meta})
    data = (base / "b.tar").read_bytes()
    cut = data.index(b"b3.jpg")  # the tar ends inside the 4th sample's image: b0, b1 survive (b2 is still
    # being grouped when the damage shows: whether it was complete cannot be told, so it is lost and counted)
    (base / "b.tar").write_bytes(data[: cut + 700])
    index = {
        "subsets": {"big": [{"url": "webdataset/big/a.tar", "rows": 11}, {"url": "webdataset/big/b.tar", "rows": 5}]}
    }
    (tmp_path / "pub" / "webdataset" / "index.json").write_text(json.dumps(index))
    d = _wds(tmp_path / "pub", caption_source="txt")
    c = d.counts
    assert c["skipped: missing .txt"] == 2  # no .txt, an empty one
    assert c["skipped: undecodable .json"] == 1
    assert c["skipped: missing image"] == 1
    assert c["skipped: corrupt tar"] == 3  # b2..b4: listed in the index, lost with the tar's end
    assert c["rows"] == 16 and c["usable"] == 6 + 1 + 2  # bad_image is found when it is loaded
    seen = [k for b in _batches(d, len(d.plan(0))) for k in b["keys"]]
    assert sorted(seen) == sorted([f"a{i}" for i in range(6)] + ["b0", "b1"])
    assert d.counts["skipped: decode error"] == 1  # bad_image
    total_skips = sum(v for k, v in d.counts.items() if k.startswith("skipped: "))
    assert len(seen) + total_skips == c["rows"]  # nothing dropped silently
    ranks = [_wds(tmp_path / "pub", caption_source="txt", rank=r, world_size=2) for r in (0, 1)]
    both = ranks[0].counts + ranks[1].counts  # the summary sums the ranks: each row's fate counted once
    assert both["rows"] == 16 and both["skipped: corrupt tar"] == 3 and both["skipped: missing .txt"] == 2


def test_shard_sources_and_missing_shard_errors(tmp_path):
    write_image_shards(tmp_path / "images", per_shard=[4, 4], sizes=SIZES)
    tars_from_images(tmp_path / "images", tmp_path / "pub")
    index = tmp_path / "pub" / "webdataset" / "index.json"
    tars = sorted(str(p) for p in (tmp_path / "pub" / "webdataset" / "big").glob("*.tar"))
    by_folder = [r.key for r in _wds(tmp_path / "pub").rows]
    assert [r.key for r in _wds(index).rows] == by_folder
    listed = BucketedImageData(tars, format="webdataset", **_args())
    assert [r.key for r in listed.rows] == by_folder
    brace = str(tmp_path / "pub" / "webdataset" / "big" / "{00000..00001}.tar")
    assert [r.key for r in _wds(brace).rows] == by_folder
    assert [r.key for r in _wds(f"file://{tmp_path}/pub").rows] == by_folder  # an fsspec URL
    import fsspec

    mem = fsspec.filesystem("memory")
    mem.put(str(tmp_path / "pub"), "/wds-pub", recursive=True)
    try:  # a store other than the local disk, through fsspec: plan and image bytes equal the local ones
        remote, local = _wds("memory://wds-pub"), _wds(tmp_path / "pub")
        assert [r.key for r in remote.rows] == by_folder
        assert [b["keys"] for b in _batches(remote, 4)] == [b["keys"] for b in _batches(local, 4)]
    finally:
        mem.rm("/wds-pub", recursive=True)
    with pytest.raises(ValueError, match=r"data.subset 'small' is not in .*it has \['big'\]"):
        _wds(tmp_path / "pub", subset="small")
    (tmp_path / "pub" / "webdataset" / "big" / "00001.tar").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"1 of 2 WebDataset shards listed in .*index.json do not exist.*00001\.tar"
    ):
        _wds(tmp_path / "pub")
    with pytest.raises(FileNotFoundError, match=r"no webdataset/index.json"):
        _wds(tmp_path / "images")
    import webdataset as wds

    (tmp_path / "urls").mkdir()
    with wds.TarWriter(str(tmp_path / "urls" / "0.tar")) as w:  # a URL dataset: metadata, no image
        w.write({"__key__": "k0", "txt": "a caption", "json": json.dumps({"url": "http://x/0.jpg"})})
    with pytest.raises(ValueError, match=r"'skipped: missing image': 1.*publish.include_images: true"):
        _wds(tmp_path / "urls" / "0.tar", caption_source="txt")


def test_config_format_is_validated_with_the_key_named(tmp_path):
    from pipelines.config import load_config

    with pytest.raises(ConfigError, match=r"train\.stage1\.data\.format.*'parquet' or 'webdataset'"):
        load_config([], ["train.stage1.data.format=tar"])
    with pytest.raises(ConfigError, match=r"data\.path: format webdataset needs"):
        load_config([], ["train.stage2.data.format=webdataset"])
    with pytest.raises(ConfigError, match=r"data\.caption_source txt .* needs data\.format: webdataset"):
        load_config([], ["train.stage1.data.caption_source=txt"])
    with pytest.raises(ConfigError, match=r"data\.path is read by format webdataset only"):
        load_config([], [f"train.stage1.data.path={tmp_path}"])
    cfg = load_config([], ["train.stage1.data.format=webdataset", f"train.stage1.data.path={tmp_path}"])
    assert cfg.train.stage1.data.subset == "big" and cfg.train.stage3.data.subset == "small"
    assert cfg.train.stage2.data.format == "parquet"  # the default


def _publishable_root(root) -> list[str]:
    """images + scores + captions tables, as publish reads them; returns the keys published."""
    from paradiffusion.schemas import CAPTIONS, SCORES
    from paradiffusion.storage import Table

    keys = write_image_shards(root / "images", per_shard=[5, 5], sizes=SIZES)
    images = [r for p in sorted((root / "images").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    scores = [
        {"key": r["key"], "shard": r["key"][:5], "url": r["url"], "caption": r["caption"], "width": r["width"],
         "height": r["height"], "kept": i != 3, "reject_reason": None if i != 3 else "too_small"}
        for i, r in enumerate(images)
    ]  # fmt: skip
    Table(str(root / "scores"), SCORES).write_shard("00000", pa.Table.from_pylist(scores, schema=SCORES))
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    caps = [
        {"key": k, "caption": _txt(k), "n_words": 9, "model_id": "cogvlm", "prompt_id": "paper", "prompt_hash": "h",
         "finish_reason": "stop", "created_at": t0, "flags": []}
        for i, k in enumerate(keys) if i not in (3, 8)
    ]  # fmt: skip
    Table(str(root / "captions"), CAPTIONS).write_shard("c-00000", pa.Table.from_pylist(caps, schema=CAPTIONS))
    return [k for i, k in enumerate(keys) if i not in (3, 8)]


@pytest.mark.slow  # a publish, DeepSpeed's setup and a step: ~50 s on the shared 2-core machine
def test_publish_with_webdataset_then_train_a_stage1_step(tiny_models, tmp_path):
    """`paradiffusion publish` with publish.webdataset on, then stage 1 trains from the folder's tars
    (captions: each sample's .txt) with the tiny models: every published row is planned, a step runs."""
    from train_fixtures import tiny_config

    from pipelines.config import load_config
    from publish.run import run_publish
    from training.trainer import Trainer

    root = tmp_path / "data"
    published = _publishable_root(root)
    pub = load_config(
        [], [f"project.data_root={root}", "publish.webdataset=true", "publish.include_images=true",
             "publish.subsets=[big]", "publish.shard_rows=3"]
    )  # fmt: skip
    run_publish(pub)
    folder = root / "paraimage"
    assert (folder / "webdataset" / "index.json").exists()
    cfg = tiny_config(
        tiny_models, root, max_steps=1,
        **{"data.format": "webdataset", "data.path": str(folder), "data.caption_source": "txt", "data.num_workers": 0},
    )  # fmt: skip
    cfg.train.stage1.output = str(tmp_path / "run")
    t = Trainer(cfg, 1)
    t.setup()
    assert sorted(r.key for r in t.data.rows) == sorted(published)
    assert {r.key: r.caption for r in t.data.rows} == {k: _txt(k) for k in published}
    t.train()
    assert t.step == 1 and all(loss == loss for _, loss in t.history)
    summary = json.loads((tmp_path / "run" / "_summary.json").read_text())
    assert summary["in"] == len(published)
