"""GPU check of ``generate.preset: release``: our image equals the release demo's for the same prompt.

What the CPU tests cannot show (tests/training/test_generate_release.py covers the rest): the
noise drawn by a CUDA generator in fp16, the fp16 UNet and VAE on the GPU. Two checks, one JSON
line each, written to ``$OUT/generate_release_gpu.json`` (or bench_out/):

- ``diffusers_loop``: on the tiny release-layout checkpoint (random weights, no download), our
  half-precision loop with a CUDA generator against diffusers' ``StableDiffusionPipeline`` (the
  parent of the release's ``StableDiffusionLlamaPipeline``) given the same text states, the same
  scheduler and a CUDA generator seeded 45: the final latents must be equal;
- ``release_image`` (with ``--model`` and ``--reference``): ``generate`` with the preset on the
  official weights (``--model``: a folder in the release's layout or weijiawu/ParaDiffusion) for
  ``--prompt``, compared with ``--reference``, a PNG the release's demo.py wrote for the same
  prompt (its defaults: 1024x640, 100 steps, guidance 7.5, seed 45): pixels equal, or the largest
  difference in 0-255 steps and the share of differing pixels.

Usage: python bench/generate_release_gpu.py [--model DIR --reference demo.png --prompt "..."]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

OUT = Path(os.environ.get("OUT", "bench_out"))
RESULTS: dict = {}


def emit(name: str, **kw) -> None:
    RESULTS[name] = kw
    print(json.dumps({name: kw}), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "generate_release_gpu.json").write_text(json.dumps(RESULTS, indent=1))


def diffusers_loop(device: torch.device) -> None:
    from diffusers import StableDiffusionPipeline

    from paradiffusion.testing.tiny_diffusion import build_tiny_release
    from training.pipeline import ParaDiffusionPipeline, release_scheduler

    root = build_tiny_release(tempfile.mkdtemp())
    pipe = ParaDiffusionPipeline.from_pretrained(root, torch_dtype=torch.float16, device=device)
    prompts = ["A red fox in the snow.", "A lighthouse at night."]
    cond, _, _ = pipe.encode([""] * 2 + prompts)
    ref_pipe = StableDiffusionPipeline(
        vae=pipe.vae, text_encoder=None, tokenizer=None, unet=pipe.unet,
        scheduler=release_scheduler(dict(pipe.scheduler.config)), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    ref_pipe.set_progress_bar_config(disable=True)
    kw = {"height": 64, "width": 104, "num_inference_steps": 10}
    ref = ref_pipe(prompt_embeds=cond[2:], negative_prompt_embeds=cond[:2], guidance_scale=7.5, output_type="latent",
                   generator=torch.Generator(device).manual_seed(45), **kw).images  # fmt: skip
    ours = pipe(prompts, generator=torch.Generator(device).manual_seed(45), latent_dtype=torch.float16,
                output_type="latent", **kw)  # fmt: skip
    emit("diffusers_loop", equal=bool(torch.equal(ours, ref)),
         max_abs_diff=float((ours.float() - ref.float()).abs().max()), dtype=str(ours.dtype), device=str(device))  # fmt: skip


def release_image(model: str, reference: str, prompt: str, steps: int) -> None:
    from PIL import Image

    from pipelines.config import PipelinesConfig
    from training.generate import generate

    ref = np.asarray(Image.open(reference).convert("RGB")).astype(np.int16)
    h, w = ref.shape[:2]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = PipelinesConfig.model_validate({"project": {"data_root": tmp}, "generate": {
            "preset": "release", "model": model, "width": w, "height": h, "num_inference_steps": steps}})  # fmt: skip
        t0 = time.perf_counter()
        (f,) = generate(cfg, [prompt])
        ours = np.asarray(Image.open(f).convert("RGB")).astype(np.int16)
        params = json.loads(Image.open(f).text["parameters"])
    d = np.abs(ours - ref)
    emit("release_image", equal=bool((d == 0).all()), max_abs_diff_0_255=int(d.max()),
         share_differing=round(float((d.max(axis=2) > 0).mean()), 6), size=f"{w}x{h}", seconds=round(time.perf_counter() - t0, 1),
         settings=params)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="the official weights (release layout) or weijiawu/ParaDiffusion")
    ap.add_argument("--reference", default=None, help="PNG written by the release's demo.py for --prompt")
    ap.add_argument("--prompt", default="A red fox sitting in fresh snow at dawn.")
    ap.add_argument("--steps", type=int, default=100)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (the CUDA generator is what this checks); the CPU parts are tested in "
                         "tests/training/test_generate_release.py")  # fmt: skip
    RESULTS["device"] = torch.cuda.get_device_name(0)
    diffusers_loop(torch.device("cuda"))
    if a.model and a.reference:
        release_image(a.model, a.reference, a.prompt, a.steps)
    print(json.dumps(RESULTS))


if __name__ == "__main__":
    main()
