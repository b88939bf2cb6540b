"""CPU benchmark: batched captioning against one image at a time, same model, same run.

Builds a small random LLaVA (paradiffusion.testing.tiny_vlm) and a small random native
CogVLM (paradiffusion.testing.tiny_cogvlm, the real architecture; no download) and
captions the same images with each captioner (TransformersCaptioner, CogVLMCaptioner)
at batch 1 and at larger batches, every
caption forced to the same number of new tokens (``min_new_tokens = max_new_tokens``)
so each setting does the same work. Settings are interleaved over ``--repeats`` rounds
and the median is reported, because shared machines are noisy. The figure that
matters is the ratio, not the absolute speed of a model this small.

Usage: python bench/caption_cpu.py [--models llava,cogvlm] [--images 32] [--batches 1,8,32] [--new-tokens 32]
Writes caption_cpu.json into $OUT (default: bench_out/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--models", default="llava,cogvlm", help="comma list of llava, cogvlm")
    p.add_argument("--hidden", type=int, default=256, help="decoder width of the random models")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a = p.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from captioning.captioners import load_captioner
    from captioning.config import PAPER_PROMPT, CaptionerSpec, GenerationSettings
    from paradiffusion.testing.tiny_vlm import build_tiny_vlm

    if a.threads:
        torch.set_num_threads(a.threads)
    from paradiffusion.testing.tiny_cogvlm import build_tiny_cogvlm

    gen = GenerationSettings(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens)
    tmp = Path(tempfile.gettempdir())
    captioners, described = {}, {}
    for name in a.models.split(","):
        if name == "llava":
            model_dir = build_tiny_vlm(
                tmp / f"pd_bench_vlm_{a.hidden}_{a.layers}", hidden_size=a.hidden, layers=a.layers
            )
            captioners[name] = load_captioner(CaptionerSpec(model=model_dir, dtype="float32", device="cpu"), gen)
            described[name] = f"random LLaVA, decoder {a.hidden} wide x {a.layers} layers, CLIP tower 32 px"
        elif name == "cogvlm":
            model_dir = build_tiny_cogvlm(
                tmp / f"pd_bench_cogvlm_{a.hidden}_{a.layers}", "cogvlm", hidden_size=a.hidden, layers=a.layers
            )
            spec = CaptionerSpec(type="cogvlm", model=model_dir, dtype="float32", device="cpu")
            captioners[name] = load_captioner(spec, gen)
            described[name] = (
                f"random native CogVLM (visual experts), decoder {a.hidden} wide x {a.layers} layers, "
                "EVA2-CLIP tower 28 px (18 image tokens)"
            )
        else:
            raise SystemExit(f"--models: unknown {name!r}; one of llava, cogvlm")
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (rng.integers(200, 600), rng.integers(200, 600), 3), np.uint8))
        for _ in range(a.images)
    ]
    batches = [int(b) for b in a.batches.split(",")]

    def run(cap, bs: int) -> float:
        t0 = time.perf_counter()
        n = 0
        for i in range(0, len(images), bs):
            out = cap.caption(images[i : i + bs], PAPER_PROMPT)
            assert all(r.n_tokens == a.new_tokens for r in out), [r.n_tokens for r in out]
            n += len(out)
        return n / (time.perf_counter() - t0)

    for cap in captioners.values():
        run(cap, max(batches))  # warm-up
    rates: dict[str, dict[int, list[float]]] = {m: {b: [] for b in batches} for m in captioners}
    for _ in range(a.repeats):
        for m, cap in captioners.items():
            for b in batches:
                rates[m][b].append(run(cap, b))
                print(f"{m} batch {b}: {rates[m][b][-1]:.2f} captions/s", file=sys.stderr, flush=True)
    models = {}
    for m in captioners:
        med = {b: statistics.median(v) for b, v in rates[m].items()}
        models[m] = {
            "model": described[m],
            "captions_per_s": {str(b): round(v, 2) for b, v in med.items()},
            "all_rounds": {str(b): [round(x, 2) for x in v] for b, v in rates[m].items()},
            "speedup_vs_batch_1": {str(b): round(v / med[batches[0]], 2) for b, v in med.items()},
        }
    result = {
        "benchmark": "caption_cpu",
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "images": a.images,
        "new_tokens": a.new_tokens,
        "repeats": a.repeats,
        "models": models,
    }
    out = Path(os.environ.get("OUT") or "bench_out") / "caption_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
