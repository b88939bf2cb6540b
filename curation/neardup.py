"""Near-duplicate decisions over image embeddings, exact or approximate, always deterministic.

The rule (both searches): rows are taken in key order; a row is a near duplicate of the
lowest-key row before it that is still kept and whose cosine with it is at least the
threshold. The first row of every group is kept, so the lowest key wins and the result
does not depend on shard order, worker count or the order rows arrive in.

Two ways to find the pairs (cosine >= threshold):

- :func:`exact_pairs`: every pair, in blocks of matrix products (N^2 / 2 dot products:
  fine to a few hundred thousand rows).
- :func:`ann_pairs`: approximate. faiss k-means cuts the vectors into ``nlist`` cells,
  each row joins its nearest ``cells_per_row`` cells, and rows are compared only with
  the rows of their cells, by the same blocked matrix products: the partition-then-
  compare scheme of NeMo Curator's semantic dedup (k-means clusters, pairwise within
  each), with a row in more than one cell so that pairs near a cell boundary are still
  found. The comparisons are matrix products (BLAS speed on CPU, and they port to a GPU
  as they are); ``bench/neardup_ann.py`` times a faiss IVF range search beside it.

faiss's k-means is seeded and trained on a key-ordered sample, so the cells, and the
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
    cells_per_row: int = 2,
    storage: str = "fp16",
    train_per_cell: int = 40,
    seed: int = 1234,
) -> Pairs:
    """Pairs ``j < i`` with cosine >= threshold, compared within k-means cells.

    faiss k-means (spherical, seeded, trained on every k-th row in key order) cuts the
    vectors into ``nlist`` cells; each row joins its ``cells_per_row`` nearest cells, and
    the rows of each cell are compared with each other by blocked matrix products
    (:func:`exact_pairs`), so the work is about ``cells_per_row^2 x N^2 / nlist`` dot
    products instead of ``N^2 / 2``. A pair is missed only when its two rows share none of
    their nearest cells (rare for cosines near 1: measured in BENCHMARKS.md). The vectors
    are held in memory as ``storage`` (fp16: 2 bytes a dimension; 1 M x 768 is 1.5 GB),
    the similarities computed in fp32 from them (fp16 storage moves a cosine by ~1e-3).
    """
    from paradiffusion.deps import require

    faiss = require("faiss", "faiss-cpu", extra="curation")
    if n == 0:
        return Pairs.empty()
    x = np.zeros((n, dim), dtype=np.float16 if storage == "fp16" else np.float32)
    for pos, vec in chunks():
        x[pos] = vec
    nlist = max(1, min(nlist or auto_nlist(n), n // max(1, train_per_cell)))
    s = max(1, min(cells_per_row, nlist))
    if nlist == 1:
        return exact_pairs(x.astype(np.float32), threshold)
    step = max(1, n // (nlist * train_per_cell))
    train = np.ascontiguousarray(x[::step], dtype=np.float32)
    km = faiss.Kmeans(
        dim, nlist, niter=10, seed=seed, spherical=True, max_points_per_centroid=1 + len(train) // nlist, verbose=False
    )
    km.train(train)
    del train
    cells = np.empty((n, s), dtype=np.int64)
    for c0 in range(0, n, 65536):
        _, cells[c0 : c0 + 65536] = km.index.search(np.ascontiguousarray(x[c0 : c0 + 65536], dtype=np.float32), s)
    flat = cells.ravel()
    members = np.repeat(np.arange(n, dtype=np.int64), s)
    order = np.argsort(flat, kind="stable")  # by cell; rows stay in key order inside a cell
    flat, members = flat[order], members[order]
    bounds = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1], True])
    parts = []
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        if b - a < 2:
            continue
        idx = members[a:b]
        found = exact_pairs(x[idx].astype(np.float32), threshold)
        if len(found.i):
            parts.append(Pairs(idx[found.i], idx[found.j], found.sim))
    pairs = Pairs.concat(parts)
    if s > 1 and len(pairs.i):  # a pair sharing two cells is found twice
        _, first = np.unique(pairs.i * n + pairs.j, return_index=True)
        pairs = Pairs(pairs.i[first], pairs.j[first], pairs.sim[first])
    return pairs
