"""Benchmark: the DPG-Bench judge step as `make eval` runs it vs the bare one-image loop.

    .venv/bin/python bench/dpg_judge.py [--prompts 8] [--models 3]                      # CPU, tiny VLM
    .venv/bin/python bench/dpg_judge.py --model /models/Qwen2.5-VL-7B-Instruct --device cuda --prompts 64

Same judge, same images (models x prompts x 4 seeds), same questions (the nine of our
sample prompt ``sample_0`` for every prompt, in the official file format):

- **stage**: ``eval.dpg_judge.judge_dpg``: one judge call per question over every
  model's images of the prompt (``--batch`` at most), answers committed as Parquet
  every 8 images, then the official and corrected scoring;
- **bare loop**: ``judge.caption([image], question)`` for every image and question,
  nothing written.

Prints a Markdown table for BENCHMARKS.md and writes bench_out/dpg_judge.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repo, also when not pip-installed


def build(tmp: Path, n_prompts: int, n_models: int, size: int) -> tuple[Path, Path]:
    """An eval_images table and a question file for it."""
    import numpy as np
    from PIL import Image

    from eval.schemas import EVAL_IMAGES
    from paradiffusion.storage import Table, rows_to_table

    sample = REPO / "eval" / "sample_prompts" / "dpg" / "dpg_bench_sample.csv"
    with open(sample, newline="") as f:
        template = [r for r in csv.DictReader(f) if r["item_id"] == "sample_0"]
    qfile = tmp / "questions.csv"
    with open(qfile, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(template[0]))
        w.writeheader()
        for p in range(n_prompts):
            w.writerows({**r, "item_id": f"p{p:04d}"} for r in template)
    root = tmp / "data" / "eval" / "images"
    rows, rng = [], np.random.default_rng(0)
    for m in range(n_models):
        for p in range(n_prompts):
            for s in range(4):
                rel = f"png/m{m}/dpg/p{p:04d}_s{s}.png"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / rel)
                rows.append(
                    {
                        "key": f"m{m}/dpg/p{p:04d}/{s}",
                        "model": f"m{m}",
                        "prompt_set": "dpg",
                        "prompt_id": f"p{p:04d}",
                        "seed": s,
                        "image_path": rel,
                        "prompt": template[0]["text"],
                    }
                )
    Table(str(root), schema=EVAL_IMAGES).write_shard("dpg", rows_to_table(rows, EVAL_IMAGES))
    return qfile, root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--model", default=None, help="a VLM folder or Hub id (default: the tiny random LLaVA)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--max-new-tokens", type=int, default=8)
    args = ap.parse_args()
    import torch
    import yaml

    from captioning.captioners import load_captioner
    from captioning.config import CaptionerSpec, GenerationSettings
    from eval.dpg_judge import judge_dpg
    from eval.metrics import _load_rgb
    from paradiffusion.stage import StageSummary
    from paradiffusion.storage import Table
    from pipelines.config import load_config

    if args.device == "cpu":
        torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = args.model
        if model is None:
            from paradiffusion.testing.tiny_vlm import build_tiny_vlm

            model = build_tiny_vlm(tmp / "tiny_vlm")
        qfile, root = build(tmp, args.prompts, args.models, args.size)
        spec = {"type": "transformers", "model": model, "dtype": args.dtype, "device": args.device}
        doc = {
            "project": {"data_root": str(tmp / "data")},
            "caption": {"captioner": "judge", "captioners": {"judge": spec}},
            "eval": {
                "prompt_sets": {"dpg": {"kind": "dpg_bench", "path": str(tmp)}},
                "metrics": {
                    "dpg": {
                        "questions": str(qfile),
                        "judge": "judge",
                        "batch_size": args.batch,
                        "max_new_tokens": args.max_new_tokens,
                    }
                },
            },
        }
        (tmp / "c.yaml").write_text(yaml.safe_dump(doc))
        cfg = load_config([str(tmp / "c.yaml")])
        judge = load_captioner(
            CaptionerSpec(**spec), GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=False)
        )
        images = Table(str(root))
        rows = images.read().to_pylist()
        n_answers = len(rows) * 9
        warm = [_load_rgb(root / rows[0]["image_path"])]
        judge.caption(warm * 2, "Is there a taxi? Answer yes or no.")  # warm-up
        t0 = time.perf_counter()
        run = judge_dpg(cfg, images, StageSummary("bench"), judge=judge)
        stage_s = time.perf_counter() - t0
        assert len(run.scores) == len(rows)
        from eval.dpg import load_dpg_questions

        qs = load_dpg_questions(qfile)
        t0 = time.perf_counter()
        for r in rows:
            im = _load_rgb(root / r["image_path"])
            for q in qs.items[r["prompt_id"]]:
                judge.caption([im], f"{q.question} Answer yes or no.")
        bare_s = time.perf_counter() - t0
    res = {
        "machine": f"{platform.machine()} {platform.system()}",
        "device": args.device,
        "model": args.model or "tiny random LLaVA (paradiffusion/testing/tiny_vlm.py)",
        "images": len(rows),
        "answers": n_answers,
        "batch": args.batch,
        "stage_s": stage_s,
        "bare_s": bare_s,
        "stage_answers_per_s": n_answers / stage_s,
        "bare_answers_per_s": n_answers / bare_s,
    }
    out = REPO / "bench_out" / "dpg_judge.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(
        f"{len(rows)} images ({args.models} models x {args.prompts} prompts x 4), 9 questions each = {n_answers} "
        f"answers; judge {res['model']} on {args.device}"
    )
    print("| path | time | answers/s |\n|---|---|---|")
    print(
        f"| stage (batched over the prompt's images, batch {args.batch}, commits + scoring) "
        f"| {stage_s:.1f} s | {res['stage_answers_per_s']:.1f} |"
    )
    print(f"| bare loop (one image per call, nothing written) | {bare_s:.1f} s | {res['bare_answers_per_s']:.1f} |")


if __name__ == "__main__":
    main()
