"""Benchmark: `paradiffusion publish` vs a plain pyarrow rewrite of the same columns into the same shard sizes.

Generates ``--rows`` synthetic caption rows and their scores (as bench/stats_duckdb.py makes them), then
runs, each in a child process of its own (so its peak RSS is its own), side by side in one run:

- ``publish``: ``run_publish`` with ``subsets: [big]`` (the joins, the selected caption, every caption
  with its source, the card with its statistics and plots, Croissant, the version switch);
- ``plain``: pyarrow reads the published rows back and rewrites the same columns into shards of the
  same size (zstd): the floor of writing this folder, without any of the work above;
- then ``paradiffusion stats`` (timed apart, not in either side) and both sides again: ``publish after
  stats`` is the usual order of work (the card's Table 1 / histogram / funnel then come from the stats
  stage's partial aggregates instead of queries over every row).

Usage::

    .venv/bin/python bench/publish.py --rows 200000 1000000   # the recorded run: both sizes, one run
    .venv/bin/python bench/publish.py --rows 20000            # a quick check

Peak RSS: each child's own (``os.wait4``'s ``ru_maxrss``). The load average is printed before and
after each size: the machine is shared, so compare the two sides of one size, not runs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
# this file is named like the `publish` package: keep its folder off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]


def child(mode: str, root: Path, shard_rows: int) -> None:
    if mode == "stats":
        from pipelines.config import load_config
        from stats.run import run_stats

        run_stats(load_config([], [f"project.data_root={root}"]), quiet=True)
    elif mode == "publish":
        from pipelines.config import load_config
        from publish.run import run_publish

        cfg = load_config(
            [], [f"project.data_root={root}", "publish.subsets=[big]", f"publish.shard_rows={shard_rows}"]
        )
        run_publish(cfg)
        card = (root / "paraimage" / "README.md").read_text()
        if "Table 1" not in card or "assets/funnel-" not in card:  # a card without its statistics is not the work
            raise SystemExit("publish wrote a card without its statistics (see the warning above)")
    else:
        import pyarrow.parquet as pq

        files = sorted((root / "paraimage" / "data" / "big").glob("*.parquet"))
        out = root / "plain"
        out.mkdir(exist_ok=True)
        i = 0
        for f in files:  # one shard at a time: bounded memory, as publish
            t = pq.read_table(f)
            for start in range(0, t.num_rows, shard_rows):
                pq.write_table(t.slice(start, shard_rows), out / f"train-{i:05d}.parquet", compression="zstd")
                i += 1


def run_child(mode: str, root: Path, shard_rows: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    p = subprocess.Popen(
        [sys.executable, __file__, "--child", mode, "--root", str(root), "--shard-rows", str(shard_rows)],
        stdout=subprocess.DEVNULL,
    )
    _, status, usage = os.wait4(p.pid, 0)
    secs = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"{mode} failed (status {status})")
    return secs, usage.ru_maxrss / 1024  # MiB (Linux reports KiB)


def one_size(rows: int, shard_rows: int, generate) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        generate(root, rows, 50_000)
        print(f"generated {rows:,} caption rows in {time.perf_counter() - t0:.1f} s", flush=True)
        load0 = os.getloadavg()[0]
        pub_s, pub_rss = run_child("publish", root, shard_rows)
        plain_s, plain_rss = run_child("plain", root, shard_rows)
        stats_s, _ = run_child("stats", root, shard_rows)  # `make stats`: the card then reads its cache
        warm_s, warm_rss = run_child("publish", root, shard_rows)
        plain2_s, plain2_rss = run_child("plain", root, shard_rows)
        load1 = os.getloadavg()[0]
        import pyarrow.parquet as pq

        published = sum(pq.read_metadata(f).num_rows for f in (root / "paraimage" / "data" / "big").glob("*.parquet"))
    return {
        "rows": rows,
        "published": published,
        "publish": (pub_s, pub_rss),
        "plain": (plain_s, plain_rss),
        "stats": stats_s,
        "publish after stats": (warm_s, warm_rss),
        "plain again": (plain2_s, plain2_rss),
        "load": (load0, load1),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[200_000, 1_000_000])
    ap.add_argument("--shard-rows", type=int, default=50_000)
    ap.add_argument("--child")
    ap.add_argument("--root")
    a = ap.parse_args()
    if a.child:
        child(a.child, Path(a.root), a.shard_rows)
        return 0
    import importlib.util

    spec = importlib.util.spec_from_file_location("stats_duckdb", _BENCH / "stats_duckdb.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    results = [one_size(n, a.shard_rows, mod.generate) for n in a.rows]
    print(f"\nmachine: 2-core shared CPU; shard_rows {a.shard_rows:,}; each side in a child process of its own")
    print(
        f"{'caption rows':>12} {'published':>10} {'side':>8} {'seconds':>8} {'peak RSS MiB':>13} {'ratio':>6} {'load':>11}"
    )
    for r in results:
        (ps, pr), (qs, qr) = r["publish"], r["plain"]
        load = f"{r['load'][0]:.1f}->{r['load'][1]:.1f}"
        print(f"{r['rows']:>12,} {r['published']:>10,} {'publish':>8} {ps:8.1f} {pr:13.0f} {ps / qs:5.2f}x {load:>11}")
        print(f"{'':>12} {'':>10} {'plain':>8} {qs:8.1f} {qr:13.0f}")
        (ws, wr), (q2s, q2r) = r["publish after stats"], r["plain again"]
        print(
            f"{'':>12} {'':>10} {'publish after stats':>8} {ws:8.1f} {wr:13.0f} {ws / q2s:5.2f}x  (stats {r['stats']:.1f} s)"
        )
        print(f"{'':>12} {'':>10} {'plain':>8} {q2s:8.1f} {q2r:13.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
