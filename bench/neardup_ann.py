"""Near-duplicate search at scale: ``filter.near_dup.search: ann`` (faiss k-means cells, pairs
compared within them) on synthetic CLIP-like embeddings with planted near duplicates.

Data: ``--n`` unit vectors of ``--dim`` dimensions from a mixture of ``--clusters``
Gaussian clusters (cosines within a cluster around 0.5, like images of one subject),
generated chunk by chunk from a seed (never all in memory at once); ``--dup-rate`` of the
rows are a noisy copy of an earlier row of their chunk (cosine 0.95-0.999, so some
planted pairs fall under the 0.97 threshold, as re-encoded web copies do).

Measured in one run:

1. the whole search as pass 2 runs it (:func:`curation.neardup.ann_pairs`) on every row,
   for each ``--cells`` (cells a row joins): seconds and peak memory (RSS);
2. recall against brute force on a ``--subset`` of rows (every k-th chunk, so planted
   pairs stay inside it): the exact pairs among subset rows (all-pairs matrix products)
   versus the pairs the search found among them;
3. the decisions (lowest key kept) on the subset, exact versus approximate;
4. for comparison, a faiss IVF index of every row (same cells, fp16) range-searched with
   the subset's rows as queries at several ``nprobe``: recall and seconds per 1,000
   queries (times the rows: what searching every row would cost).

    python bench/neardup_ann.py                 # 1 M x 768, subset 50 k (about 10-20 min on 2 cores)
    python bench/neardup_ann.py --n 100000 --subset 20000   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from curation.neardup import Pairs, ann_pairs, auto_nlist, decide, exact_pairs  # noqa: E402


def peak_rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


class Synthetic:
    """Chunk ``c`` of the data set, regenerated from the seed on every pass."""

    def __init__(self, n: int, dim: int, clusters: int, dup_rate: float, chunk: int, seed: int):
        self.n, self.dim, self.chunk, self.seed, self.dup_rate = n, dim, chunk, seed, dup_rate
        rng = np.random.default_rng(seed)
        c = rng.normal(size=(clusters, dim)).astype(np.float32)
        self.centers = c / np.linalg.norm(c, axis=1, keepdims=True)

    @property
    def n_chunks(self) -> int:
        return -(-self.n // self.chunk)

    def get(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(positions, unit vectors, planted base position or -1) of chunk ``k``."""
        start, stop = k * self.chunk, min(self.n, (k + 1) * self.chunk)
        m = stop - start
        rng = np.random.default_rng([self.seed, k])
        which = rng.integers(0, len(self.centers), m)
        x = self.centers[which] + rng.normal(scale=1.0 / np.sqrt(self.dim), size=(m, self.dim)).astype(np.float32)
        base = np.full(m, -1, np.int64)
        dup = np.flatnonzero(rng.random(m) < self.dup_rate)
        dup = dup[dup > 0]
        src = (rng.random(len(dup)) * dup).astype(np.int64)  # an earlier row of the chunk
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        noise = rng.normal(size=(len(dup), self.dim)).astype(np.float32)
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        eps = rng.uniform(0.045, 0.33, size=(len(dup), 1)).astype(np.float32)  # cosine ~0.999 .. ~0.95
        x[dup] = x[src] + eps * noise
        base[dup] = start + src
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return np.arange(start, stop, dtype=np.int64), x.astype(np.float32), base

    def chunks(self, only=None):
        def gen():
            for k in range(self.n_chunks) if only is None else only:
                pos, x, _ = self.get(k)
                yield pos, x

        return gen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--clusters", type=int, default=2000)
    p.add_argument("--dup-rate", type=float, default=0.05)
    p.add_argument("--threshold", type=float, default=0.97)
    p.add_argument("--subset", type=int, default=50_000)
    p.add_argument("--chunk", type=int, default=8192)
    p.add_argument("--cells", default="2,1", help="cells_per_row settings run on every row (the default, 2, first)")
    p.add_argument("--nprobe-sweep", default="4,16", help="IVF range search comparison at these nprobe")
    p.add_argument("--storage", default="fp16")
    p.add_argument("--out", default=None, help="JSON result (default: $OUT/neardup_ann.json or stdout only)")
    a = p.parse_args()

    import faiss

    data = Synthetic(a.n, a.dim, a.clusters, a.dup_rate, a.chunk, seed=0)
    result: dict = {
        "machine": f"{platform.node()} {os.cpu_count()} cores, faiss threads {faiss.omp_get_max_threads()}",
        "args": vars(a),
        "nlist": auto_nlist(a.n),
    }
    print(json.dumps(result), file=sys.stderr)

    # Ground truth of the planted pairs over every row (one dot product each).
    planted = above = 0
    planted_pairs: dict[int, int] = {}  # dup row -> its base, for the pairs at or above the threshold
    for k in range(data.n_chunks):
        pos, x, base = data.get(k)
        d = np.flatnonzero(base >= 0)
        planted += len(d)
        ok = (x[d] * x[base[d] - pos[0]]).sum(axis=1) >= a.threshold
        above += int(ok.sum())
        planted_pairs.update(zip(pos[d[ok]].tolist(), base[d[ok]].tolist(), strict=True))
    result["planted_pairs"], result["planted_pairs_above_threshold"] = planted, above

    # brute force on the subset: every k-th chunk
    step = max(1, data.n_chunks * a.chunk // max(1, a.subset))
    sub_chunks = list(range(0, data.n_chunks, step))
    sub = [data.get(k) for k in sub_chunks]
    sub_pos = np.concatenate([s[0] for s in sub])
    sub_x = np.concatenate([s[1] for s in sub])
    del sub
    t0 = time.perf_counter()
    exact = exact_pairs(sub_x, a.threshold)
    result["subset"] = {"rows": len(sub_pos), "exact_seconds": round(time.perf_counter() - t0, 1)}
    del sub_x
    truth = {(int(sub_pos[i]), int(sub_pos[j])) for i, j in zip(exact.i, exact.j, strict=True)}
    result["subset"]["exact_pairs"] = len(truth)
    in_sub = set(sub_pos.tolist())
    remap = {int(pp): q for q, pp in enumerate(sub_pos.tolist())}
    de = decide(len(sub_pos), exact)
    result["subset"]["near_duplicates_exact"] = len(de)
    print(json.dumps(result["subset"]), file=sys.stderr)

    # the search pass 2 runs, on every row
    for cells in [int(c) for c in a.cells.split(",") if c]:
        t0 = time.perf_counter()
        pairs = ann_pairs(data.chunks(), a.n, a.dim, a.threshold, cells_per_row=cells, storage=a.storage)
        seconds = time.perf_counter() - t0
        found = {(int(i), int(j)) for i, j in zip(pairs.i, pairs.j, strict=True)}
        got = {(i, j) for i, j in found if i in in_sub and j in in_sub}
        ann_sub = [(remap[i], remap[j]) for i, j in sorted(got)]
        da = decide(
            len(sub_pos),
            Pairs(
                np.array([i for i, _ in ann_sub], np.int64),
                np.array([j for _, j in ann_sub], np.int64),
                np.ones(len(ann_sub), np.float32),
            ),
        )
        planted_found = sum(1 for i, j in found if planted_pairs.get(i) == j)
        result[f"ann_cells_per_row_{cells}"] = {
            "seconds": round(seconds, 1),
            "rows_per_s": round(a.n / seconds),
            "pairs_found": len(found),
            "planted_pairs_found": planted_found,
            "planted_recall": round(planted_found / max(1, above), 4),
            "subset_recall": round(len(got & truth) / max(1, len(truth)), 4),
            "subset_false_pairs": len(got - truth),
            "subset_near_duplicates": len(da),
            "subset_same_decision_as_exact": sum(1 for i in de if i in da and da[i][0] == de[i][0]),
            "peak_rss_gb_so_far": peak_rss_gb(),
            "vectors_in_memory_gb": round(a.n * a.dim * {"fp32": 4, "fp16": 2}[a.storage] / 2**30, 2),
        }
        print(json.dumps(result[f"ann_cells_per_row_{cells}"]), file=sys.stderr)
        del pairs, found

    # (an index of the subset alone would be easier than the full one: the subset's rows
    # are queried in an index of every row instead)
    sweep = [int(v) for v in a.nprobe_sweep.split(",") if v]
    result["faiss_ivf_range_search"] = _sweep(data, a, sub_chunks, truth, in_sub, sweep)
    result["peak_rss_gb"] = peak_rss_gb()
    text = json.dumps(result, indent=2)
    print(text)
    out = a.out or (os.path.join(os.environ["OUT"], "neardup_ann.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(text)


def _sweep(data: Synthetic, a, sub_chunks, truth, in_sub, sweep) -> dict:
    """Recall on the subset at each nprobe, querying the subset's rows in an index of every row."""
    import faiss

    from curation.neardup import auto_nlist

    out: dict = {}
    if not sweep:
        return out
    nlist = auto_nlist(a.n)
    t_build = time.perf_counter()
    quantizer = faiss.IndexFlatIP(a.dim)
    qtype = {"fp16": faiss.ScalarQuantizer.QT_fp16, "sq8": faiss.ScalarQuantizer.QT_8bit}.get(a.storage)
    index = (
        faiss.IndexIVFFlat(quantizer, a.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        if qtype is None
        else faiss.IndexIVFScalarQuantizer(quantizer, a.dim, nlist, qtype, faiss.METRIC_INNER_PRODUCT)
    )
    step = max(1, a.n // (nlist * 40))
    train = np.concatenate([x[pos % step == 0] for pos, x in data.chunks()()])
    index.cp.seed, index.cp.niter = 1234, 10
    index.cp.max_points_per_centroid = 1 + len(train) // nlist
    index.train(train)
    del train
    for pos, x in data.chunks()():
        index.add_with_ids(x, pos)
    out["build_seconds"] = round(time.perf_counter() - t_build, 1)
    radius = float(np.nextafter(np.float32(a.threshold), np.float32(-np.inf)))
    for nprobe in sweep:
        index.nprobe = nprobe
        got = set()
        t0 = time.perf_counter()
        for pos, x in data.chunks(sub_chunks)():
            lims, sims, ids = index.range_search(x, radius)
            rows = np.repeat(pos, np.diff(lims).astype(np.int64))
            for i, j in zip(rows.tolist(), ids.tolist(), strict=True):
                if j < i and j in in_sub:
                    got.add((i, j))
        secs = time.perf_counter() - t0
        out[f"nprobe_{nprobe}"] = {
            "subset_recall": round(len(got & truth) / max(1, len(truth)), 4),
            "seconds_per_1k_queries": round(secs / len(in_sub) * 1000, 3),
            "every_row_seconds_estimate": round(secs / len(in_sub) * a.n),
        }
    return out


if __name__ == "__main__":
    main()
