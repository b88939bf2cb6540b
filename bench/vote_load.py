"""Benchmark: vote submission latency and throughput with 50 concurrent voters on loopback,
and CLIP-score metric throughput on CPU with a tiny CLIP beside the bare model call.

    .venv/bin/python bench/vote_load.py [--voters 50] [--pairs-per-voter 10] [--images 256]

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
    ``shapes="different"``: m2's images are portrait, so the server letterboxes each pair
    into one box (rendered on the first request, then served from its cache)."""
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
    store.add_pairs(build_pairs(Table(str(root), schema=EVAL_IMAGES).read())[0])
    tokens = [store.add_voter(f"v{i}") for i in range(n_voters)]
    with serve_in_thread(create_app(store, root)) as url:
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
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        votes = bench_votes(args.voters, args.pairs_per_voter, Path(d), "same")
        votes_letterbox = bench_votes(args.voters, args.pairs_per_voter, Path(d), "different")
        clip = bench_clip(args.images, Path(d))
    res = {
        "machine": f"{platform.machine()} {platform.system()}",
        "votes": votes,
        "votes_letterbox": votes_letterbox,
        "clip_score": clip,
    }
    out = Path(__file__).resolve().parents[1] / "bench_out" / "vote_load.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    c = clip
    print("| measure | same-size pairs | pairs letterboxed to one box |\n|---|---|---|")
    v, lb = votes, votes_letterbox
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
    print("\n| path | images/s |\n|---|---|")
    print(
        f"| CLIP score metric (chunked, {c['chunks_per_prompt']:.1f} chunks/prompt, PIL preprocessing) "
        f"| {c['metric_images_per_s']:.0f} images/s |"
    )
    print(f"| bare tiny CLIP call (preprocessed, one truncated text) | {c['bare_images_per_s']:.0f} images/s |")


if __name__ == "__main__":
    main()
