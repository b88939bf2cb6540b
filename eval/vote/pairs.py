"""Pairs to vote on, from the ``eval_images`` table; votes out to Parquet."""

from __future__ import annotations

import itertools
from collections import Counter
from typing import NamedTuple

import pyarrow as pa

from paradiffusion.log import get_logger
from paradiffusion.storage import Table, rows_to_table

log = get_logger("eval.vote")

#: Two aspects (width / height) closer than this (relative) count as the same shape.
ASPECT_TOLERANCE = 0.01


class PairsBuild(NamedTuple):
    """What :func:`build_pairs` made: the pairs, candidates skipped by reason, and the
    pairs whose two images differ in size or shape (``"x vs y: 640x1024 vs 1024x1024"`` ->
    count): refused (in ``skipped`` too) unless ``equalise="crop"``."""

    rows: list[dict]
    skipped: Counter
    aspect_mismatch: Counter


def _size(r: dict) -> tuple[int, int] | None:
    w, h = r.get("width"), r.get("height")
    return (int(w), int(h)) if w and h else None


def _wh(s: tuple[int, int] | None) -> str:
    return f"{s[0]}x{s[1]}" if s else "unknown"


def _differ(sx: tuple[int, int] | None, sy: tuple[int, int] | None, size: tuple[int, int] | None) -> bool:
    """Whether two images (or either and the study's ``size``) differ in size or aspect.
    A size that the table does not record counts as different: it cannot be checked."""
    if not sx or not sy:
        return True
    sizes = [sx, sy] + ([tuple(size)] if size else [])
    aspects = [w / h for w, h in sizes]
    return len(set(sizes[:2])) > 1 or max(aspects) / min(aspects) - 1 > ASPECT_TOLERANCE


def build_pairs(
    images: pa.Table,
    comparisons: list[list[str]] | None = None,
    prompt_sets: list[str] | None = None,
    seeds_per_prompt: int = 1,
    size: tuple[int, int] | None = None,
    equalise: str = "none",
) -> PairsBuild:
    """One pair per (prompt, seed, comparison) where both models have an image.

    ``comparisons`` None pairs every two models found (in name order). Seeds used are
    the lowest ``seeds_per_prompt`` that both models have. Returns the pairs, the
    reasons some candidates were skipped (counted, not dropped silently) and the pairs
    whose two images differ in size or aspect ratio, or (with ``size``) whose size is
    not the study's: a voter could tell such models apart by shape. With ``equalise``
    ``"none"`` they are refused (``skipped["size_mismatch:x_vs_y"]``) and logged as an
    error; with ``"crop"`` they are kept (both are centre-cropped to the study's aspect
    when served) and logged as a warning.
    """
    if equalise not in ("none", "crop"):
        raise ValueError(f"equalise must be none or crop, got {equalise!r}")
    skipped: Counter = Counter()
    mismatch: Counter = Counter()
    by_key: dict[tuple[str, str, int], dict[str, dict]] = {}
    for r in images.to_pylist():
        if r.get("error") or not r.get("image_path"):
            skipped["image_failed"] += 1
            continue
        if prompt_sets and r["prompt_set"] not in prompt_sets:
            continue
        by_key.setdefault((r["prompt_set"], r["prompt_id"], int(r["seed"])), {})[r["model"]] = r
    models = sorted({m for d in by_key.values() for m in d})
    pairs_of = [tuple(p) for p in comparisons] if comparisons else list(itertools.combinations(models, 2))
    seeds_by_prompt: dict[tuple[str, str], list[int]] = {}
    for ps, pid, seed in by_key:
        seeds_by_prompt.setdefault((ps, pid), []).append(seed)
    rows = []
    for (ps, pid), seeds in sorted(seeds_by_prompt.items()):
        for mx, my in pairs_of:
            usable = sorted(s for s in seeds if mx in by_key[(ps, pid, s)] and my in by_key[(ps, pid, s)])
            if not usable:
                skipped[f"missing_image:{mx}_vs_{my}"] += 1
                continue
            for seed in usable[:seeds_per_prompt]:
                x, y = by_key[(ps, pid, seed)][mx], by_key[(ps, pid, seed)][my]
                sx, sy = _size(x), _size(y)
                if _differ(sx, sy, size):
                    mismatch[f"{mx} vs {my}: {_wh(sx)} vs {_wh(sy)}"] += 1
                    if equalise == "none":
                        skipped[f"size_mismatch:{mx}_vs_{my}"] += 1
                        continue
                rows.append(
                    {
                        "prompt_set": ps,
                        "prompt_id": pid,
                        "category": x.get("category"),
                        "prompt": x["prompt"],
                        "seed": seed,
                        "model_x": mx,
                        "model_y": my,
                        "path_x": x["image_path"],
                        "path_y": y["image_path"],
                        "width_x": sx[0] if sx else None,  # not stored with the pair: the study size when unset
                        "height_x": sx[1] if sx else None,
                    }
                )
    for what, n in sorted(mismatch.items()):
        if equalise == "none":
            log.error(
                "%d pair(s) of %s (width x height) refused: the images differ in size or shape%s, so voters could "
                "tell the models apart. Generate every model of the study at one size, or set eval.vote.equalise: "
                "crop (both centre-cropped to the study's aspect).",
                n,
                what,
                f" or are not the study's {size[0]}x{size[1]}" if size else "",
            )
        else:
            log.warning(
                "%d pair(s) of %s (width x height): the images differ in size or shape; both are centre-cropped to "
                "the study's aspect when served (eval.vote.equalise: crop), so their edges are cut.",
                n,
                what,
            )
    return PairsBuild(rows, skipped, mismatch)


def export_votes(store, folder: str) -> tuple[str, int]:
    """Write every vote to ``<folder>/export`` (one committed Parquet shard, replaced on
    each export) and return the table URL and the row count. Query it with DuckDB over the
    committed shards: ``SELECT * FROM {Table(url).sql_source()}``."""
    from eval.schemas import VOTES

    table = Table(f"{folder.rstrip('/')}/export", schema=VOTES)
    rows = store.votes_rows()
    table.write_shard("votes", rows_to_table(rows, VOTES))
    return table.url, len(rows)
