"""A small data root with every table publish reads; raw rows returned so tests compute expectations."""

from __future__ import annotations

import datetime as dt
import io
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from paradiffusion.schemas import CAPTIONS, SCORES, SMALL_TRAIN
from paradiffusion.storage import Table
from pipelines.config import load_config

VOCAB = "red boat water left right tree sky dog person house road car light shadow window".split()
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16 + i, 12), (i * 7 % 255, 80, 160)).save(buf, "JPEG")
    return buf.getvalue()


def caption_row(rng, key, model, n, minutes=0, flags=()):
    c = " ".join(rng.choice(VOCAB) for _ in range(n))
    return {
        "key": key,
        "caption": c,
        "n_words": n,
        "model_id": model,
        "prompt_id": "paper",
        "prompt_hash": "h1",
        "finish_reason": "stop",
        "created_at": T0 + dt.timedelta(minutes=minutes),
        "flags": list(flags),
    }


def write_root(root, with_license: bool = True) -> dict:
    rng = random.Random(5)
    (root / "images").mkdir(parents=True)
    images = []
    for i in range(30):
        row = {
            "key": f"{i:05d}",
            "url": f"http://x/{i}.jpg",
            "caption": f"alt {i}",
            "jpg": jpeg(i) if i != 7 else b"\xff\xd8\xff broken",
            "status": "success",
            "width": 16 + i,
            "height": 12,
        }
        if with_license:
            row["license"] = "cc-by" if i % 2 else "cc0"
        images.append(row)
    for s, part in enumerate((images[:15], images[15:])):
        pq.write_table(pa.Table.from_pylist(part), root / "images" / f"{s:05d}.parquet")
        (root / "images" / f"{s:05d}_stats.json").write_text(json.dumps({"count": len(part)}))
    scores = [
        {
            "key": im["key"],
            "shard": str(int(im["key"]) // 15),
            "url": im["url"],
            "caption": im["caption"],
            "width": im["width"],
            "height": 12,
            "kept": int(im["key"]) % 6 != 5,
            "aesthetic": 5.5,
            "clip_score": 0.3,
            "reject_reason": None if int(im["key"]) % 6 != 5 else "too_small",
        }
        for im in images
    ]
    st = Table(str(root / "scores"), SCORES)
    st.write_shard("00000", pa.Table.from_pylist(scores[:15], schema=SCORES))
    st.write_shard("00001", pa.Table.from_pylist(scores[15:], schema=SCORES))
    kept = [s["key"] for s in scores if s["kept"]]
    caps = [
        caption_row(rng, k, "cogvlm", 40 + j, j, ["repetition"] if j % 4 == 0 else []) for j, k in enumerate(kept[:-2])
    ]
    caps += [caption_row(rng, k, "llava", 20, j) for j, k in enumerate(kept[:6])]
    ct = Table(str(root / "captions"), CAPTIONS)
    ct.write_shard("cogvlm-00000", pa.Table.from_pylist(caps, schema=CAPTIONS))
    small = [
        {
            "key": k,
            "caption": f"a hand written description of {k}",
            "annotator": f"labelstudio:{j % 2}",
            "version": 2,
            "reviewer": "labelstudio:9",
            "n_words": 6,
        }
        for j, k in enumerate(kept[:4])
    ]
    Table(str(root / "small_train"), SMALL_TRAIN).write_shard("00000", pa.Table.from_pylist(small, schema=SMALL_TRAIN))
    return {"images": images, "scores": scores, "captions": caps, "small": small, "kept": kept}


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    raw = write_root(root)
    return root, raw


def cfg_for(root, *sets: str):
    return load_config([], [f"project.data_root={root}", *sets])


@pytest.fixture
def make_cfg():
    return cfg_for


@pytest.fixture
def new_caption():
    return caption_row
