"""Training data: buckets, skips counted, rank split, exact mid-epoch resume, caption sources."""

from __future__ import annotations

import datetime as dt
import itertools
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from train_fixtures import write_image_shards

from paradiffusion.schemas import CAPTIONS
from paradiffusion.storage import Table
from training.data import (
    BucketedImageData,
    Row,
    choose_caption,
    load_caption_map,
    make_buckets,
    nearest_bucket,
    to_model_range,
)

SIZES = [(40, 40), (64, 32), (32, 64), (48, 40)]


def _data(root, **kw):
    args = {"batch_size": 2, "resolution": 16, "bucket_step": 4, "shuffle_buffer": 4, "seed": 3, "num_workers": 0}
    args.update(kw)
    return BucketedImageData(str(root / "images"), **args)


def test_buckets_cover_aspect_ratios():
    buckets = make_buckets(1024, 64, 2.0)
    assert (1024, 1024) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and max(w, h) / min(w, h) <= 2.0 for w, h in buckets)
    assert all(abs(w * h - 1024**2) / 1024**2 < 0.15 for w, h in buckets)
    wide = buckets[nearest_bucket(buckets, 2000, 1000)]
    tall = buckets[nearest_bucket(buckets, 1000, 2000)]
    assert wide[0] > wide[1] and tall[1] > tall[0]


def test_batches_are_bucketed_and_bad_rows_counted(tmp_path):
    write_image_shards(tmp_path / "images", n_shards=2, per_shard=6, sizes=SIZES, corrupt=1, missing_caption=2)
    d = _data(tmp_path)
    assert d.counts["skipped: missing caption"] == 2
    seen = []
    for batch in itertools.islice(iter(d), 8):
        x = batch["pixel_values"]
        assert x.ndim == 4 and x.shape[1] == 3 and x.dtype == torch.uint8
        y = to_model_range(x)
        assert y.min() >= -1 and y.max() <= 1 and y.dtype == torch.float32
        assert x.shape[2] * x.shape[3] <= 16 * 16 * 1.3  # one bucket per batch, ~resolution^2 pixels
        assert len(batch["captions"]) == len(batch["keys"]) == x.shape[0]
        seen += batch["keys"]
        if d.epoch > 0:
            break
    assert d.counts["skipped: decode error"] >= 1  # the truncated JPEG, found when loaded
    assert "000000000" not in seen  # the corrupt one
    assert "000000001" not in seen and "000000002" not in seen  # no caption


def test_sizes_come_from_the_image_when_the_table_has_none(tmp_path):
    """The download default stores bytes as downloaded: img2dataset leaves width/height null."""
    write_image_shards(tmp_path / "a" / "images", n_shards=1, per_shard=6, sizes=SIZES)
    write_image_shards(tmp_path / "b" / "images", n_shards=1, per_shard=6, sizes=SIZES, null_sizes=True)
    with_sizes, without = _data(tmp_path / "a"), _data(tmp_path / "b")
    assert without.counts["usable"] == with_sizes.counts["usable"] == 6
    assert [(r.key, r.bucket) for r in without.rows] == [(r.key, r.bucket) for r in with_sizes.rows]


def test_resume_mid_epoch_gives_the_same_batches(tmp_path):
    write_image_shards(tmp_path / "images", n_shards=2, per_shard=6, sizes=SIZES)
    ref = [b for b in itertools.islice(iter(_data(tmp_path, random_crop=True, num_workers=2)), 9)]
    d = _data(tmp_path, random_crop=True, num_workers=2)
    it = iter(d)
    for _ in range(4):
        next(it)
    state = d.state_dict()
    d2 = _data(tmp_path, random_crop=True, num_workers=2)
    d2.load_state_dict(state)
    rest = list(itertools.islice(iter(d2), 5))
    for a, b in zip(ref[4:], rest, strict=True):
        assert a["keys"] == b["keys"]
        assert torch.equal(a["pixel_values"], b["pixel_values"])  # same crop and flip too


