"""Benchmark: vote submission latency and throughput with 50 concurrent voters on loopback,
what re-encoding a served image costs (first request vs cached vs the raw file), and
CLIP-score metric throughput on CPU with a tiny CLIP beside the bare model call.

    .venv/bin/python bench/vote_load.py [--voters 50] [--pairs-per-voter 10] [--images 256]
                                        [--render-images 30] [--only votes|render|clip]

Everything runs on 127.0.0.1 with bounded counts (voters x pairs x 2 answers) and a
time limit per request. Prints a Markdown table for BENCHMARKS.md and writes JSON
to bench_out/vote_load.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, also when not pip-installed


def bench_votes(n_voters: int, pairs_per_voter: int, tmp: Path, shapes: str = "same") -> dict:
    """50 voters through the HTTP API; each fetches both images of a pair before voting.
    Every image is served re-encoded at the study size (rendered on the first request,
    then served from its cache). ``shapes="different"``: m2's images are portrait, so the
    pairs need ``equalise="crop"`` and each image is centre-cropped to the study's aspect."""
    import pyarrow as pa
    from PIL import Image

    from eval.schemas import EVAL_IMAGES
    from eval.vote.app import create_app
    from eval.vote.db import VoteStore
    from eval.vote.pairs import build_pairs
    from eval.vote.server import serve_in_thread
    from eval.vote.simulate import run_voters
    from paradiffusion.storage import Table

    root = tmp / f"images-{shapes}"
    rows = []
    rng = np.random.default_rng(0)
    n_prompts = max(pairs_per_voter, 20)
    for m in ("m1", "m2"):
        for p in range(n_prompts):
            rel = f"png/{m}/p{p}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            h, w = (80, 48) if shapes == "different" and m == "m2" else (64, 64)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / rel)
            rows.append(
                {
                    "key": f"{m}/s/p{p}/0",
                    "model": m,
                    "prompt_set": "s",
                    "prompt_id": f"p{p}",
                    "category": "c",
                    "prompt": f"prompt {p}",
                    "seed": 0,
                    "image_path": rel,
                    "width": w,
                    "height": h,
                }
            )
    Table(str(root), schema=EVAL_IMAGES).write_shard("all", pa.Table.from_pylist(rows, schema=EVAL_IMAGES))
    store = VoteStore(tmp / f"votes-{shapes}.sqlite", quota=pairs_per_voter)
    equalise = "crop" if shapes == "different" else "none"
    store.add_pairs(build_pairs(Table(str(root), schema=EVAL_IMAGES).read(), size=(64, 64), equalise=equalise)[0])
    tokens = [store.add_voter(f"v{i}") for i in range(n_voters)]
    with serve_in_thread(create_app(store, root, size=(64, 64))) as url:
        t0 = time.perf_counter()
        runs = run_voters(url, tokens, timeout=30.0)
        wall = time.perf_counter() - t0
    lat = np.array([x for r in runs for x in r.latencies]) * 1000
    accepted = sum(r.accepted for r in runs)
    stored = store.progress()["votes"]
    return {
        "shapes": shapes,
        "voters": n_voters,
        "answers": int(len(lat)),
        "accepted": accepted,
        "stored": stored,
        "errors": sum(len(r.errors) for r in runs),
        "wall_s": wall,
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "max_ms": float(lat.max()),
        "votes_per_s": accepted / wall,
    }


def bench_images(n_images: int, tmp: Path, size: tuple[int, int] = (1024, 640)) -> dict:
    """What re-encoding every served image costs, per image of the study size (a
    1024x640 PNG as ParaDiffusion writes it): the first request (decode, crop/resize,
    JPEG encode, write-once publish), a later request (cache hit: read the source to
    hash it, read the cached file), and reading the raw file (what was served before
    for same-size pairs). Median of every image, side by side in one run."""
    from PIL import Image, ImageFilter

    from eval.vote.render_cache import RenderCache

    src = tmp / "render-src"
    src.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for i in range(n_images):
        small = Image.fromarray(rng.integers(0, 255, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8))
        im = small.resize(size, Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(2))
        p = src / f"im{i}.png"
        im.save(p)
        paths.append(p)
    cache = RenderCache(tmp / "render-cache", size)

    def timed(fn) -> list[float]:
        out = []
        for p in paths:
            t0 = time.perf_counter()
            fn(p)
            out.append((time.perf_counter() - t0) * 1000)
        return out

    raw = timed(lambda p: p.read_bytes())
    cold = timed(cache.get)
    warm = timed(cache.get)
    sizes = [len(cache.get(p)) / 1024 for p in paths]
    return {
        "images": n_images,
        "size": f"{size[0]}x{size[1]}",
        "raw_ms": float(np.median(raw)),
        "first_ms": float(np.median(cold)),
        "cached_ms": float(np.median(warm)),
        "png_kib": float(np.median([p.stat().st_size / 1024 for p in paths])),
        "jpeg_kib": float(np.median(sizes)),
    }


