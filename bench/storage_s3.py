"""Benchmark: tables on S3 (moto's server on loopback) beside the same tables on local disk, same run.

Three measurements, each local vs S3 in interleaved rounds (best of each: the machine may be
shared and noisy), plus the S3 requests each made (counted from the server's access log):

1. **storage contract**: ``Table.write_shard`` then ``Table.read`` of ``--shards`` small
   shards: requests per committed shard (write: temp object, copy, delete, marker; read:
   listing, markers, data).
2. **filter**: ``run_filter`` as a plain loop (``filter.runner: local``, so Ray's start-up
   is not in the number) with a tiny random CLIP on img2dataset shards of web-sized JPEGs:
   images/s and requests per input shard.
3. **trainer loader**: ``BucketedImageData`` (decode, bucket resize/crop, batches) reading
   the same shards, in the training loop and with loader processes: images/s.

Loopback S3 adds an HTTP round trip (~1 ms) per request and moto's own CPU time on the same
2 cores; a real remote store adds ~10-50 ms per request and its bandwidth instead. The
request counts are what carries over: multiply them by a store's latency for the added time
of a run (see BENCHMARKS.md).

Usage: python bench/storage_s3.py [--images 256] [--shards 32] [--rounds 3] [--workdir bench_out/storage_s3]
Prints one JSON line (also written to <workdir>/storage_s3.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_loader import loader  # noqa: E402  (the same loader run as bench/train_loader.py)


def _requests(srv, before) -> dict:
    now = srv.request_counts()
    return {k: now[k] - before.get(k, 0) for k in now if now[k] - before.get(k, 0)}


def write_fixture(folder: Path, n: int, per_shard: int) -> None:
    """The training-loader benchmark's shards (web-sized JPEGs), with the ``url`` column the filter reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from train_loader import write_shards

    write_shards(folder, n, per_shard=per_shard)
    for f in sorted(folder.glob("*.parquet")):
        t = pq.read_table(f)
        if "url" not in t.column_names:
            t = t.append_column("url", pa.array([f"http://example.invalid/{k}.jpg" for k in t["key"].to_pylist()]))
            pq.write_table(t, f)


def contract(root: str, shards: int) -> tuple[float, float]:
    """Seconds to write then to read ``shards`` committed shards of 100 rows."""
    import pyarrow as pa

    from paradiffusion.storage import Table

    t = Table(root)
    rows = pa.table({"key": [f"{i:06d}" for i in range(100)], "value": list(range(100))})
    t0 = time.perf_counter()
    for s in range(shards):
        t.write_shard(f"{s:05d}", rows)
    t1 = time.perf_counter()
    assert Table(root).read().num_rows == 100 * shards
    return t1 - t0, time.perf_counter() - t1


