"""Pass 2 of the filter (the global decisions) at growing sizes: time and peak memory.

Pass 2 (``curation.filter.decide``) reads every measured shard's hashes, decides exact
duplicates, streams the image embeddings of the remaining rows into the near-duplicate
search (``filter.near_dup``), and rewrites every final ``scores`` shard. This script
writes synthetic measured tables (``scores/_measure``: shards of ``--shard-rows`` rows
with sha256 and pixel hashes, 1 % byte copies and 1 % pixel copies, 10 % rows rejected
earlier, and embeddings with 5 % planted near duplicates; see ``neardup_ann.py``) of
each size in ``--sizes``, then runs pass 2 on each in a fresh process (so each peak RSS
is its own), once with ``dedup: exact`` (hashes only) and once with ``dedup: near``.

    python bench/filter_pass2.py                       # 100 k, 1 M and 3.3 M rows, 256-d
    python bench/filter_pass2.py --sizes 100000 --dim 768

The embedding dimension defaults to 256: 3.3 M x 768 float32 is 10 GB on disk and, held
for the search in fp16, 4.7 GB of memory, more than a shared 24 GB machine should give
one benchmark. The search holds ``rows x dim x 2`` bytes; everything else in pass 2
does not depend on the dimension.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

IMAGE_SIZE = 224


def _cfg(root: Path, mode: str):
    from pipelines.config import load_config

    return load_config(
        [],
        [
            f"project.data_root={root}",
            f"filter.thresholds.dedup={mode}",
            "filter.near_dup.search=ann",
            "filter.thresholds.aesthetic_min=null",
            "filter.models.aesthetic=null",
        ],
    )


def build(root: Path, rows: int, dim: int, shard_rows: int) -> None:
    """A measured table of ``rows`` rows, written as the filter's pass 1 would."""
    import pyarrow as pa
    from neardup_ann import Synthetic

    from curation.filter import check_settings, measure_settings
    from paradiffusion.schemas import SCORES
    from paradiffusion.storage import Table

    if (root / "_built.json").is_file() and json.loads((root / "_built.json").read_text()) == [rows, dim]:
        return
    shutil.rmtree(root, ignore_errors=True)
    f = _cfg(root, "near").filter
    meta = {"run_id": "bench", "settings": {"measure": measure_settings(f, IMAGE_SIZE), "checks": check_settings(f)}}
    work = Table(str(root / "scores" / "_measure"), SCORES)
    data = Synthetic(rows, dim, 2000, 0.05, shard_rows, seed=0)
    for k in range(data.n_chunks):
        pos, x, _ = data.get(k)
        rng = np.random.default_rng([1, k])
        n = len(pos)
        ids = pos.copy()
        copy = rng.random(n) < 0.01  # same bytes as an earlier row
        ids[copy] = (rng.random(copy.sum()) * pos[copy]).astype(np.int64)
        sha = [hashlib.sha256(str(i).encode()).hexdigest() for i in ids]
        pix = ids.copy()
        same_px = rng.random(n) < 0.01  # same pixels as an earlier row
        pix[same_px] = (rng.random(same_px.sum()) * pos[same_px]).astype(np.int64)
        pixel = [hashlib.blake2b(str(i).encode(), digest_size=16).hexdigest() for i in pix]
        rejected = rng.random(n) < 0.10
        reason = np.where(rejected, "too_small", None)
        offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32))
        emb = pa.ListArray.from_arrays(offsets, pa.array(x.ravel(), pa.float32()), mask=pa.array(rejected))
        shard = f"{k:05d}"
        t = pa.table(
            {
                "key": [f"{i:012d}" for i in pos],
                "shard": [shard] * n,
                "url": [f"http://bench.local/{i}.jpg" for i in pos],
                "caption": ["A synthetic picture of something for the benchmark."] * n,
                "width": pa.array(np.full(n, 800), pa.int32()),
                "height": pa.array(np.full(n, 600), pa.int32()),
                "sha256": sha,
                "pixel_hash": pixel,
                "language": ["en"] * n,
                "language_score": pa.array(np.full(n, 0.99), pa.float32()),
                "clip_score": pa.array(np.full(n, 0.3, np.float32), mask=rejected),
                "kept": pa.array(~rejected),
                "reject_reason": pa.array(reason.tolist(), pa.string()),
                "reject_detail": pa.array(np.where(rejected, "short side 100 px < 512", None).tolist(), pa.string()),
                "image_embedding": emb,
            }
        )
        work.write_shard(shard, t, meta=meta)
    (root / "_built.json").write_text(json.dumps([rows, dim]))


def worker(root: Path, mode: str) -> dict:
    """Pass 2 on the measured table under ``root``, from scratch (no final shards yet)."""
    from curation.filter import decide
    from paradiffusion.schemas import SCORES
    from paradiffusion.storage import Table

    shutil.rmtree(root / "scores_out", ignore_errors=True)
    cfg = _cfg(root, mode)
    work = Table(str(root / "scores" / "_measure"), SCORES)
    out = Table(str(root / "scores_out"), SCORES)
    t0 = time.perf_counter()
    written, facts = decide(work, out, cfg, {}, "bench", IMAGE_SIZE)
    seconds = time.perf_counter() - t0
    t = out.read(columns=["reject_reason"])
    import pyarrow.compute as pc

    counts = pc.value_counts(t["reject_reason"]).to_pylist()
    shutil.rmtree(root / "scores_out", ignore_errors=True)
    return {
        "seconds": round(seconds, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "shards_written": written,
        "rows": t.num_rows,
        "reasons": {c["values"] or "kept": c["counts"] for c in counts},
        **facts,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="100000,1000000,3300000")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--shard-rows", type=int, default=10000, help="rows per shard (img2dataset's default)")
    p.add_argument("--modes", default="exact,near")
    p.add_argument("--workdir", default="/tmp/pd_bench_pass2")
    p.add_argument("--keep", action="store_true", help="keep the synthetic tables")
    p.add_argument("--worker", nargs=2, metavar=("ROOT", "MODE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(Path(a.worker[0]), a.worker[1])))
        return
    result: dict = {"machine": f"{platform.node()} {os.cpu_count()} cores", "args": vars(a), "runs": []}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for rows in [int(s) for s in a.sizes.split(",")]:
        root = Path(a.workdir) / f"rows_{rows}"
        t0 = time.perf_counter()
        build(root, rows, a.dim, a.shard_rows)
        built = round(time.perf_counter() - t0, 1)
        for mode in a.modes.split(","):
            r = subprocess.run(
                [sys.executable, __file__, "--worker", str(root), mode], env=env, capture_output=True, text=True
            )
            if r.returncode != 0:
                raise SystemExit(r.stderr[-3000:])
            run = {
                "rows": rows,
                "dim": a.dim,
                "mode": mode,
                "build_seconds": built,
                **json.loads(r.stdout.splitlines()[-1]),
            }
            result["runs"].append(run)
            print(json.dumps(run), file=sys.stderr)
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    out = Path(os.environ.get("OUT") or a.workdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "filter_pass2.json").write_text(text)


if __name__ == "__main__":
    main()
