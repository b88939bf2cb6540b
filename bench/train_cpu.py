"""CPU benchmark: training steps/s of the real trainer, side by side in one run, small random models.

Two comparisons, each in interleaved rounds (the machine may be shared and noisy: best and median of
each side, and the median over rounds of the ratio measured within a round):

- ``cache``: stage 1 with the LLM run every step (frozen, on the fly) beside stage 1 trained from
  the text cache (``make cache-text``; the LLM is not loaded), at 64 and 128 caption tokens.
  The models are small; the LLM is sized so that its forward takes about the share of a step's
  time on this CPU that Llama-2-7B's takes beside the release's UNet on a GPU (roughly 7 % at 256
  tokens, 13 % at 512: printed as ``llm_forward_s_per_step`` beside the steps/s; its share of the
  model FLOPs, ``llm_flop_share``, is higher here because a CPU runs the UNet's convolutions and
  norms less efficiently than GEMMs);
- ``loader``: the same stage (text cache on, so the step is short) with images decoded in the
  training loop (``data.num_workers: 0``) beside 2 loader processes (a reader thread + decode
  in processes, batches prefetched), on photo-sized JPEGs (512-1024 px) cut to ~64 px buckets.

Usage: python bench/train_cpu.py [--parts cache,loader] [--steps 12] [--rounds 3] [--workdir bench_out/train_cpu]
Prints one JSON line; numbers go to BENCHMARKS.md with the machine they ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

#: The bench LLM: Llama layout, small (the tiny test LLM's forward is too cheap to show anything).
LLM = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
       "num_key_value_heads": 4, "max_position_embeddings": 1024}  # fmt: skip
#: An SD-style UNet reading the LLM's 256-d states directly (the release's shape, no projection).
UNET = {"sample_size": 16, "in_channels": 4, "out_channels": 4, "block_out_channels": [32, 64],
        "layers_per_block": 1, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 256,
        "attention_head_dim": 16, "norm_num_groups": 16}  # fmt: skip
RESOLUTION = 32  # pixels: latents of 16 x 16 through the tiny VAE (x2)


def build_models(root: Path) -> dict[str, str]:
    from diffusers import UNet2DConditionModel
    from transformers import LlamaConfig, LlamaModel

    from paradiffusion.testing.tiny_diffusion import build_llama_tokenizer, build_tiny_diffusion

    tiny = build_tiny_diffusion(root / "tiny")
    out = {"vae": tiny["vae"], "scheduler": tiny["scheduler"], "llm": str(root / "llm"), "unet": str(root / "unet")}
    stamp = root / "bench_models.json"
    doc = {"llm": LLM, "unet": UNET}
    if stamp.is_file() and json.loads(stamp.read_text()) == doc:
        return out
    torch.manual_seed(0)
    build_llama_tokenizer(root / "llm")
    vocab = json.loads((root / "llm" / "tokenizer.json").read_text())["model"]["vocab"]
    LlamaModel(LlamaConfig(**LLM, vocab_size=len(vocab) + 8)).save_pretrained(out["llm"])
    UNet2DConditionModel(**UNET).save_pretrained(out["unet"])
    stamp.write_text(json.dumps(doc))
    return out


def write_images(folder: Path, n: int, big: bool) -> None:
    """img2dataset-like shards; ``big``: photo-like JPEGs of 512-1024 px (decode matters), else 64 px."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from paradiffusion.testing.sample import synthetic_image

    if folder.is_dir() and len(list(folder.glob("*_stats.json"))):
        return
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    sizes = [(768, 512), (1024, 1024), (640, 640), (800, 1024)] if big else [(64, 64)]
    words = "red green small large old new wooden glass quiet busy bright dark".split()
    rows = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        buf = io.BytesIO()
        synthetic_image(rng, w, h).save(buf, "JPEG", quality=90)
        caption = " ".join(rng.choice(words, size=int(rng.integers(8, 30)))) + f" picture {i}"
        rows.append({"key": f"{i:09d}", "caption": caption, "jpg": buf.getvalue(), "status": "success",
                     "width": w, "height": h})  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), folder / "00000.parquet", row_group_size=100)
    (folder / "00000_stats.json").write_text("{}")


def config(models: dict, root: Path, images: Path, steps: int, tokens: int, workers: int, cache: str | None):
    from pipelines.config import PipelinesConfig

    stage = {
        "max_steps": steps, "micro_batch_size": 4, "max_length": tokens, "caption_dropout": 0.1,
        "data": {"images": str(images), "resolution": RESOLUTION, "bucket_step": 8, "shuffle_buffer": 64,
                 "num_workers": workers, "prefetch": 2, "text_cache": cache, "random_flip": True},
        "optim": {"lr": 1e-4, "warmup_steps": 0}, "ema": {"enabled": False},
        "checkpoint": {"every_steps": 10**6, "keep_last": 1},
        "logging": {"every_steps": steps, "validation_every_steps": 10**6},
    }  # fmt: skip
    return PipelinesConfig.model_validate(
        {
            "project": {"data_root": str(root), "seed": 0},
            "train": {"model": {k: models[k] for k in ("llm", "unet", "vae", "scheduler")}, "stage1": stage},
        }
    )


