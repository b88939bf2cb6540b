"""Pairs to vote on, from the ``eval_images`` table; votes out to Parquet."""

from __future__ import annotations

import itertools
from collections import Counter

import pyarrow as pa

from paradiffusion.storage import Table, rows_to_table


def build_pairs(
    images: pa.Table,
    comparisons: list[list[str]] | None = None,
    prompt_sets: list[str] | None = None,
    seeds_per_prompt: int = 1,
) -> tuple[list[dict], Counter]:
    """One pair per (prompt, seed, comparison) where both models have an image.

    ``comparisons`` None pairs every two models found (in name order). Seeds used are
    the lowest ``seeds_per_prompt`` that both models have. Returns the pairs and the
    reasons some candidates were skipped (counted, not dropped silently).
    """
    skipped: Counter = Counter()
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
    return rows, skipped


def export_votes(store, folder: str) -> tuple[str, int]:
    """Write every vote to ``<folder>/export`` (one committed Parquet shard, replaced on
    each export) and return the table URL and the row count. Query it with DuckDB:
    ``SELECT * FROM read_parquet('<folder>/export/part-*.parquet')``."""
    from eval.schemas import VOTES

    table = Table(f"{folder.rstrip('/')}/export", schema=VOTES)
    rows = store.votes_rows()
    table.write_shard("votes", rows_to_table(rows, VOTES))
    return table.url, len(rows)
