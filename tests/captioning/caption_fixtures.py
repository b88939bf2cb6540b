"""Test data for the captioning tests: fixture images and scores tables, a config for a tiny model."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from paradiffusion.schemas import SCORES
from paradiffusion.storage import Table
from pipelines.config import load_config

#: name -> RGB: solid-colour fixture images (every key's colour is recorded, so a test can
#: tell images apart).
COLOURS = {
    "red": (220, 20, 20),
    "green": (20, 200, 20),
    "blue": (20, 20, 220),
    "white": (250, 250, 250),
    "black": (5, 5, 5),
    "yellow": (230, 230, 20),
}
SIZES = [(64, 48), (48, 64), (50, 50), (96, 32), (40, 60), (72, 54)]


def _jpeg(colour: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def write_dataset(root: Path, n_shards: int = 2, per_shard: int = 6, broken: bool = True) -> dict:
    """img2dataset-style image shards + a scores table under ``root``; returns what a test needs to know.

    Every key's colour is recorded in ``expected``; one key per dataset is kept but
    undecodable (``broken``), one is not kept (``dropped``).
    """
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    scores = Table(str(root / "scores"), SCORES)
    names = list(COLOURS)
    expected, broken_key, dropped_key = {}, None, None
    for s in range(n_shards):
        shard = f"{s:05d}"
        rows, score_rows = [], []
        for i in range(per_shard):
            key = f"{shard}{i:04d}"
            colour = names[(s * per_shard + i) % len(names)]
            w, h = SIZES[i % len(SIZES)]
            data = _jpeg(COLOURS[colour], (w, h))
            kept = True
            if broken and s == 0 and i == 1:
                data, broken_key = b"<html>not an image</html>", key
            elif s == n_shards - 1 and i == per_shard - 1:
                kept, dropped_key = False, key
            else:
                expected[key] = colour
            rows.append(
                {
                    "key": key,
                    "url": f"http://example.invalid/{key}.jpg",
                    "caption": f"alt {key}",
                    "jpg": data,
                    "status": "success",
                    "width": w,
                    "height": h,
                }
            )
            score_rows.append(
                {
                    "key": key,
                    "shard": shard,
                    "width": w,
                    "height": h,
                    "kept": kept,
                    "reject_reason": None if kept else "aesthetic",
                }
            )
        # small row groups, like img2dataset's (100 rows), so reads by row group are exercised
        pq.write_table(pa.Table.from_pylist(rows), images / f"{shard}.parquet", row_group_size=4)
        (images / f"{shard}_stats.json").write_text(json.dumps({"count": len(rows)}))
        scores.write_shard(shard, pa.Table.from_pylist(score_rows, schema=SCORES))
    return {"expected": expected, "broken": broken_key, "dropped": dropped_key, "root": str(root)}


def caption_config(root: str, model: str, *extra: str, executor: str = "local"):
    """A validated config that captions ``root`` with ``model`` (a tiny local VLM)."""
    return load_config(
        [],
        [
            f"project.data_root={root}",
            "caption.captioner=tiny",
            f"caption.captioners={{tiny: {{type: transformers, model: '{model}', dtype: float32, device: cpu}}}}",
            "caption.generation.max_new_tokens=12",
            "caption.batch_size=4",
            "caption.chunk_rows=3",
            f"caption.resources.executor={executor}",
            "ray.address=local",
            "ray.num_cpus=2",
            *extra,
        ],
    )