def steps_per_s(cfg, out: Path, warm: int = 2) -> tuple[float, float]:
    """(steps/s over the steps after ``warm``, setup seconds) of one run of the real trainer."""
    from training.trainer import Trainer

    class Timed(Trainer):
        stamps: list[float] = []

        def train_step(self, batches):
            m = super().train_step(batches)
            self.stamps.append(time.perf_counter())
            return m

    shutil.rmtree(out, ignore_errors=True)
    cfg.train.stage1.output = str(out)
    t = Timed(cfg, 1)
    t.stamps = []
    t0 = time.perf_counter()
    t.setup()
    setup = time.perf_counter() - t0
    t.train()
    s = t.stamps
    return (len(s) - 1 - warm) / (s[-1] - s[warm]), setup


def llm_seconds(models: dict, tokens: int, batch: int = 4, reps: int = 5) -> float:
    """Seconds of the LLM's forward over one micro-batch (what the text cache saves per step)."""
    from transformers import LlamaModel

    llm = LlamaModel.from_pretrained(models["llm"]).eval()
    ids = torch.randint(3, 300, (batch, tokens))
    with torch.no_grad():
        llm(input_ids=ids, attention_mask=torch.ones_like(ids))
        t0 = time.perf_counter()
        for _ in range(reps):
            llm(input_ids=ids, attention_mask=torch.ones_like(ids))
    return (time.perf_counter() - t0) / reps


def flop_share(models: dict, tokens: int, latent: int = RESOLUTION // 2) -> float:
    """The LLM forward's share of a stage-1 step's model FLOPs (3 x UNet + 1 x LLM, no recompute)."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaModel

    llm, unet = LlamaModel.from_pretrained(models["llm"]), UNet2DConditionModel.from_pretrained(models["unet"])
    ids = torch.randint(3, 300, (1, tokens))
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            h = llm(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        f_llm = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            unet(torch.randn(1, 4, latent, latent), torch.tensor([500]), encoder_hidden_states=h)
        f_unet = fc.get_total_flops()
    return f_llm / (f_llm + 3 * f_unet)


def summarise(runs: dict[str, list[float]], base: str, new: str) -> dict:
    """Best and median steps/s of each side, and the median over rounds of new / base measured in the
    same round (the fairest figure on a shared machine whose load drifts between rounds)."""
    ratios = sorted(n / b for b, n in zip(runs[base], runs[new], strict=True))
    return {
        **{f"{k}_steps_per_s_best": round(max(v), 3) for k, v in runs.items()},
        **{f"{k}_steps_per_s_median": round(statistics.median(v), 3) for k, v in runs.items()},
        "speedup_median_of_rounds": round(statistics.median(ratios), 3),
        "speedup_range": [round(ratios[0], 3), round(ratios[-1], 3)],
        "all_rounds": {k: [round(x, 3) for x in v] for k, v in runs.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="cache,loader")
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", default="64,128", help="caption tokens (max_length; release padding), one run each")
    ap.add_argument("--workdir", default="bench_out/train_cpu")
    a = ap.parse_args()
    torch.set_num_threads(1)  # one rank on one core; loader processes take the other
    from training.text_cache import cache_text

    root = Path(a.workdir).resolve()
    models = build_models(root / "models")
    out: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                 "torch_threads": 1, "steps": a.steps, "rounds": a.rounds, "micro_batch": 4,
                 "llm": LLM, "unet_blocks": UNET["block_out_channels"], "latents": RESOLUTION // 2}  # fmt: skip
    parts = a.parts.split(",")
    if "cache" in parts:
        images = root / "images_small"
        write_images(images, 64, big=False)
        for tokens in [int(t) for t in a.tokens.split(",")]:
            tc = str(root / f"text_cache_{tokens}")
            shutil.rmtree(tc, ignore_errors=True)
            t0 = time.perf_counter()
            s = cache_text(config(models, root, images, a.steps, tokens, 1, tc), 1)
            made = {"texts": s.n_out, "seconds": round(time.perf_counter() - t0, 2), "bytes": s.extra["bytes_written"]}
            runs = {"llm_each_step": [], "text_cache": []}
            setups = {"llm_each_step": [], "text_cache": []}
            for _ in range(a.rounds):
                for name, cache in (("llm_each_step", None), ("text_cache", tc)):
                    sps, setup = steps_per_s(config(models, root, images, a.steps, tokens, 1, cache), root / "run")
                    runs[name].append(sps)
                    setups[name].append(setup)
            out[f"cache_{tokens}_tokens"] = res = {
                "llm_flop_share": round(flop_share(models, tokens), 3),
                "llm_forward_s_per_step": round(llm_seconds(models, tokens), 4),
                **summarise(runs, "llm_each_step", "text_cache"),
                **{f"{k}_setup_s": round(min(v), 2) for k, v in setups.items()},
                "cache_text": made,
            }
            print(json.dumps({f"cache_{tokens}_tokens": res}), flush=True)
    if "loader" in parts:
        images = root / "images_big"
        write_images(images, 96, big=True)
        tokens = int(a.tokens.split(",")[0])
        tc = str(root / "text_cache_big")
        shutil.rmtree(tc, ignore_errors=True)
        cache_text(config(models, root, images, a.steps, tokens, 0, tc), 1)
        runs = {"decode_in_loop": [], "loader_2_processes": []}
        for _ in range(a.rounds):
            for name, workers in (("decode_in_loop", 0), ("loader_2_processes", 2)):
                sps, _ = steps_per_s(config(models, root, images, a.steps, tokens, workers, tc), root / "run")
                runs[name].append(sps)
        out["loader"] = summarise(runs, "decode_in_loop", "loader_2_processes")
        print(json.dumps({"loader": out["loader"]}), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
