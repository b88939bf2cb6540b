"""GPU benchmark: one training step of stage 1 and stage 2 at the release's sizes, our trainer beside a plain loop.

The release's model with random weights (no download): the Llama-2-7B config as text
encoder feeding its 4096-d states straight into the UNet of ``training.config.DEFAULT_UNET``
(SD-style, SDXL-base layout, cross-attention 4096, no projection), bf16, images of 1024 wide
x 640 high (latents 128 x 80), batch 8, captions padded to the stage's max_length (256 in
stage 1, 512 in stage 2: release conditioning pads every caption to it). Two paths, in the
same process on the same GPU:

- ``plain``: the eager loop of ../shared/bench/gpu_baseline.py (bf16 parameters, torch
  AdamW, UNet gradient checkpointing; latents given, no VAE) at these sizes;
- ``ours``: :class:`training.trainer.Trainer`'s ``train_step`` / ``forward_backward_step``
  on the DeepSpeed engine built from pipelines.yaml settings (ZeRO-2, bf16, clipping),
  fed precomputed latents (the ``latents`` batch key, as with cached latents).

Model FLOPs (MFU numerator) exclude activation recompute: FlopCounterMode counts one
forward of the LLM and of the UNet per sample, F_llm and F_unet; a training step is
3 x F_unet (forward + backward) plus F_llm in stage 1 (LLM forward only) or 3 x F_llm in
stage 2 (gradients flow through the LLM to its LoRA; the same counting as
../shared/bench). Peak: 989 TFLOP/s dense bf16 (H100/H200 SXM). Peak memory is
``torch.cuda.max_memory_allocated`` over the timed steps.

Usage: python bench/train_gpu.py [--tiny] [--stages 1,2] [--batch 8] [--steps 5] [--size 1024x640]
       [--tokens 256,512]
``--tiny`` runs the same code on CPU with the tiny models (a check, not a figure).
Writes ``$OUT/train_gpu.json`` (or bench_out/) and prints one JSON line per result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

PEAK = 989e12


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--stages", default="1,2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--paths", default="plain,ours")
    ap.add_argument("--size", default="1024x640", help="image width x height (the release samples 1024x640)")
    ap.add_argument("--tokens", default="256,512", help="caption tokens in stage 1,2 (the stages' max_length)")
    return ap.parse_args()


A = parse()
DEV = torch.device("cuda" if torch.cuda.is_available() and not A.tiny else "cpu")
DT = torch.bfloat16 if DEV.type == "cuda" else torch.float32
OUT = Path(os.environ.get("OUT", "bench_out"))
RESULTS: dict = {"device": torch.cuda.get_device_name(0) if DEV.type == "cuda" else "cpu", "torch": torch.__version__}


def emit(name: str, **kw) -> None:
    RESULTS[name] = kw
    print(json.dumps({name: kw}), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "train_gpu.json").write_text(json.dumps(RESULTS, indent=1))


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def sizes(stage: int) -> dict:
    from paradiffusion.testing.tiny_diffusion import TINY_LLM, TINY_RELEASE_UNET
    from training.config import DEFAULT_UNET

    if A.tiny:
        return {"llm": dict(TINY_LLM, vocab_size=512), "unet": dict(TINY_RELEASE_UNET), "latent": (8, 12), "tokens": 32,
                "batch": 2}  # fmt: skip
    llm = {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
    }
    width, height = (int(v) for v in A.size.split("x"))
    tokens = [int(t) for t in A.tokens.split(",")][stage - 1]
    return {"llm": llm, "unet": dict(DEFAULT_UNET), "latent": (height // 8, width // 8), "tokens": tokens,
            "batch": A.batch}  # fmt: skip


def build(stage: int):
    """Random-weight LLM (+LoRA in stage 2) and the release's UNet (no projection) on the device."""
    from diffusers import UNet2DConditionModel
    from transformers import LlamaConfig, LlamaModel

    from training.modeling import ParaDiffusionModel, add_lora, check_text_path

    sz = sizes(stage)
    torch.manual_seed(0)
    with torch.device(DEV):
        llm = LlamaModel(LlamaConfig(**sz["llm"])).to(DT)
        unet = UNet2DConditionModel(**sz["unet"]).to(DT)
    check_text_path(sz["llm"]["hidden_size"], unet, None)
    llm.requires_grad_(False)
    if stage == 2:
        llm = add_lora(llm, 64, 64, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj"])
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    unet.enable_gradient_checkpointing()
    return ParaDiffusionModel(llm, None, unet, conditioning="release"), sz


def model_flops(model, sz) -> tuple[float, float]:
    """(F_llm, F_unet) of one forward per sample, no recompute."""
    b, n, (lh, lw) = 1, sz["tokens"], sz["latent"]
    ids = torch.randint(3, sz["llm"]["vocab_size"] - 1, (b, n), device=DEV)
    mask = torch.ones_like(ids)
    x = torch.randn(b, 4, lh, lw, device=DEV, dtype=DT)
    t = torch.tensor([500], device=DEV)
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            h = model.llm(input_ids=ids, attention_mask=mask).last_hidden_state
        f_llm = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            model.unet(x, t, encoder_hidden_states=model.projection(h))
        f_unet = fc.get_total_flops()
    return float(f_llm), float(f_unet)


def batch_tensors(sz):
    b = sz["batch"]
    ids = torch.randint(3, sz["llm"]["vocab_size"] - 1, (b, sz["tokens"]), device=DEV)
    lat = torch.randn(b, 4, *sz["latent"], device=DEV, dtype=torch.float32)
    return ids, lat


def plain_step_fn(model, sz, stage):
    """The shared baseline's eager loop."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids, lat = batch_tensors(sz)
    tt = torch.randint(0, 1000, (sz["batch"],), device=DEV)

    def step():
        with torch.enable_grad() if stage == 2 else torch.no_grad():
            h = model.llm(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        noise = torch.randn_like(lat)
        pred = model.unet((lat + noise).to(DT), tt, encoder_hidden_states=model.projection(h)).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def ours_step_fn(model, sz, stage):
    """Trainer.train_step on the DeepSpeed engine, with an in-memory model and latent batches."""
    import deepspeed
    from diffusers import DDPMScheduler

    from pipelines.config import PipelinesConfig
    from training.trainer import Trainer, deepspeed_config, init_distributed

    class BenchTrainer(Trainer):
        def setup(self) -> None:  # the real setup minus loading from disk
            self.rank, self.world_size, _ = init_distributed()
            self.device, self.dtype = DEV, DT
            self.ds_config = deepspeed_config(self.tcfg, self.scfg, DEV.type == "cuda")
            self.noise_scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)

            class Tok:  # fixed-length token ids: the text is not what is measured
                def __call__(self, captions, **kw):
                    ids = torch.randint(3, sz["llm"]["vocab_size"] - 1, (len(captions), sz["tokens"]))
                    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

            self.tokenizer = Tok()
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-5, fused=DEV.type == "cuda")
            self.engine, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
                model=model,
                optimizer=opt,
                lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                config=self.ds_config,
            )
            self.model = self.engine.module
            self.ema = None

    cfg = PipelinesConfig.model_validate(
        {
            "train": {
                "model": {"unet_config": sz["unet"], "text_projection": "none", "conditioning": "release"},
                f"stage{stage}": {
                    "micro_batch_size": sz["batch"],
                    "max_length": sz["tokens"],
                    "min_snr_gamma": 5.0,
                    "caption_dropout": 0.1,
                    "ema": {"enabled": False},
                },
            }
        }
    )
    tr = BenchTrainer(cfg, stage)
    tr.setup()
    _, lat = batch_tensors(sz)
    batches = iter(lambda: {"latents": lat, "captions": ["x"] * sz["batch"], "keys": ["k"] * sz["batch"]}, None)

    def step():
        tr.train_step(batches)
        tr.step += 1

    return step


def measure(name: str, stage: int, path: str) -> None:
    model, sz = build(stage)
    f_llm, f_unet = model_flops(model, sz)
    per_sample = 3 * f_unet + (f_llm if stage == 1 else 3 * f_llm)
    step = (plain_step_fn if path == "plain" else ours_step_fn)(model, sz, stage)
    for _ in range(A.warmup):
        step()
    sync()
    if DEV.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(A.steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / A.steps
    sps = sz["batch"] / dt
    emit(
        name,
        samples_per_s=round(sps, 2),
        s_per_step=round(dt, 3),
        batch=sz["batch"],
        image_wxh=f"{sz['latent'][1] * 8}x{sz['latent'][0] * 8}",
        tokens=sz["tokens"],
        unet_params_M=round(sum(p.numel() for p in model.unet.parameters()) / 1e6),
        model_gflop_per_sample=round(per_sample / 1e9, 3),
        mfu=round(per_sample * sps / PEAK, 3),
        peak_mem_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 1) if DEV.type == "cuda" else None,
    )
    del model, step
    if DEV.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    if A.tiny:
        torch.set_num_threads(1)
    for stage in [int(s) for s in A.stages.split(",")]:
        for path in A.paths.split(","):
            try:
                measure(f"stage{stage}_{path}", stage, path)
            except Exception as exc:  # noqa: BLE001 - report and go on with the next part
                emit(f"stage{stage}_{path}_error", error=repr(exc)[:800])
    print(json.dumps(RESULTS))


if __name__ == "__main__":
    main()