@pytest.mark.parametrize("per_shard", [[12], [3, 3, 3, 3], [14, 8], [9, 2, 6, 5]])
def test_ranks_get_equal_disjoint_rows_and_stay_in_step(tmp_path, per_shard):
    """Split by rows, not shards: with shards of 14 and 8 rows each of 2 ranks trains on 11,
    the same number of batches of the same sizes each epoch, so over 3 epochs every row is
    seen 3 times (no rank goes round its rows more often); disjoint, and exactly resumable."""
    write_image_shards(tmp_path / "images", per_shard=per_shard, sizes=SIZES)
    total = sum(per_shard)
    ranks = [_data(tmp_path, rank=r, world_size=2) for r in (0, 1)]
    keys = [{r.key for r in d.rows} for d in ranks]
    assert len(keys[0]) == len(keys[1]) and not keys[0] & keys[1]
    left_over = ranks[0].counts["skipped: uneven split across ranks"]
    assert len(keys[0] | keys[1]) + left_over == total and left_over < 2 * len(ranks[0].buckets)
    assert sum(d.counts["rows"] for d in ranks) == total  # counted once over ranks
    plans = [[len(b) for b in d.plan(0)] for d in ranks]
    assert plans[0] == plans[1]  # same batch count and sizes: the ranks stay in step
    n_batches = 3 * len(plans[0])
    for d, own in zip(ranks, keys, strict=True):
        seen = Counter(k for b in itertools.islice(iter(d), n_batches) for k in b["keys"])
        assert set(seen) == own and set(seen.values()) == {3}  # each of its rows once per epoch
    d = _data(tmp_path, rank=1, world_size=2)
    ref = [b["keys"] for b in itertools.islice(iter(d), 7)]
    d2 = _data(tmp_path, rank=1, world_size=2)
    it = iter(d2)
    for _ in range(3):
        next(it)
    d3 = _data(tmp_path, rank=1, world_size=2)
    d3.load_state_dict(d2.state_dict())
    assert [b["keys"] for b in itertools.islice(iter(d3), 4)] == ref[3:]


def test_caption_sources(tmp_path):
    keys = write_image_shards(tmp_path / "images", n_shards=1, per_shard=4)
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    rows = []
    for i, k in enumerate(keys[:3]):
        rows.append(
            {
                "key": k,
                "caption": f"late {k}",
                "model_id": "vlm",
                "prompt_id": "p1",
                "prompt_hash": "h",
                "created_at": t0 + dt.timedelta(days=2),
            }
        )
        rows.append(
            {
                "key": k,
                "caption": f"early {k}",
                "model_id": "vlm",
                "prompt_id": "p1",
                "prompt_hash": "h",
                "created_at": t0,
            }
        )
        rows.append(
            {
                "key": k,
                "caption": f"other {k}",
                "model_id": "other",
                "prompt_id": "p2",
                "prompt_hash": "h",
                "created_at": t0 - dt.timedelta(days=1),
            }
        )
        del i
    Table(str(tmp_path / "captions"), CAPTIONS).write_shard("0", pa.Table.from_pylist(rows))
    m = load_caption_map("captions", str(tmp_path / "captions"), "vlm", "p1")
    assert m == {k: [f"early {k}"] for k in keys[:3]}
    assert load_caption_map("captions", str(tmp_path / "captions"))[keys[0]] == [f"other {keys[0]}"]  # earliest
    pq.write_table(pa.table({"key": keys[:2], "caption": ["a", "b"], "extra": [1, 2]}), tmp_path / "small.parquet")
    assert load_caption_map("table", str(tmp_path / "small.parquet")) == {keys[0]: ["a"], keys[1]: ["b"]}
    d = _data(
        tmp_path,
        caption_source="captions",
        captions_url=str(tmp_path / "captions"),
        caption_model_id="vlm",
        caption_prompt_id="p1",
    )
    assert {r.caption for r in d.rows} == {f"early {k}" for k in keys[:3]}
    assert d.counts["skipped: missing caption"] == 1
    with pytest.raises(ValueError, match="caption"):
        pq.write_table(pa.table({"key": keys}), tmp_path / "bad.parquet")
        load_caption_map("table", str(tmp_path / "bad.parquet"))


