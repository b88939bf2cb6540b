"""Write an ``images`` table (img2dataset's parquet output) straight from sample files.

Tests and benchmarks of the stages after download use this instead of running
img2dataset: the same columns (``key``, ``url``, ``caption``, ``jpg`` bytes, ``status``,
``error_message``, ``width``, ``height``, ...) and a ``<shard>_stats.json`` written
last, as img2dataset does when a shard is complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from paradiffusion.testing.sample import SampleRecord

#: How a failed download looks in img2dataset's parquet output.
FAILED = {"status": "failed_to_download", "error_message": "HTTP Error 404: Not Found"}

#: The columns of img2dataset's parquet output that the later stages read.
SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("jpg", pa.binary()),
        ("status", pa.string()),
        ("error_message", pa.string()),
    ]
)


def write_image_shard(out_dir: str | os.PathLike, name: str, rows: list[dict]) -> None:
    """Write one shard like img2dataset does: the parquet first, ``<name>_stats.json`` last."""
    out = Path(out_dir)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), out / f"{name}.parquet")
    ok = sum(r["status"] == "success" for r in rows)
    (out / f"{name}_stats.json").write_text(
        json.dumps({"count": len(rows), "successes": ok, "failed_to_download": len(rows) - ok})
    )


def write_image_shards(
    records: Sequence[SampleRecord],
    sample_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    shard_size: int = 16,
    n_failed: int = 0,
    base_url: str = "http://127.0.0.1:0",
) -> list[str]:
    """Write ``records`` (files under ``sample_dir/images``) as img2dataset shards.

    ``n_failed`` extra rows per shard look like failed downloads (no bytes,
    ``status`` failed_to_download). Returns the shard names (``00000``, ``00001``, ...).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    img_dir = Path(sample_dir) / "images"
    names = []
    for s, start in enumerate(range(0, len(records), shard_size)):
        rows = []
        part = list(records[start : start + shard_size])
        for i, r in enumerate(part):
            rows.append(
                {
                    "key": f"{s:05d}{i:04d}",
                    "url": f"{base_url}/images/{r.name}",
                    "caption": r.caption,
                    "jpg": (img_dir / r.name).read_bytes(),
                    "status": "success",
                    "error_message": None,
                }
            )
        for j in range(n_failed):
            rows.append(
                {
                    "key": f"{s:05d}{len(part) + j:04d}",
                    "url": f"{base_url}/missing/{s}-{j}.jpg",
                    "caption": "A picture that never arrived.",
                    "jpg": None,
                    **FAILED,
                }
            )
        name = f"{s:05d}"
        write_image_shard(out, name, rows)
        names.append(name)
    return names
