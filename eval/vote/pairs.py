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
    """What :func:`build_pairs` made: the pairs, candidates skipped by reason, and pairs
    whose two images differ in shape (``"x vs y: 640x1024 vs 1024x1024"`` -> count)."""

    rows: list[dict]
    skipped: Counter
    aspect_mismatch: Counter


def _size(r: dict) -> tuple[int, int] | None:
    w, h = r.get("width"), r.get("height")
    return (int(w), int(h)) if w and h else None


def build_pairs(
    images: pa.Table,
    comparisons: list[list[str]] | None = None,
    prompt_sets: list[str] | None = None,
    seeds_per_prompt: int = 1,
) -> PairsBuild:
    """One pair per (prompt, seed, comparison) where both models have an image.

    ``comparisons`` None pairs every two models found (in name order). Seeds used are
    the lowest ``seeds_per_prompt`` that both models have. Returns the pairs, the
    reasons some candidates were skipped (counted, not dropped silently) and the pairs
    whose images differ in aspect ratio, which are also logged as a warning: a voter
    could tell such models apart by shape, so the voting app shows both images of a
    pair in one box (``eval.vote.display``), and generating both at one size is better.
    """
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
                if sx and sy and abs((sx[0] / sx[1]) / (sy[0] / sy[1]) - 1) > ASPECT_TOLERANCE:
                    mismatch[f"{mx} vs {my}: {sx[0]}x{sx[1]} vs {sy[0]}x{sy[1]}"] += 1
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
                    }
                )
    for what, n in sorted(mismatch.items()):
        log.warning(
            "%d pair(s) of %s (width x height): the images differ in aspect ratio, so voters could tell the "
            "models apart by shape. The voting app shows both in one box (eval.vote.display: letterbox or crop); "
            "generating both models at the same size avoids it.",
            n,
            what,
        )
    return PairsBuild(rows, skipped, mismatch)


def export_votes(store, folder: str) -> tuple[str, int]:
    """Write every vote to ``<folder>/export`` (one committed Parquet shard, replaced on
    each export) and return the table URL and the row count. Query it with DuckDB:
    ``SELECT * FROM read_parquet('<folder>/export/part-*.parquet')``."""
    from eval.schemas import VOTES

    table = Table(f"{folder.rstrip('/')}/export", schema=VOTES)
    rows = store.votes_rows()
    table.write_shard("votes", rows_to_table(rows, VOTES))
    return table.url, len(rows)