def _batches(d, n):
    return [b for b in itertools.islice(iter(d), n)]


def test_loader_processes_give_the_batches_of_the_loop_and_resume_exactly(tmp_path):
    """Reading in a thread and decoding in 2 loader processes yields, batch for batch, what decoding in
    the loop does (keys, crops, flips, captions, decode errors counted), also from a mid-epoch position."""
    write_image_shards(tmp_path / "images", n_shards=2, per_shard=7, sizes=SIZES, corrupt=1, row_group_size=3)
    kw = {"random_crop": True, "rank": 1, "world_size": 2}
    inline = _data(tmp_path, num_workers=0, **kw)
    ref = _batches(inline, 10)
    workers = _data(tmp_path, num_workers=2, prefetch=2, **kw)
    got = _batches(workers, 10)
    assert [b["keys"] for b in got] == [b["keys"] for b in ref]
    assert [b["captions"] for b in got] == [b["captions"] for b in ref]
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(ref, got, strict=True))
    assert workers.state_dict() == inline.state_dict() and workers.counts == inline.counts
    again = _data(tmp_path, num_workers=2, **kw)
    mid = _data(tmp_path, num_workers=0, **kw)
    it = iter(mid)
    for _ in range(4):
        next(it)
    again.load_state_dict(mid.state_dict())
    assert [b["keys"] for b in _batches(again, 6)] == [b["keys"] for b in ref[4:10]]


def test_a_rank_reads_only_the_row_groups_of_its_rows(tmp_path):
    """img2dataset writes a row group every 100 images: a rank reads the groups holding its rows,
    and each row's bytes are that row's."""
    write_image_shards(tmp_path / "images", n_shards=1, per_shard=12, row_group_size=2)
    raw = pq.read_table(tmp_path / "images" / "00000.parquet", columns=["key", "jpg"]).to_pydict()
    d = _data(tmp_path, rank=0, world_size=2, num_workers=0)
    for r in d.rows:
        assert d._bytes(r) == raw["jpg"][r.row] and raw["key"][r.row] == r.key
    table, _ = d._shard_table(0)
    assert table.num_rows < 12  # not the whole shard


def test_a_key_with_several_captions_trains_with_one_per_epoch(tmp_path):
    """annotations.train_rule: each gives a key several approved texts: every one is kept, each epoch
    draws one per key from (seed, epoch, key): the same in every process, so a resume is exact."""
    keys = write_image_shards(tmp_path / "images", n_shards=1, per_shard=4)
    rows = [{"key": keys[0], "caption": c} for c in ("text b", "text a", "text c", "text a", "  ")]
    rows.append({"key": keys[1], "caption": "only one"})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "small.parquet")
    m = load_caption_map("table", str(tmp_path / "small.parquet"))
    assert m == {keys[0]: ["text a", "text b", "text c"], keys[1]: ["only one"]}  # distinct, sorted, blanks out
    row = Row(0, 0, keys[0], tuple(m[keys[0]]), 0)
    picks = [choose_caption(row, 3, e) for e in range(30)]
    assert set(picks) == set(m[keys[0]]) and picks == [choose_caption(row, 3, e) for e in range(30)]
    assert picks != [choose_caption(row, 4, e) for e in range(30)]  # the seed matters
    d = _data(tmp_path, caption_source="table", captions_url=str(tmp_path / "small.parquet"), batch_size=1,
              num_workers=0)  # fmt: skip
    assert d.captions_in_use() == {"text a", "text b", "text c", "only one"}
    seen = {}
    for b in _batches(d, 20):  # 10 epochs of 2 rows
        seen.setdefault(b["keys"][0], []).append(b["captions"][0])
    assert len(set(seen[keys[0]])) >= 2 and set(seen[keys[1]]) == {"only one"}
    assert seen[keys[0]] == [choose_caption(row, 3, e) for e in range(10)]