def bench_clip(n_images: int, tmp: Path) -> dict:
    import torch
    from PIL import Image

    from curation.models import load_clip
    from eval.metrics import ClipScorer
    from eval.prompts import load_paraprompts
    from paradiffusion.testing.tiny_clip import build_tiny_clip

    torch.set_num_threads(2)
    info = build_tiny_clip(tmp / "clip")
    clip = load_clip(info["clip_model"], device="cpu")
    repo = Path(__file__).resolve().parents[1]
    published = repo / "benchmarks" / "ParaPrompts_400.csv"  # make fetch-benchmarks; else our sample file
    source = published if published.is_file() else repo / "eval" / "sample_prompts" / "paraprompts_sample.csv"
    prompts = [p.text for p in load_paraprompts(source)[0]]
    prompts = (prompts * (n_images // len(prompts) + 1))[:n_images]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(n_images)]
    scorer = ClipScorer(clip, batch_size=64)
    bs = 32

    def metric() -> None:
        for i in range(0, n_images, bs):
            scorer.score(clip.encode_pil(images[i : i + bs]), prompts[i : i + bs])

    pixels = torch.stack([clip.preprocess(im) for im in images])
    tokens = clip.tokenizer(prompts)

    def bare() -> None:  # the model alone: preprocessed pixels, one truncated text per image
        with torch.inference_mode():
            for i in range(0, n_images, bs):
                a = clip.model.encode_image(pixels[i : i + bs])
                b = clip.model.encode_text(tokens[i : i + bs])
                (torch.nn.functional.normalize(a, dim=-1) * torch.nn.functional.normalize(b, dim=-1)).sum(-1)

    out = {}
    for name, fn in (("bare", bare), ("metric", metric)):
        fn()  # warm-up
        best = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            best.append(time.perf_counter() - t0)
        out[f"{name}_images_per_s"] = n_images / min(best)
    out["chunks_per_prompt"] = float(np.mean([len(scorer.chunks(p)) for p in prompts]))
    out["images"] = n_images
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--voters", type=int, default=50)
    ap.add_argument("--pairs-per-voter", type=int, default=10)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--render-images", type=int, default=30, help="1024x640 images for the render timing")
    ap.add_argument("--only", choices=["votes", "render", "clip"], help="run one part only")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        run = lambda part: args.only in (None, part)  # noqa: E731
        render = bench_images(args.render_images, Path(d)) if run("render") else None
        votes = bench_votes(args.voters, args.pairs_per_voter, Path(d), "same") if run("votes") else None
        votes_crop = bench_votes(args.voters, args.pairs_per_voter, Path(d), "different") if run("votes") else None
        clip = bench_clip(args.images, Path(d)) if run("clip") else None
    res = {
        "machine": f"{platform.machine()} {platform.system()}",
        "render": render,
        "votes": votes,
        "votes_crop": votes_crop,
        "clip_score": clip,
    }
    out = Path(__file__).resolve().parents[1] / "bench_out" / "vote_load.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    if render:
        r = render
        print(f"| serving one {r['size']} image (median of {r['images']}) | ms | ratio to the raw file |")
        print("|---|---|---|")
        for what, key in (
            ("raw file read (served before, same-size pairs)", "raw_ms"),
            ("first request: decode, resize, JPEG encode, publish", "first_ms"),
            ("later requests: source hash + cached JPEG", "cached_ms"),
        ):
            print(f"| {what} | {r[key]:.2f} | {r[key] / r['raw_ms']:.1f}x |")
        print(f"| bytes sent: PNG source / served JPEG (q90, 4:4:4) | {r['png_kib']:.0f} / {r['jpeg_kib']:.0f} KiB | |")
    if votes:
        v, lb = votes, votes_crop
        print("\n| measure | same-size pairs | two shapes, centre-cropped to one |\n|---|---|---|")
        print(
            f"| voters / answers (accepted = stored) | {v['voters']} / {v['answers']} ({v['accepted']} = {v['stored']}) "
            f"| {lb['voters']} / {lb['answers']} ({lb['accepted']} = {lb['stored']}) |"
        )
        print(
            f"| vote submission latency p50 / p95 / max | {v['p50_ms']:.1f} / {v['p95_ms']:.1f} / {v['max_ms']:.1f} ms "
            f"| {lb['p50_ms']:.1f} / {lb['p95_ms']:.1f} / {lb['max_ms']:.1f} ms |"
        )
        print(
            f"| throughput (answers, incl. the next pair and both images) | {v['votes_per_s']:.0f} votes/s "
            f"| {lb['votes_per_s']:.0f} votes/s |"
        )
    if clip:
        c = clip
        print("\n| path | images/s |\n|---|---|")
        print(
            f"| CLIP score metric (chunked, {c['chunks_per_prompt']:.1f} chunks/prompt, PIL preprocessing) "
            f"| {c['metric_images_per_s']:.0f} images/s |"
        )
        print(f"| bare tiny CLIP call (preprocessed, one truncated text) | {c['bare_images_per_s']:.0f} images/s |")


if __name__ == "__main__":
    main()
