"""Near-duplicate decisions over image embeddings, exact or approximate, always deterministic.

The rule (both searches): rows are taken in key order; a row is a near duplicate of the
lowest-key row before it that is still kept and whose cosine with it is at least the
threshold. The first row of every group is kept, so the lowest key wins and the result
does not depend on shard order, worker count or the order rows arrive in.

Two ways to find the pairs (cosine >= threshold):

- :func:`exact_pairs`: every pair, in blocks of matrix products (N^2 / 2 dot products:
  fine to a few hundred thousand rows).
- :func:`ann_pairs`: a faiss IVF index (inverted file: a k-means coarse quantizer
  assigns each vector to one of ``nlist`` cells; a query scans its ``nprobe`` nearest
  cells) and a range search at the threshold, streaming the vectors twice (add, then
  query) so memory is the index's (``storage`` fp16: 2 bytes a dimension). Pairs whose
  vectors fall in cells the query does not probe are missed (recall < 1; measured in
  BENCHMARKS.md). This is the partition-then-compare idea of NeMo Curator's semantic
  dedup (k-means clusters, pairwise within), with faiss doing the partition and search.

faiss's k-means is seeded and trained on a key-ordered sample, so the index, and the
decisions, repeat exactly for the same input and settings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

#: Yields ``(positions, vectors)``: positions are rows' indices in key order (int64), the
#: vectors L2-normalised float32 ``(n, dim)``. Called once per pass over the data.
ChunkSource = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]


@dataclass
class Pairs:
    """Pairs ``(i, j)`` with ``j < i`` (positions in key order) and their cosine."""

    i: np.ndarray
    j: np.ndarray
    sim: np.ndarray

    @staticmethod
    def empty() -> Pairs:
        return Pairs(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))

    @staticmethod
    def concat(parts: list[Pairs]) -> Pairs:
        if not parts:
            return Pairs.empty()
        return Pairs(*(np.concatenate([getattr(p, a) for p in parts]) for a in ("i", "j", "sim")))


def decide(n: int, pairs: Pairs) -> dict[int, tuple[int, float]]:
    """Apply the rule to ``pairs``: ``{i: (j, cosine)}`` for every near-duplicate row ``i``."""
    if len(pairs.i) == 0:
        return {}
    order = np.lexsort((pairs.j, pairs.i))  # by row, then by earlier row (lowest key first)
    i, j, sim = pairs.i[order], pairs.j[order], pairs.sim[order]
    starts = np.flatnonzero(np.r_[True, i[1:] != i[:-1]])
    ends = np.r_[starts[1:], len(i)]
    kept = np.ones(n, dtype=bool)
    out: dict[int, tuple[int, float]] = {}
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):  # rows with a pair, in key order
        row = int(i[s])
        alive = kept[j[s:e]]
        if alive.any():
            k = s + int(np.argmax(alive))
            kept[row] = False
            out[row] = (int(j[k]), float(sim[k]))
    return out


def exact_pairs(emb: np.ndarray, threshold: float, block: int = 2048) -> Pairs:
    """Every pair ``j < i`` of rows of ``emb`` (key order, normalised) with cosine >= threshold."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n = len(emb)
    parts = []
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        for c0 in range(0, r1, block):
            c1 = min(r1, c0 + block)
            sims = emb[r0:r1] @ emb[c0:c1].T
            hit = sims >= threshold
            if c0 == r0:  # the diagonal block: only earlier rows
                hit &= np.tri(r1 - r0, c1 - c0, -1, dtype=bool)
            a, b = np.nonzero(hit)
            if len(a):
                parts.append(Pairs(a + r0, b + c0, sims[a, b].astype(np.float32)))
    return Pairs.concat(parts)


def auto_nlist(n: int) -> int:
    """About 2 x sqrt(n) cells, a power of two (1 M rows: 2048), at least 1."""
    if n < 4:
        return 1
    return max(1, 2 ** round(math.log2(2 * math.sqrt(n))))


def ann_pairs(
    chunks: ChunkSource,
    n: int,
    dim: int,
    threshold: float,
    nlist: int | None = None,
    nprobe: int = 16,
    storage: str = "fp16",
    train_per_cell: int = 40,
    seed: int = 1234,
    query_batch: int = 16384,
) -> Pairs:
    """Pairs ``j < i`` with cosine >= threshold found by a faiss IVF range search.

    ``chunks`` is read three times at most: to pick the training sample (every k-th row
    in key order), to add the vectors, and to query them. Similarities come from the
    index's ``storage`` (fp16 moves a cosine by about 1e-3).
    """
    from paradiffusion.deps import require

    faiss = require("faiss", "faiss-cpu", extra="curation")
    if n == 0:
        return Pairs.empty()
    nlist = min(nlist or auto_nlist(n), max(1, n // max(1, train_per_cell)))
    quantizer = faiss.IndexFlatIP(dim)
    if storage == "fp32":
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        qtype = {"fp16": faiss.ScalarQuantizer.QT_fp16, "sq8": faiss.ScalarQuantizer.QT_8bit}[storage]
        index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, qtype, faiss.METRIC_INNER_PRODUCT)
    step = max(1, n // (nlist * train_per_cell))
    sample = []
    for pos, vec in chunks():
        take = pos % step == 0
        if take.any():
            sample.append(vec[take])
    train = np.ascontiguousarray(np.concatenate(sample), dtype=np.float32)
    index.cp.seed = seed
    index.cp.niter = 10
    index.cp.max_points_per_centroid = max(train_per_cell, 1 + len(train) // nlist)  # use the whole sample
    index.train(train)
    del train, sample
    for pos, vec in chunks():
        index.add_with_ids(np.ascontiguousarray(vec, dtype=np.float32), pos.astype(np.int64))
    index.nprobe = min(nprobe, nlist)
    radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))  # faiss keeps sim > radius
    parts = []
    for pos, vec in chunks():
        for q0 in range(0, len(pos), query_batch):
            qpos = pos[q0 : q0 + query_batch]
            lims, sims, ids = index.range_search(np.ascontiguousarray(vec[q0 : q0 + query_batch]), radius)
            row = np.repeat(qpos.astype(np.int64), np.diff(lims).astype(np.int64))
            keep = (ids < row) & (sims >= threshold)
            if keep.any():
                parts.append(Pairs(row[keep], ids[keep].astype(np.int64), sims[keep].astype(np.float32)))
    return Pairs.concat(parts)
