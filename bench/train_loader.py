"""CPU benchmark: the training data loader (decode + bucket resize/crop/flip + batching) into
512 px batches, beside decoding alone, in the same run on the same shards: everything in the
training loop (``data.num_workers: 0``) and with loader processes (a reader thread reads the
shards, ``--workers`` processes decode, batches come back in order).

Usage: python bench/train_loader.py [--n 256] [--batch 8] [--resolution 512] [--rounds 3] [--workdir ...]
Prints one JSON line; numbers go to BENCHMARKS.md with the machine they ran on.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_shards(folder: Path, n: int, per_shard: int = 64, seed: int = 0) -> None:
    """img2dataset-like shards of photo-like JPEGs with web-like sizes (short side 512-1024)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from paradiffusion.testing.sample import synthetic_image

    if folder.is_dir() and len(list(folder.glob("*_stats.json"))) * per_shard >= n:
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = [(768, 512), (512, 768), (1024, 1024), (1024, 576), (640, 640), (800, 1200)]
    for s in range(0, n, per_shard):
        rows = []
        for i in range(s, min(n, s + per_shard)):
            w, h = sizes[i % len(sizes)]
            buf = io.BytesIO()
            synthetic_image(rng, w, h).save(buf, "JPEG", quality=90)
            rows.append(
                {
                    "key": f"{i:09d}",
                    "caption": "a picture",
                    "jpg": buf.getvalue(),
                    "status": "success",
                    "width": w,
                    "height": h,
                }
            )
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{s // per_shard:05d}.parquet")
        (folder / f"{s // per_shard:05d}_stats.json").write_text("{}")


def decode_only(folder: Path) -> tuple[int, float]:
    from PIL import Image

    from paradiffusion.images import image_shards, read_image_shard

    t0 = time.perf_counter()
    n = 0
    for _, url in image_shards(str(folder)):
        for data in read_image_shard(url, ["image"])["image"].to_pylist():
            Image.open(io.BytesIO(data)).convert("RGB")
            n += 1
    return n, time.perf_counter() - t0


def loader(folder: Path | str, n: int, batch: int, resolution: int, workers: int) -> tuple[int, float]:
    from training.data import BucketedImageData

    t0 = time.perf_counter()
    data = BucketedImageData(
        str(folder), batch, resolution, random_crop=True, random_flip=True, shuffle_buffer=64, num_workers=workers
    )
    seen = 0
    for b in data:
        seen += b["pixel_values"].shape[0]
        if data.epoch > 0 or seen >= n:
            break
    return seen, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--workdir", default="bench_out/train_loader")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="loader processes (train.stageN.data.num_workers)")
    a = ap.parse_args()
    import torch

    import training.data  # noqa: F401 - imported before the clock starts

    torch.set_num_threads(1)  # one process, one core: the loader is per rank
    folder = Path(a.workdir) / "images"
    write_shards(folder, a.n)
    decode_only(folder)  # warm the page cache so both read from memory
    dec, load0, loadw = [], [], []
    for _ in range(a.rounds):  # interleaved rounds, best of each: the machine may be shared and noisy
        nd, td = decode_only(folder)
        n0, t0 = loader(folder, a.n, a.batch, a.resolution, 0)
        nw, tw = loader(folder, a.n, a.batch, a.resolution, a.workers)
        dec.append(nd / td)
        load0.append(n0 / t0)
        loadw.append(nw / tw)
    out = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "images": a.n,
        "rounds": a.rounds,
        "decode_only_img_per_s": round(max(dec), 1),
        "loader_in_loop_img_per_s": round(max(load0), 1),
        f"loader_{a.workers}_processes_img_per_s": round(max(loadw), 1),
        "processes_over_in_loop": round(max(loadw) / max(load0), 3),
        "batch": a.batch,
        "resolution": a.resolution,
        "all_rounds": {
            "decode": [round(x, 1) for x in dec],
            "loader_in_loop": [round(x, 1) for x in load0],
            "loader_processes": [round(x, 1) for x in loadw],
        },
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
