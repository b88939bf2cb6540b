"""Benchmark: FID streamed in batches vs decoding the whole set first, side by side.

    .venv/bin/python bench/fid_stream.py [--images 1000] [--size 512] [--batch 32] [--model tiny|ViT-B-32]

Both paths compute the same number (checked) with the same feature extractor (a tiny
CLIP by default, or open_clip's real ViT-B-32 architecture with random weights). The
*in-memory* path is how eval computed FID before: decode every image of the set, then
extract features batch by batch, then ``np.cov``. The *streamed* path is
``eval.metrics.stream_stats``: decode one batch, extract, merge its statistics. Peak
memory is measured in a fresh process per path (``ru_maxrss``), so the numbers are
not mixed. The reference statistics are then read from the cache (``reference_stats``).
Prints a Markdown table for BENCHMARKS.md and writes bench_out/fid_stream.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repo, also when not pip-installed


def make_images(folder: Path, n: int, size: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    for i in range(n):  # cheap to make, realistic to decode: a noise image shifted per index
        Image.fromarray(np.roll(base, i * 7, axis=1)).save(folder / f"{i:05d}.png", compress_level=1)


def load_extractor(model: str, tmp: Path):
    import torch

    from curation.models import load_clip

    torch.set_num_threads(2)
    if model == "tiny":
        from paradiffusion.testing.tiny_clip import build_tiny_clip

        clip = load_clip(build_tiny_clip(tmp / "clip")["clip_model"], device="cpu")
    else:
        clip = load_clip(model, None, device="cpu")
    return clip.encode_pil


def run_one(mode: str, folder: Path, batch: int, model: str, tmp: Path) -> dict:
    """One path in this process: time, FID inputs, and the process's peak memory."""
    import numpy as np

    from eval.metrics import FeatureStats, _load_rgb, stream_stats

    extract = load_extractor(model, tmp)
    files = sorted(folder.glob("*.png"))
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if mode == "stream":
        stats = stream_stats(files, _load_rgb, extract, batch)
    else:  # the old way: every image decoded first
        ims = [_load_rgb(f) for f in files]
        feats = np.concatenate([extract(ims[i : i + batch]) for i in range(0, len(ims), batch)]).astype(np.float64)
        stats = FeatureStats()
        stats.n, stats.mean, stats.m2 = len(feats), feats.mean(0), np.cov(feats, rowvar=False) * (len(feats) - 1)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "mode": mode,
        "seconds": seconds,
        "images_per_s": len(files) / seconds,
        "peak_rss_mb": peak / 1024,
        "rss_growth_mb": (peak - base_rss) / 1024,
        "mean": stats.mean.tolist(),
        "cov_trace": float(np.trace(stats.m2 / (stats.n - 1))),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--model", default="tiny", help="tiny (offline tiny CLIP) or an open_clip name (random weights)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, Path(args.folder), args.batch, args.model, Path(args.tmp))))
        return
    import numpy as np

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        folder = tmp / "images"
        make_images(folder, args.images, args.size)
        results = {}
        for mode in ("in-memory", "stream"):
            cmd = [sys.executable, __file__, "--child", mode, "--folder", str(folder), "--tmp", str(tmp)]
            cmd += ["--batch", str(args.batch), "--model", args.model]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=3600)
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        same = np.allclose(results["stream"]["mean"], results["in-memory"]["mean"], rtol=1e-9) and np.isclose(
            results["stream"]["cov_trace"], results["in-memory"]["cov_trace"], rtol=1e-9
        )
        # the reference-set cache: the second call reads the statistics back
        from eval.metrics import reference_stats
        from paradiffusion.stage import StageSummary
        from paradiffusion.storage import Table

        extract = load_extractor(args.model, tmp)
        cache = Table(str(tmp / "metrics"))
        t0 = time.perf_counter()
        reference_stats(str(folder), extract, args.model, args.batch, cache, StageSummary("bench"))
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, cached = reference_stats(str(folder), extract, args.model, args.batch, cache, StageSummary("bench"))
        second = time.perf_counter() - t0
    raw_mb = args.images * args.size * args.size * 3 / 2**20
    doc = {
        "machine": f"{platform.machine()} {platform.system()}",
        "images": args.images,
        "size": args.size,
        "batch": args.batch,
        "model": args.model,
        "decoded_set_mb": raw_mb,
        "same_statistics": bool(same),
        "reference_first_s": first,
        "reference_cached_s": second,
        "cached": cached,
        **{k: {kk: vv for kk, vv in v.items() if kk != "mean"} for k, v in results.items()},
    }
    out = REPO / "bench_out" / "fid_stream.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    print(
        f"{args.images} images of {args.size}x{args.size} px ({raw_mb:.0f} MB decoded), batch {args.batch}, "
        f"features: {args.model}; same statistics: {same}"
    )
    print("| path | time | images/s | peak RSS | RSS growth |\n|---|---|---|---|---|")
    for mode in ("in-memory", "stream"):
        r = results[mode]
        print(
            f"| {mode} | {r['seconds']:.1f} s | {r['images_per_s']:.0f} | {r['peak_rss_mb']:.0f} MB "
            f"| {r['rss_growth_mb']:.0f} MB |"
        )
    print(f"| reference statistics: computed / read from the cache | {first:.1f} s / {second * 1000:.0f} ms | | | |")


if __name__ == "__main__":
    main()
