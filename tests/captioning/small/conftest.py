"""A data root with a scores table (CLIP embeddings in three clear clusters) and VLM captions."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from paradiffusion.schemas import CAPTIONS, SCORES
from paradiffusion.storage import Table
from pipelines.config import load_config

CENTRES = np.eye(8, dtype=np.float32)[:3] * 10  # three well-separated directions


def scores_rows() -> list[dict]:
    """12 kept eligible images (4 per cluster, scores known), plus rejects of every kind."""
    rng = np.random.default_rng(0)
    rows = []
    for c in range(3):
        for j in range(4):
            emb = (CENTRES[c] + rng.normal(0, 0.1, 8)).astype(np.float32)
            rows.append(
                {
                    "key": f"c{c}_{j}",
                    "width": 1600,
                    "height": 1200 + 10 * j,
                    "aesthetic": 7.0 + c * 0.1 - j * 0.5,
                    "clip_score": 0.3,
                    "kept": True,
                    "image_embedding": emb.tolist(),
                    "url": f"http://x/c{c}_{j}.jpg",
                }
            )
    emb = CENTRES[0].tolist()
    rows += [
        {"key": "small", "width": 800, "height": 600, "aesthetic": 9.0, "kept": True, "image_embedding": emb},
        {"key": "ugly", "width": 2000, "height": 2000, "aesthetic": 3.0, "kept": True, "image_embedding": emb},
        {"key": "noemb", "width": 2000, "height": 2000, "aesthetic": 8.0, "kept": True},
        {
            "key": "dropped",
            "width": 2000,
            "height": 2000,
            "aesthetic": 9.5,
            "kept": False,
            "reject_reason": "duplicate",
            "image_embedding": emb,
        },
    ]
    for r in rows:
        r.setdefault("shard", "00000")
        r.setdefault("url", f"http://x/{r['key']}.jpg")
    return rows


@pytest.fixture
def data_root(tmp_path):
    root = tmp_path / "data"
    rows = scores_rows()
    Table(str(root / "scores"), SCORES).write_shard("00000", pa.Table.from_pylist(rows[:8], schema=SCORES))
    Table(str(root / "scores"), SCORES).write_shard("00001", pa.Table.from_pylist(rows[8:], schema=SCORES))
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    caps = []
    for i, r in enumerate(rows):
        caps.append(
            {
                "key": r["key"],
                "caption": f"A draft caption for {r['key']} by the big model.",
                "model_id": "big",
                "prompt_id": "p1",
                "prompt_hash": "h",
                "created_at": t0 + dt.timedelta(seconds=i),
            }
        )
        caps.append(
            {
                "key": r["key"],
                "caption": f"An earlier draft for {r['key']}.",
                "model_id": "small",
                "prompt_id": "p1",
                "prompt_hash": "h",
                "created_at": t0 - dt.timedelta(days=1),
            }
        )
    Table(str(root / "captions"), CAPTIONS).write_shard("00000", pa.Table.from_pylist(caps, schema=CAPTIONS))
    return root


@pytest.fixture
def cfg(data_root):
    return load_config(
        [],
        [
            f"project.data_root={data_root}",
            "select_small.n_candidates=6",
            "select_small.n_clusters=3",
            "select_small.min_aesthetic=5",
            "select_small.min_short_side=1000",
        ],
    )
