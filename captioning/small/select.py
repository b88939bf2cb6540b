"""`paradiffusion select-small`: ParaImage-Small candidates from the kept set.

Eligible images are kept by the filter, score at least ``min_aesthetic`` and have a short
side of at least ``min_short_side`` px; every other kept image is counted with its reason.
The ``max_pool`` best eligible images by aesthetic score are clustered with k-means on their
L2-normalised CLIP image embeddings (cosine geometry); candidates are then taken round-robin
over the clusters, best first: every cluster gives its best image before any gives its
second. Each candidate carries its cluster, its rank in the cluster and a readable reason.

k-means is written here in numpy (k-means++ seeding, Lloyd iterations, ~40 lines) rather than
pulling in scikit-learn for one function; the pool it runs on is bounded by ``max_pool``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from captioning.small.config import SelectSmallConfig
from paradiffusion.config import ConfigError, RootConfig
from paradiffusion.log import get_logger
from paradiffusion.schemas import CANDIDATES, SCORES
from paradiffusion.stage import StageSummary, announce, progress
from paradiffusion.storage import Table, join

log = get_logger("captioning.small.select")

SCORE_COLUMNS = ["key", "url", "width", "height", "aesthetic", "clip_score", "kept", "image_embedding"]


def candidates_url(cfg: RootConfig) -> str:
    return cfg.select_small.output or join(cfg.project.data_root, "candidates")


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Cluster the rows of ``x`` into ``k`` groups; returns ``(labels, centroids)``.

    k-means++ seeding, then Lloyd iterations until no label changes (or ``iters``).
    Deterministic for a given ``seed``.
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    rng = np.random.default_rng(seed)
    x = x.astype(np.float64, copy=False)
    sq = np.einsum("ij,ij->i", x, x)
    centroids = np.empty((k, x.shape[1]))
    centroids[0] = x[rng.integers(n)]
    d2 = np.maximum(sq - 2 * x @ centroids[0] + centroids[0] @ centroids[0], 0)
    for i in range(1, k):
        total = d2.sum()
        j = int(rng.choice(n, p=d2 / total)) if total > 0 else int(rng.integers(n))
        centroids[i] = x[j]
        d2 = np.minimum(d2, np.maximum(sq - 2 * x @ centroids[i] + centroids[i] @ centroids[i], 0))
    labels = np.full(n, -1)
    for _ in range(iters):
        dist = sq[:, None] - 2 * x @ centroids.T + np.einsum("ij,ij->i", centroids, centroids)[None, :]
        new = dist.argmin(axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        for c in range(k):
            members = x[labels == c]
            if len(members):
                centroids[c] = members.mean(axis=0)
            else:  # an empty cluster takes the point farthest from its centroid
                far = int(dist[np.arange(n), labels].argmax())
                centroids[c] = x[far]
    return labels, centroids


def _short_side(t: pa.Table) -> np.ndarray:
    w = t["width"].to_numpy(zero_copy_only=False).astype(float)
    h = t["height"].to_numpy(zero_copy_only=False).astype(float)
    return np.fmin(w, h)  # NaN where unknown


def eligible(scores: pa.Table, sc: SelectSmallConfig, summary: StageSummary) -> pa.Table:
    """The kept rows that pass the score, size (and embedding) rules; counts the others by reason."""
    kept = scores.filter(pc.field("kept"))
    summary.n_in = kept.num_rows
    short = _short_side(kept)
    aest = kept["aesthetic"].to_numpy(zero_copy_only=False).astype(float)
    reasons = np.full(kept.num_rows, None, dtype=object)
    reasons[np.isnan(short)] = "no_size"
    reasons[(reasons == None) & (short < sc.min_short_side)] = "short_side_below_min"  # noqa: E711
    reasons[(reasons == None) & np.isnan(aest)] = "no_aesthetic_score"  # noqa: E711
    if sc.min_aesthetic is not None:
        reasons[(reasons == None) & (aest < sc.min_aesthetic)] = "aesthetic_below_min"  # noqa: E711
    if sc.diversity == "kmeans":
        has_emb = kept["image_embedding"].is_valid().to_numpy(zero_copy_only=False)
        reasons[(reasons == None) & ~has_emb] = "no_image_embedding"  # noqa: E711
    for r, n in zip(*np.unique(reasons[reasons != None].astype(str), return_counts=True), strict=True):  # noqa: E711
        summary.reject(str(r), int(n))
    ok = kept.filter(pa.array(reasons == None))  # noqa: E711
    return ok.append_column("short_side", pa.array(short[reasons == None].astype(np.int32)))  # noqa: E711


def choose(pool: pa.Table, sc: SelectSmallConfig, seed: int) -> pa.Table:
    """Cluster the pool and take candidates round-robin over clusters, best first."""
    n = pool.num_rows
    aest = pool["aesthetic"].to_numpy(zero_copy_only=False).astype(float)
    if sc.diversity == "kmeans" and n:
        emb = np.asarray(pool["image_embedding"].to_pylist(), dtype=np.float32)
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        k = min(sc.n_clusters or sc.n_candidates, n)
        labels, _ = kmeans(emb, k, seed=seed, iters=sc.kmeans_iters)
    else:
        labels = np.full(n, -1)
    order = np.lexsort((np.arange(n), -aest, labels))  # by cluster, then best score first
    rank = np.empty(n, dtype=np.int64)
    sizes = np.zeros(n, dtype=np.int64)
    for c in np.unique(labels):
        idx = order[labels[order] == c]
        rank[idx] = np.arange(1, len(idx) + 1)
        sizes[idx] = len(idx)
    pick = np.lexsort((np.arange(n), -aest, rank))[: sc.n_candidates]  # rank 1 of every cluster first
    rows = []
    for i, j in enumerate(pick, start=1):
        c = int(labels[j])
        why = (
            f"best of cluster {c} ({sizes[j]} eligible)"
            if rank[j] == 1 and c >= 0
            else f"#{rank[j]} of cluster {c} ({sizes[j]} eligible)"
            if c >= 0
            else f"#{rank[j]} by aesthetic score (no clustering)"
        )
        rows.append(
            {
                "key": pool["key"][j].as_py(),
                "url": pool["url"][j].as_py(),
                "width": pool["width"][j].as_py(),
                "height": pool["height"][j].as_py(),
                "short_side": pool["short_side"][j].as_py(),
                "aesthetic": float(aest[j]),
                "clip_score": pool["clip_score"][j].as_py(),
                "cluster": c,
                "cluster_size": int(sizes[j]),
                "rank_in_cluster": int(rank[j]),
                "selection_rank": i,
                "reason": f"{why}; aesthetic {aest[j]:.2f}; short side {pool['short_side'][j].as_py()} px",
            }
        )
    return pa.Table.from_pylist(rows, schema=CANDIDATES) if rows else CANDIDATES.empty_table()


def run_select_small(cfg: RootConfig) -> StageSummary:
    """Select the candidates and write them as one committed shard (a rerun replaces it)."""
    sc = cfg.select_small
    scores_url = join(cfg.project.data_root, "scores")
    out = Table(candidates_url(cfg), CANDIDATES)
    announce(
        "select-small",
        {
            "scores": scores_url,
            "output": out.url,
            "rule": f"kept, aesthetic >= {sc.min_aesthetic}, short side >= {sc.min_short_side} px"
            if sc.min_aesthetic is not None
            else f"kept, short side >= {sc.min_short_side} px",
            "diversity": f"k-means, k = {sc.n_clusters or sc.n_candidates}" if sc.diversity == "kmeans" else "none",
            "candidates": sc.n_candidates,
        },
    )
    summary = StageSummary("select-small")
    src = Table(scores_url, SCORES)
    if not src.done_shards():
        raise FileNotFoundError(f"no committed scores shards under {scores_url}: run `make filter` first")
    cols = [c for c in SCORE_COLUMNS if c != "image_embedding" or sc.diversity == "kmeans"]
    parts = [t for _, t in progress(src.iter_shards(columns=cols), total=len(src.done_shards()), desc="scores")]
    scores = pa.concat_tables(parts)
    if "image_embedding" not in scores.column_names:
        scores = scores.append_column("image_embedding", pa.nulls(scores.num_rows, pa.list_(pa.float32())))
    ok = eligible(scores, sc, summary)
    if ok.num_rows > sc.max_pool:
        keep = np.argsort(-ok["aesthetic"].to_numpy(zero_copy_only=False), kind="stable")[: sc.max_pool]
        summary.reject("outside_max_pool", ok.num_rows - sc.max_pool)
        ok = ok.take(pa.array(np.sort(keep)))
    if sc.diversity == "kmeans" and summary.n_in and summary.rejected.get("no_image_embedding", 0) == summary.n_in:
        raise ConfigError(
            "select_small.diversity = kmeans needs CLIP image embeddings, and no kept image has one: "
            "rerun the filter with filter.save_embeddings=true, or select by score only with "
            "--set select_small.diversity=none"
        )
    chosen = choose(ok, sc, cfg.project.seed)
    summary.reject("not_selected", ok.num_rows - chosen.num_rows)
    summary.n_out = chosen.num_rows
    # The whole selection is rewritten each run: its marker carries this run's settings, so the
    # config saved after it does not count the new shard as made with other settings.
    out.record_settings(sc)
    out.write_shard("00000", chosen, {"eligible": ok.num_rows})
    out.save_config(cfg, "select-small", sc)
    summary.extra["eligible"] = ok.num_rows
    summary.extra["clusters"] = len(set(chosen["cluster"].to_pylist())) if chosen.num_rows else 0
    if chosen.num_rows:
        summary.extra["mean_short_side"] = round(float(np.mean(chosen["short_side"].to_numpy())), 1)
        summary.extra["mean_aesthetic"] = round(float(np.mean(chosen["aesthetic"].to_numpy())), 3)
    summary.finish()
    out.save_json("_summary.json", summary.to_dict())
    summary.print()
    return summary
