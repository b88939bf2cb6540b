"""GPU benchmark: one training step of stage 1 and stage 2 at the release's sizes, our trainer beside a plain loop.

The release's model with random weights (no download): the Llama-2-7B config as text
encoder feeding its 4096-d states straight into the UNet of ``training.config.DEFAULT_UNET``
(SD-style, SDXL-base layout, cross-attention 4096, no projection), bf16, images of 1024 wide
x 640 high (latents 128 x 80), batch 8, captions padded to the stage's max_length (256 in
stage 1, 512 in stage 2: release conditioning pads every caption to it). Two paths, in the
same process on the same GPU (``--paths``):

- ``plain``: a plain eager PyTorch loop, the reference baseline (bf16 parameters, torch
  AdamW, UNet gradient checkpointing; latents given, no VAE) at these sizes;
- ``ours``: :class:`training.trainer.Trainer`'s ``train_step`` / ``forward_backward_step``
  on the DeepSpeed engine built from pipelines.yaml settings (ZeRO-2, bf16, clipping,
  fused AdamW), fed precomputed latents (the ``latents`` batch key, as with cached
  latents), the LLM run every step, the defaults (UNet gradient checkpointing on);
- ``ours_cache`` (stage 1; stage 3 is the same case): as ``ours`` with the text cache: the
  batch carries the LLM's states (``text_states``), the LLM is not built at all;
- ``ours_nogc``: as ``ours`` (or ``ours_cache`` in stage 1) with
  ``gradient_checkpointing.unet: false`` (an H200 has the memory);
- ``ours_compile``: as ``ours_nogc`` with ``compile.unet`` (and ``compile.llm`` in stage 2);
- ``ours_compile_gc``: as ``ours_compile`` with UNet gradient checkpointing on.

Each result also counts the host syncs of one step beside its speed: ``host_syncs_per_step``
(``torch.cuda.set_sync_debug_mode("warn")``: every synchronizing CUDA call, whoever makes it)
with ``sync_sources`` (file:line of each warning), and ``host_reads_per_step`` with their
sources as :class:`training.syncs.HostReads` sees them (the count the CPU test pins: reads of
host-side tensors such as torch AdamW's step counters are in it and are no wait on a GPU).
The LLM is built in ``--llm-dtype`` (float32: ``train.model.llm_dtype``'s default, what the
release samples with; bfloat16 to compare).

Model FLOPs (MFU numerator) exclude activation recompute: FlopCounterMode counts one
forward of the LLM and of the UNet per sample, F_llm and F_unet; a training step is
3 x F_unet (forward + backward) plus F_llm in stage 1 (LLM forward only) or 3 x F_llm in
stage 2 (gradients flow through the LLM to its LoRA; the same counting as
the baseline's). Peak: 989 TFLOP/s dense bf16 (H100/H200 SXM). Peak memory is
``torch.cuda.max_memory_allocated`` over the timed steps.

Usage: python bench/train_gpu.py [--tiny] [--stages 1,2] [--batch 8] [--steps 5] [--size 1024x640]
       [--tokens 256,512] [--paths plain,ours,ours_cache,ours_nogc,ours_compile] [--compile-backend inductor]
``--tiny`` runs the same code on CPU with the tiny models (a check, not a figure; compile with
the ``aot_eager`` backend there).
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
    ap.add_argument("--paths", default="plain,ours,ours_cache,ours_nogc,ours_compile")
    ap.add_argument(
        "--compile-backend", default=None, help="torch.compile backend (default inductor; --tiny aot_eager)"
    )
    ap.add_argument("--compile-mode", default="default")
    ap.add_argument("--one", default=None, help="stage:path: measure only this, in this process (what main() runs)")
    ap.add_argument("--size", default="1024x640", help="image width x height (the release samples 1024x640)")
    ap.add_argument("--tokens", default="256,512", help="caption tokens in stage 1,2 (the stages' max_length)")
    ap.add_argument("--llm-dtype", default="float32", choices=["float32", "bfloat16"], help="train.model.llm_dtype")
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


#: path -> (text cache, UNet gradient checkpointing, compile)
PATHS = {
    "ours": (False, True, False),
    "ours_cache": (True, True, False),
    "ours_nogc": (None, False, False),  # None: the cache in stage 1, the LLM in stage 2
    "ours_compile": (None, False, True),
    "ours_compile_gc": (None, True, True),
}


def build(stage: int, llm: bool = True, unet_gc: bool = True):
    """Random-weight LLM (+LoRA in stage 2; none with a text cache) and the release's UNet (no projection)."""
    from diffusers import UNet2DConditionModel
    from transformers import LlamaConfig, LlamaModel

    from training.modeling import ParaDiffusionModel, add_lora, check_text_path

    sz = sizes(stage)
    torch.manual_seed(0)
    with torch.device(DEV):
        text = LlamaModel(LlamaConfig(**sz["llm"])).to(getattr(torch, A.llm_dtype)) if llm else None
        unet = UNet2DConditionModel(**sz["unet"]).to(DT)
    check_text_path(sz["llm"]["hidden_size"], unet, None)
    if text is not None:
        text.requires_grad_(False)
        if stage == 2:
            text = add_lora(text, 64, 64, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj"])
            text.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if unet_gc:
        unet.enable_gradient_checkpointing()
    return ParaDiffusionModel(text, None, unet, conditioning="release"), sz


def model_flops(model, sz) -> tuple[float, float]:
    """(F_llm, F_unet) of one forward per sample, no recompute."""
    b, n, (lh, lw) = 1, sz["tokens"], sz["latent"]
    ids = torch.randint(3, sz["llm"]["vocab_size"] - 1, (b, n), device=DEV)
    mask = torch.ones_like(ids)
    x = torch.randn(b, 4, lh, lw, device=DEV, dtype=DT)
    t = torch.tensor([500], device=DEV)
    with torch.no_grad():
        if model.llm is None:  # text cache: the LLM is not run; its states have the LLM's width
            h, f_llm = torch.randn(b, n, sz["llm"]["hidden_size"], device=DEV, dtype=DT), 0
        else:
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


def ours_step_fn(model, sz, stage, cache: bool, compile_unet: bool):
    """Trainer.train_step on the DeepSpeed engine, with an in-memory model and latent (+ text state) batches."""
    import deepspeed
    import numpy as np
    from diffusers import DDPMScheduler

    from pipelines.config import PipelinesConfig
    from training.trainer import Trainer, deepspeed_config, init_distributed

    backend = A.compile_backend or ("aot_eager" if A.tiny else "inductor")
    if compile_unet:  # what build_model does for train.stageN.compile (in place: names unchanged)
        kw = {"mode": None if A.compile_mode == "default" else A.compile_mode, "backend": backend}
        model.unet.compile(**kw)
        if model.llm is not None and stage == 2:
            model.llm.compile(**kw)

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
            self.text_cache = None
            self.empty_text = (torch.randn(sz["tokens"], sz["llm"]["hidden_size"], dtype=DT), 1)
            self.llm_dtype = getattr(torch, A.llm_dtype)
            kept = self._frozen_llm_weights(model)  # as setup: the frozen LLM stays in llm_dtype
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-5, fused=DEV.type == "cuda")
            self.engine, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
                model=model,
                optimizer=opt,
                lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                config=self.ds_config,
            )
            self.model = self.engine.module
            self._restore_frozen_llm(kept)
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
    batch = {"latents": lat, "captions": ["x"] * sz["batch"], "keys": ["k"] * sz["batch"]}
    if cache:  # what the loader hands over from the text cache (pinned host memory, copied non_blocking)
        states = torch.randn(sz["batch"], sz["tokens"], sz["llm"]["hidden_size"], dtype=DT)
        batch.update(text_states=states.pin_memory() if DEV.type == "cuda" else states,
                     text_lengths=list(np.random.default_rng(0).integers(5, sz["tokens"], sz["batch"])))  # fmt: skip
    batches = iter(lambda: batch, None)

    def step():
        tr.train_step(batches)
        tr.step += 1

    return step


