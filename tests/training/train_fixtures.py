"""Builders for the trainer tests: img2dataset-style image shards and a tiny-model config."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.config import PipelinesConfig

CAPTIONS = [
    "A red square on a blue background.",
    "A green circle in the middle of a white field.",
    "Yellow stripes crossing a dark purple sky.",
    "An orange triangle next to a small black dot.",
]


def write_image_shards(
    folder: Path,
    n_shards: int = 2,
    per_shard: int | list[int] = 6,
    size: int = 40,
    seed: int = 0,
    corrupt: int = 0,
    missing_caption: int = 0,
    sizes: list[tuple[int, int]] | None = None,
    row_group_size: int | None = None,
    null_sizes: bool = False,
) -> list[str]:
    """img2dataset-like parquet shards (key, caption, jpg, status, width, height + _stats.json); returns keys.

    ``per_shard``: rows in every shard, or a list with each shard's rows. ``row_group_size``: rows
    per Parquet row group (img2dataset writes 100; default: one group a shard). ``null_sizes``: width and
    height null, as img2dataset writes them when it stores the bytes as downloaded."""

    from paradiffusion.testing.sample import synthetic_image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    n = 0
    counts = per_shard if isinstance(per_shard, list) else [per_shard] * n_shards
    for s, count in enumerate(counts):
        rows = []
        for i in range(count):
            w, h = sizes[n % len(sizes)] if sizes else (size, size)
            img = synthetic_image(rng, w, h)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=90)
            data = buf.getvalue()
            caption = CAPTIONS[n % len(CAPTIONS)]
            if n < corrupt:
                data = data[: len(data) // 4]
            elif n < corrupt + missing_caption:
                caption = None
            key = f"{s:05d}{i:04d}"
            keys.append(key)
            rows.append(
                {
                    "key": key,
                    "caption": caption,
                    "jpg": data,
                    "status": "success",
                    "width": None if null_sizes else w,
                    "height": None if null_sizes else h,
                    "url": f"http://x/{key}.jpg",
                }
            )
            n += 1
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{s:05d}.parquet", row_group_size=row_group_size)
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"count": count}))
    return keys


def tiny_config(tiny_models: dict, root: Path, **stage_overrides) -> PipelinesConfig:
    """A config that trains the tiny models on ``root/images`` for a few steps on CPU."""
    stage = {
        "max_steps": 4,
        "micro_batch_size": 2,
        "caption_dropout": 0.2,
        "data": {"resolution": 16, "bucket_step": 4, "shuffle_buffer": 8, "num_workers": 1},
        "optim": {"lr": 1e-3, "warmup_steps": 0},
        "checkpoint": {"every_steps": 2, "keep_last": 2},
        "logging": {
            "every_steps": 1,
            "validation_every_steps": 1000,
            "validation_steps": 2,
            "validation_size": [16, 16],
        },
    }
    doc = {
        "project": {"data_root": str(root), "seed": 0},
        "train": {
            "model": {
                "llm": tiny_models["llm"],
                "unet": tiny_models["unet"],
                "vae": tiny_models["vae"],
                "scheduler": tiny_models["scheduler"],
            },
            "lora": {"rank": 4, "alpha": 8},
            "stage1": stage,
            "stage2": {**stage, "max_length": 32},
            "stage3": {**stage, "max_length": 32},
        },
    }
    for key, value in stage_overrides.items():
        for s in ("stage1", "stage2", "stage3"):
            node = doc["train"][s]
            parts = key.split(".")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = value
    return PipelinesConfig.model_validate(doc)
