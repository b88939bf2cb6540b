"""A small data root with every table, and the values a correct stats run must report."""

from __future__ import annotations

import datetime as dt
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from paradiffusion.schemas import ANNOTATIONS, CAPTIONS, SCORES
from paradiffusion.storage import Table
from pipelines.config import load_config

VOCAB = "red boat water left right tree sky dog person house road car light shadow window".split()


def text(rng: random.Random, n: int) -> str:
    return "  ".join(rng.choice(VOCAB) for _ in range(n)) if n else ""


@pytest.fixture
def tables(tmp_path):
    """Returns (data_root, raw rows by table) so tests compute expected values themselves."""
    rng = random.Random(3)
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    images = [
        {
            "key": f"k{i:02d}",
            "url": f"http://x/{i}.jpg",
            "caption": text(rng, rng.randint(3, 30)),
            "jpg": b"\xff\xd8\xff fake" if i < 38 else None,
            "status": "success" if i < 38 else "failed_to_download",
            "width": 100 + 37 * i,
            "height": 900 - 11 * i,
        }
        for i in range(40)
    ]
    for s, part in enumerate((images[:20], images[20:])):
        pq.write_table(pa.Table.from_pylist(part), root / "images" / f"{s:05d}.parquet")
        (root / "images" / f"{s:05d}_stats.json").write_text(json.dumps({"count": len(part)}))
    scores = []
    for im in images[:38]:
        i = int(im["key"][1:])
        kept = i % 5 != 0
        scores.append(
            {
                "key": im["key"],
                "shard": "0",
                "url": im["url"],
                "caption": im["caption"],
                "width": im["width"],
                "height": im["height"],
                "kept": kept,
                "aesthetic": 5.0 + i / 10,
                "reject_reason": None if kept else ("too_small" if i % 10 == 0 else "language"),
                "image_embedding": [0.1, 0.2],
            }
        )
    # scored here but not downloaded into this images folder (e.g. scores of an earlier download):
    # the funnel must not count them as a step after "downloaded"
    for i in range(8):
        scores.append(
            {
                "key": f"x{i:02d}",
                "shard": "1",
                "url": f"http://y/{i}.jpg",
                "caption": text(rng, 5),
                "width": 1000,
                "height": 800 + i,
                "kept": i % 2 == 0,
                "aesthetic": 6.0,
                "reject_reason": None if i % 2 == 0 else "language",
                "image_embedding": [0.1, 0.2],
            }
        )
    Table(str(root / "scores"), SCORES).write_shard("00000", pa.Table.from_pylist(scores[:38], schema=SCORES))
    Table(str(root / "scores"), SCORES).write_shard("00001", pa.Table.from_pylist(scores[38:], schema=SCORES))
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    captions = []
    kept_keys = [s["key"] for s in scores if s["kept"]]
    for j, k in enumerate(kept_keys):
        n = [10, 30, 60, 120, 180, 260, 0][j % 7]
        c = text(rng, n)
        captions.append(
            {
                "key": k,
                "caption": c,
                "n_words": len(c.split()),
                "model_id": "cogvlm",
                "prompt_id": "p100",
                "prompt_hash": "h",
                "finish_reason": "length" if n == 260 else "stop",
                "seconds": 1.5,
                "created_at": t0 + dt.timedelta(minutes=j),
                "flags": ["repetition"] if j % 4 == 0 else [],
            }
        )
        if j % 2 == 0:
            c2 = text(rng, 40 + j)
            captions.append(
                {
                    "key": k,
                    "caption": c2,
                    "n_words": len(c2.split()),
                    "model_id": "llava",
                    "prompt_id": "p100",
                    "prompt_hash": "h",
                    "finish_reason": "stop",
                    "seconds": 0.5,
                    "created_at": t0 - dt.timedelta(days=1),
                    "flags": [],
                }
            )
    # the prompt text of p100 was edited: cogvlm captioned five keys again with the new text (a new
    # prompt_hash, same prompt_id): a second version, never mixed with the first
    for j, k in enumerate(kept_keys[:5]):
        c = text(rng, 20 + j)
        captions.append(
            {
                "key": k,
                "caption": c,
                "n_words": len(c.split()),
                "model_id": "cogvlm",
                "prompt_id": "p100",
                "prompt_hash": "h2",
                "finish_reason": "stop",
                "seconds": 1.0,
                "created_at": t0 + dt.timedelta(days=3, minutes=j),
                "flags": [],
            }
        )
    # a second row for one image in the same caption set (a run killed before its dedupe): one image
    dup = dict(captions[0], caption=text(rng, 33), created_at=t0 + dt.timedelta(days=1))
    dup["n_words"] = len(dup["caption"].split())
    captions.append(dup)
    Table(str(root / "captions"), CAPTIONS).write_shard("00000", pa.Table.from_pylist(captions[:30], schema=CAPTIONS))
    Table(str(root / "captions"), CAPTIONS).write_shard("00001", pa.Table.from_pylist(captions[30:], schema=CAPTIONS))
    now = dt.datetime(2026, 2, 1, tzinfo=dt.timezone.utc)
    ann = []
    for j, k in enumerate(kept_keys[:6]):
        who = "ann" if j % 2 else "bob"
        base = {"key": k, "text": text(rng, 50 + j), "annotator": who, "content_hash": f"h{j}", "recorded_at": now}
        ann.append({**base, "version": 1, "state": "submitted"})
        if j < 3:
            ann.append(
                {
                    **base,
                    "version": 2,
                    "state": "approved" if j < 2 else "rejected",
                    "parent_version": 1,
                    "reviewer": "r",
                }
            )
    Table(str(root / "annotations"), ANNOTATIONS).write_shard("x", pa.Table.from_pylist(ann, schema=ANNOTATIONS))
    return root, {"images": images, "scores": scores, "captions": captions, "annotations": ann}


@pytest.fixture
def stats_cfg(tables):
    root, _ = tables
    return load_config([], [f"project.data_root={root}", "stats.plots=false"])