def filter_run(root: str, tiny: dict) -> tuple[int, float]:
    from curation.filter import run_filter
    from paradiffusion.storage import Table
    from pipelines.config import load_config

    sets = [
        f"project.data_root={root}",
        "filter.runner=local",
        f"filter.models.clip_model={tiny['clip_model']}",
        f"filter.models.aesthetic={tiny['aesthetic']}",
        "filter.thresholds.aesthetic_min=null",
        "filter.thresholds.clip_score_min=null",
        "filter.thresholds.languages=[]",
        "filter.torch_threads=1",
    ]
    cfg = load_config([], sets)
    t0 = time.perf_counter()
    assert run_filter(cfg) == 0
    dt = time.perf_counter() - t0
    return int(Table(f"{root}/scores").load_json("_summary.json")["in"]), dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--per-shard", type=int, default=32)
    ap.add_argument("--shards", type=int, default=32, help="shards of the storage-contract measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="loader processes")
    ap.add_argument("--workdir", default=os.environ.get("OUT", "bench_out/storage_s3"))
    a = ap.parse_args()

    import torch

    import curation.filter  # noqa: F401 - imported before any clock starts
    import training.data  # noqa: F401
    from paradiffusion.log import third_party_output_to
    from paradiffusion.storage import apply_storage_options, upload_folder
    from paradiffusion.testing.s3 import S3Server
    from paradiffusion.testing.tiny_clip import build_tiny_clip

    torch.set_num_threads(1)
    work = Path(a.workdir).resolve()
    local_images = work / "fixture" / "images"
    write_fixture(local_images, a.images, a.per_shard)
    n_input_shards = len(list(local_images.glob("*_stats.json")))
    tiny = build_tiny_clip(work / "models")
    res: dict[str, list] = {k: [] for k in ("contract", "filter", "loader0", "loaderw")}
    req: dict[str, dict] = {}
    with S3Server(log_path=str(work / "moto-access.log")) as srv:
        bucket = srv.make_bucket(f"bench-{uuid.uuid4().hex[:8]}")
        apply_storage_options({"s3": srv.storage_options()})
        s3_images = f"{bucket}/fixture/images"
        upload_folder(local_images, s3_images)
        for r in range(a.rounds):
            for where in ("local", "s3"):
                base = f"{bucket}/r{r}" if where == "s3" else str(work / f"r{r}")
                if where == "local":
                    shutil.rmtree(base, ignore_errors=True)
                images = s3_images if where == "s3" else str(local_images)
                # 1. the storage contract
                before = srv.request_counts()
                w, rd = contract(f"{base}/contract", a.shards)
                res["contract"].append((where, a.shards / w, a.shards / rd))
                if where == "s3" and r == 0:
                    req["contract"] = _requests(srv, before)
                # 2. filter (the images are copied beside its output: data_root/images)
                root = f"{base}/filter"
                if where == "s3":
                    import fsspec

                    fs = fsspec.filesystem("s3")
                    fs.copy(s3_images.removeprefix("s3://"), f"{root}/images".removeprefix("s3://"), recursive=True)
                else:
                    shutil.copytree(local_images, Path(root, "images"))
                before = srv.request_counts()
                with third_party_output_to(str(work / "filter.log")):
                    n, dt = filter_run(root, tiny)
                res["filter"].append((where, n / dt))
                if where == "s3" and r == 0:
                    req["filter"] = _requests(srv, before)
                # 3. the trainer's loader
                before = srv.request_counts()
                n0, t0 = loader(images, a.images, 8, 256, 0)
                res["loader0"].append((where, n0 / t0))
                if where == "s3" and r == 0:
                    req["loader_in_loop"] = _requests(srv, before)
                nw, tw = loader(images, a.images, 8, 256, a.workers)
                res["loaderw"].append((where, nw / tw))

    def best(key: str, where: str, i: int = 1) -> float:
        return max(x[i] for x in res[key] if x[0] == where)

    def per(counts: dict, n: int) -> dict:
        return {k: round(v / n, 1) for k, v in sorted(counts.items())} | {"total": round(sum(counts.values()) / n, 1)}

    out = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared, noisy)",
        "s3": "moto 5.2.5 server on 127.0.0.1 (same machine), s3fs 2026.9.0",
        "images": a.images,
        "input_shards": n_input_shards,
        "rounds": a.rounds,
        "contract_write_shards_per_s": {w: round(best("contract", w), 1) for w in ("local", "s3")},
        "contract_read_shards_per_s": {w: round(best("contract", w, 2), 1) for w in ("local", "s3")},
        "contract_requests_per_shard_write_then_read": per(req["contract"], a.shards),
        "filter_img_per_s": {w: round(best("filter", w), 1) for w in ("local", "s3")},
        "filter_s3_over_local": round(best("filter", "s3") / best("filter", "local"), 3),
        "filter_requests_per_input_shard": per(req["filter"], n_input_shards),
        "loader_in_loop_img_per_s": {w: round(best("loader0", w), 1) for w in ("local", "s3")},
        "loader_in_loop_s3_over_local": round(best("loader0", "s3") / best("loader0", "local"), 3),
        "loader_in_loop_requests_per_input_shard": per(req["loader_in_loop"], n_input_shards),
        f"loader_{a.workers}_processes_img_per_s": {w: round(best("loaderw", w), 1) for w in ("local", "s3")},
        f"loader_{a.workers}_processes_s3_over_local": round(best("loaderw", "s3") / best("loaderw", "local"), 3),
        "all_rounds": {k: [[x[0]] + [round(v, 1) for v in x[1:]] for x in v] for k, v in res.items()},
    }
    line = json.dumps(out)
    print(line)
    (work / "storage_s3.json").write_text(line + "\n")


if __name__ == "__main__":
    main()