def host_syncs(step) -> tuple[int | None, dict, dict]:
    """Host syncs of one step: (count, {file:line: n}) from torch's sync debug mode (CUDA only; it
    warns on each synchronizing call), and the host reads training.syncs.HostReads counts, by source."""
    import warnings
    from collections import Counter

    from training.syncs import HostReads

    if DEV.type != "cuda":
        with HostReads() as reads:
            step()
        return None, {}, dict(reads.take())
    with warnings.catch_warnings(record=True) as seen, HostReads() as reads:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in seen if "synchroniz" in str(w.message)]
    where = Counter(f"{w.filename.split('site-packages/')[-1]}:{w.lineno}" for w in syncs)
    return len(syncs), dict(where), dict(reads.take())


def measure(name: str, stage: int, path: str) -> None:
    if path == "plain":
        cache, gc, comp = False, True, False
    else:
        cache, gc, comp = PATHS[path]
        cache = (stage == 1) if cache is None else cache
    if cache and stage == 2:
        emit(name, skipped="stage 2 trains the LLM's LoRA: no text cache")
        return
    model, sz = build(stage, llm=not cache, unet_gc=gc)
    f_llm, f_unet = model_flops(model, sz)
    per_sample = 3 * f_unet + (f_llm if stage == 1 else 3 * f_llm)  # f_llm is 0 with the cache: not run
    step = plain_step_fn(model, sz, stage) if path == "plain" else ours_step_fn(model, sz, stage, cache, comp)
    t_warm = time.perf_counter()
    for _ in range(A.warmup):
        step()
    sync()
    warm_s = time.perf_counter() - t_warm
    syncs, sync_sources, reads = host_syncs(step) if path != "plain" else (None, {}, {})
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
        text_cache=cache,
        unet_gradient_checkpointing=gc,
        compiled=comp,
        warmup_s=round(warm_s, 1),
        host_syncs_per_step=syncs,
        sync_sources=sync_sources,
        host_reads_per_step=sum(reads.values()) if path != "plain" else None,
        host_read_sources=reads,
        llm_dtype=A.llm_dtype if not cache else None,
        unet_params_M=round(sum(p.numel() for p in model.unet.parameters()) / 1e6),
        model_gflop_per_sample=round(per_sample / 1e9, 3),
        mfu=round(per_sample * sps / PEAK, 3),
        peak_mem_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 1) if DEV.type == "cuda" else None,
    )
    del model, step
    if DEV.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    """Each (stage, path) in its own process: GPU memory is clean for each, and a failure (say, a
    compile error) is reported without stopping the others."""
    import subprocess

    if A.tiny:
        torch.set_num_threads(1)
    if A.one:
        stage, path = A.one.split(":")
        try:
            measure(f"stage{stage}_{path}", int(stage), path)
        except Exception as exc:  # noqa: BLE001 - report and let the parent go on
            emit(f"stage{stage}_{path}_error", error=repr(exc)[:800])
        return
    for stage in [int(s) for s in A.stages.split(",")]:
        for path in A.paths.split(","):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--one", f"{stage}:{path}"]
            p = subprocess.run(cmd, capture_output=True, text=True)
            got = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
            if not got:
                got = [{f"stage{stage}_{path}_error": {"rc": p.returncode, "stderr": p.stderr[-800:]}}]
            for doc in got:
                for name, kw in doc.items():
                    emit(name, **kw)
    print(json.dumps(RESULTS))


if __name__ == "__main__":
    main()
