"""The three-stage ParaDiffusion trainer on DeepSpeed.

Read it top to bottom: :meth:`Trainer.setup` builds the model, data, DeepSpeed engine
and EMA and resumes from the newest committed checkpoint; :meth:`Trainer.train` runs
:meth:`train_step` until ``max_steps``, logging, checkpointing and validating on the
way, then exports the model and prints the summary. A subclass can override three
hooks (torchtitan style): :meth:`batch_generator` (where batches come from),
:meth:`forward_backward_step` (the loss of one micro-batch and its backward) and
:meth:`train_step` (one optimiser step = ``gradient_accumulation`` micro-batches).

Randomness that decides the loss (VAE posterior sample, noise, timesteps, caption
dropout) comes from a generator seeded by ``(seed, rank, step, micro-batch)``, and the
data order from ``(seed, epoch, rank)``: a run resumed from a checkpoint therefore
computes exactly the losses of the uninterrupted run (bit-for-bit on CPU).

Checkpoint layout (``<output>/checkpoints/``)::

    step-00001000/state/...         DeepSpeed: trained parameters, optimizer, LR schedule (every rank's
                                    part); the frozen ones (the LLM's base weights) are left out
    step-00001000/ema-rank-<r>.pt   rank r's pieces of the fp32 EMA of every trained parameter
    step-00001000/rank-<r>.pt       data position and RNG states of rank r
    step-00001000/COMMITTED         written last (step, world size, frozen-weights fingerprint); a
                                    folder without it is ignored and removed
    .tmp-step-.../                  being written

A checkpoint is written under ``.tmp-step-*``, renamed, then committed by the marker,
so a killed process or a full disk never leaves a checkpoint that looks complete. The
EMA and the export come from DeepSpeed's fp32 master weights (training/ema.py), not from
the module's bf16 weights.

The trainer is split along its seams; this file holds setup, the step hooks, validation, the
loop and the export. Its bases: :class:`training.trainer_checkpoints.Checkpointing` (save,
load, mirror to a URL output) and :class:`training.trainer_reads.DeviceReads` (the pending
steps read from the device every few steps, and the stops on what they say). Helpers below
them: training/runtime.py (paths, process group, DeepSpeed config) and
training/checkpoints.py (checkpoint folders, RNG states).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from paradiffusion.config import ConfigError, RootConfig
from paradiffusion.log import get_logger
from paradiffusion.stage import StageSummary, announce, progress
from paradiffusion.storage import Table, join
from training.checkpoints import (  # noqa: F401 - re-exported: the trainer's checkpoint names
    COMMIT_MARKER,
    CheckpointDir,
    _load_trained_only,
    _rng_state,
    _set_rng_state,
    _truncate_metrics,
)
from training.config import StageConfig, TrainConfig
from training.runtime import (  # noqa: F401 - re-exported: callers import these from training.trainer
    _lr_lambda,
    deepspeed_config,
    fetch_init_from,
    init_distributed,
    stage_paths,
    staging_folder,
)
from training.trainer_checkpoints import Checkpointing
from training.trainer_reads import DeviceReads, TrainingDiverged  # noqa: F401 - TrainingDiverged re-exported

log = get_logger("training")
#: Why a row of the images table is not trained on (the data loader's counters).
SKIP_REASONS = tuple(
    f"skipped: {r}"
    for r in (
        "not downloaded",
        "not kept",
        "missing caption",
        "decode error",
        "no cached latent",
        "uneven split across ranks",
    )
)


def caption_dropout(seed: int, rank: int, step: int, micro: int, n: int, p: float) -> np.ndarray:
    """Which of a micro-batch's ``n`` captions become "" (a bool array), drawn on the host from
    ``(seed, rank, step, micro)``: choosing the captions never waits for the device."""
    rng = np.random.default_rng([seed, rank, step, micro, 1])
    return rng.random(n) < p


def _step_generator(seed: int, rank: int, step: int, micro: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence([seed, rank, step, micro]).generate_state(1)[0]))
    return g


# ---------------------------------------------------------------------------- trainer
class Trainer(Checkpointing, DeviceReads):
    """One training stage (1, 2 or 3) from ``pipelines.yaml``'s ``train:`` section."""

    def __init__(self, cfg: RootConfig, stage: int):
        if stage not in (1, 2, 3):
            raise ConfigError(f"--stage {stage}: one of 1, 2, 3")
        self.cfg, self.stage = cfg, stage
        self.tcfg: TrainConfig = cfg.train
        self.scfg: StageConfig = cfg.train.stage(stage)
        self.paths = stage_paths(cfg, stage)
        self.remote_output: str | None = self.paths["output_url"]  # a URL run folder: staged, mirrored
        self.step = 0
        self.history: list[tuple[int, float]] = []  # (step, loss) of this process's run
        self.keys_seen: list[str] = []  # the first keys this rank trained on (for checks; capped)
        self._samples = 0  # samples of all ranks trained in this run (summed when the device is read)
        self.summary = StageSummary(f"train-stage{stage}")

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        import deepspeed
        from diffusers import DDPMScheduler

        from training.data import BucketedImageData
        from training.modeling import build_model, load_vae, trainable_parameters

        stage = self.stage
        fetch_init_from(self.paths, stage)  # the previous stage's export, when it is on object storage
        if stage > 1 and self.paths["init_from"] and not Path(self.paths["init_from"], "unet").is_dir():
            raise ConfigError(
                f"train.stage{stage}.init_from = {self.paths['init_from']}: no export there (no unet/); run "
                f"`make train-stage{stage - 1}` first or point init_from at a stage-{stage - 1} export"
            )
        self.rank, self.world_size, local_rank = init_distributed()
        on_gpu = torch.cuda.is_available()
        self.device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
        if not on_gpu and self.tcfg.launch.cpu_threads:
            torch.set_num_threads(self.tcfg.launch.cpu_threads)
        self.ds_config = deepspeed_config(self.tcfg, self.scfg, on_gpu)
        self.dtype = torch.bfloat16 if self.ds_config["bf16"]["enabled"] else torch.float32
        # The LLM computes text states in train.model.llm_dtype, here, in cache-text and in generate (the
        # export records it): the UNet trains on the states it will sample with.
        self.llm_dtype = getattr(torch, self.tcfg.model.llm_dtype)
        mc = self.tcfg.model
        sc = self.scfg
        seed = self.cfg.project.seed
        random.seed(seed)  # fresh weights (projection, LoRA) are initialised from the global RNGs
        np.random.seed(seed)
        torch.manual_seed(seed)
        self.text_cache = None
        if sc.data.text_cache:  # the frozen LLM's states, cached: the LLM is not loaded
            from training.text_cache import TextCache, cache_key, check_cache

            self.text_cache = TextCache(sc.data.text_cache)
            check_cache(self.text_cache.settings, cache_key(self.cfg, stage, self.llm_dtype), sc.data.text_cache, stage)
        stage_for_model = sc.model_copy(update={"init_from": self.paths["init_from"]})
        model, self.tokenizer = build_model(
            self.tcfg,
            stage_for_model,
            dtype=self.dtype,
            text_hidden_size=self.text_cache.hidden_size if self.text_cache is not None else None,
            llm_dtype=self.llm_dtype,
        )
        frozen_llm = self._frozen_llm_weights(model)
        self.vae = load_vae(mc.vae, dtype=self.dtype).to(self.device)
        if mc.scheduler:
            sched = DDPMScheduler.from_pretrained(mc.scheduler)
        else:
            sched = DDPMScheduler(
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                num_train_timesteps=1000,
                clip_sample=False,
            )
        self.noise_scheduler = DDPMScheduler.from_config(sched.config, prediction_type=mc.prediction_type)
        if sc.data.latents:  # cached latents: made with this stage's buckets and this VAE, or stop
            from training.latents import check_latents, latent_settings

            check_latents(sc.data.latents, latent_settings(self.cfg, stage, self.vae), stage)
            if sc.data.random_crop or sc.data.random_flip:
                log.warning(
                    "train.stage%d.data.latents: the cache holds centre crops without flips; "
                    "data.random_crop / random_flip do not apply",
                    stage,
                )
        self.data = BucketedImageData(
            self.paths["images"],
            sc.micro_batch_size,
            sc.data.resolution,
            caption_source=sc.data.caption_source,
            captions_url=self.paths["captions"],
            caption_model_id=sc.data.caption_model_id,
            caption_prompt_id=sc.data.caption_prompt_id,
            scores_url=self.paths["scores"],
            bucket_step=sc.data.bucket_step,
            max_aspect_ratio=sc.data.max_aspect_ratio,
            random_crop=sc.data.random_crop,
            random_flip=sc.data.random_flip,
            shuffle_buffer=sc.data.shuffle_buffer,
            seed=self.cfg.project.seed,
            rank=self.rank,
            world_size=self.world_size,
            latents_url=sc.data.latents,
            num_workers=sc.data.num_workers,
            prefetch=sc.data.prefetch,
            text_cache=self.text_cache,
            pin_memory=on_gpu,
            format=sc.data.format,  # parquet | webdataset (training/data_wds.py)
            subset=sc.data.subset,
        )
        if self.text_cache is not None:  # every caption this rank trains with, and "" for caption dropout
            wanted = self.data.captions_in_use() | {""}
            missing = self.text_cache.missing(wanted)
            if missing:
                raise ConfigError(
                    f"train.stage{stage}.data.text_cache = {sc.data.text_cache}: {len(missing)} of the stage's "
                    f"{len(wanted)} captions are not in it (captions changed since it was made?), e.g. "
                    f"{missing[0][:80]!r}; run `make cache-text STAGE={stage}` again (it adds only the missing ones)"
                )
            states, n = self.text_cache.batch([""])
            self.empty_text = (states[0].to(self.device), n[0])  # kept on the device, in the cache's dtype
        params = trainable_parameters(model)
        opt = torch.optim.AdamW(
            params, lr=sc.optim.lr, betas=sc.optim.betas, eps=sc.optim.eps, weight_decay=sc.optim.weight_decay
        )
        sched_fn = _lr_lambda(sc.optim.warmup_steps, sc.max_steps, sc.optim.schedule)
        lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, sched_fn)
        self.engine, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=lr_sched, config=self.ds_config
        )
        self.model = self.engine.module
        self._restore_frozen_llm(frozen_llm)
        self.ema = None
        if sc.ema.enabled:  # fp32, from the master weights: training/ema.py
            from training.ema import ShardedEMA, master_fragments

            self.ema = ShardedEMA(
                master_fragments(self.engine),
                decay=sc.ema.decay,
                warmup=sc.ema.warmup,
                inv_gamma=sc.ema.inv_gamma,
                power=sc.ema.power,
                device=self.device if sc.ema.device == "accelerator" else torch.device("cpu"),
            )
        if self.text_cache is None:
            self.frozen = self._frozen_fingerprint()
        else:  # the LLM is not loaded: the cache recorded its fingerprint when it ran it
            self.frozen = self.text_cache.settings["llm_fingerprint"]
        self.ckpt = CheckpointDir(join(self.paths["output"], "checkpoints"))
        self.writer = None
        if self.rank == 0:
            Path(self.paths["output"]).mkdir(parents=True, exist_ok=True)
            Table(self.paths["output"]).save_config(self.cfg, f"train-stage{self.stage}")
            (Path(self.paths["output"]) / "deepspeed_config.json").write_text(json.dumps(self.ds_config, indent=1))
            removed = self.ckpt.clean_uncommitted()
            if removed:
                log.warning(
                    "removed %d uncommitted checkpoint folder(s): %s", len(removed), ", ".join(p.name for p in removed)
                )
            if self.remote_output is not None and sc.checkpoint.resume:
                self._fetch_remote_checkpoint()
        self._barrier()
        if sc.checkpoint.resume and self.ckpt.newest() is not None:
            self.load_checkpoint(self.ckpt.newest()[1])
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            # A killed run logged steps after its last checkpoint; they are run again now, so drop
            # them: metrics.jsonl keeps each step once, TensorBoard hides events from step+1 on.
            _truncate_metrics(Path(self.paths["output"]) / "metrics.jsonl", self.step)
            self.writer = SummaryWriter(join(self.paths["output"], "tensorboard"), purge_step=self.step + 1)

    def _frozen_llm_weights(self, model) -> dict[str, torch.Tensor]:
        """The frozen LLM weights (held, not copied) when DeepSpeed would cast them to bf16: its bf16 engine
        casts every parameter of the module, so they are put back after it (:meth:`_restore_frozen_llm`)."""
        if model.llm is None or self.dtype == self.llm_dtype:
            return {}
        if self.tcfg.deepspeed.zero_stage == 3:
            raise ConfigError(
                f"train.model.llm_dtype: {self.tcfg.model.llm_dtype} with bf16 training and "
                "train.deepspeed.zero_stage: 3 (ZeRO-3 partitions the LLM in the training dtype); set llm_dtype: "
                f"bfloat16 (the export records it and generate samples with it), zero_stage: 2, or a text cache "
                f"(train.stage{self.stage}.data.text_cache) so the LLM is not loaded"
            )
        return {n: p.data for n, p in model.llm.named_parameters() if not p.requires_grad}

    def _restore_frozen_llm(self, kept: dict[str, torch.Tensor]) -> None:
        for n, p in self.model.llm.named_parameters() if kept else ():
            if n in kept:
                p.data = kept[n].to(self.device)

    def _frozen_fingerprint(self) -> dict:
        """Count, sum and sum of squares of the frozen parameters (all ranks): checkpoints leave
        them out, so a resume checks it runs with the weights the checkpoint was trained with."""
        import deepspeed.comm as dist

        t = torch.zeros(3, dtype=torch.float64, device=self.device)
        n = 0
        for p in self.model.parameters():
            if p.requires_grad:
                continue
            local = p.ds_tensor if hasattr(p, "ds_tensor") else p.data  # ZeRO-3: this rank's piece (zero-padded)
            n += p.ds_numel if hasattr(p, "ds_numel") else p.numel()
            t[0] += local.detach().sum(dtype=torch.float64)
            t[1] += torch.linalg.vector_norm(local.detach(), dtype=torch.float64).square()
        if self.world_size > 1 and self.tcfg.deepspeed.zero_stage == 3:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return {"params": n, "sum": float(t[0]), "sum_sq": float(t[1])}

    def _barrier(self) -> None:
        import deepspeed.comm as dist

        if self.world_size > 1:
            dist.barrier()

    # ------------------------------------------------------------------ hooks
    def batch_generator(self) -> Iterator[dict]:
        """Batches for this rank, forever; resumes where :attr:`data`'s position says."""
        return iter(self.data)

    def forward_backward_step(self, batch: dict, generator: torch.Generator, dropped: np.ndarray) -> torch.Tensor:
        """Loss of one micro-batch (DDPM, epsilon or v target, optional min-SNR) and its backward.

        ``dropped`` (a host bool array) says which captions become "" (caption dropout). Nothing
        here reads a value back from the device: the loss is returned as a device tensor."""
        from diffusers.training_utils import compute_snr

        from training.data import to_model_range

        sc, dev = self.scfg, self.device
        if "latents" in batch:  # precomputed (already scaled) VAE latents: no VAE in the step
            latents = batch["latents"].to(dev, torch.float32, non_blocking=True)
        elif "latent_moments" in batch:  # cached VAE posterior (mean, logvar): sample it, no VAE in the step
            from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

            dist = DiagonalGaussianDistribution(batch["latent_moments"].to(dev, torch.float32, non_blocking=True))
            latents = dist.sample(generator=generator) * self.vae.config.scaling_factor
        else:
            pixels = to_model_range(batch["pixel_values"].to(dev, non_blocking=True), self.dtype)
            with torch.no_grad():
                latents = self.vae.encode(pixels).latent_dist.sample(generator=generator)
                latents = latents.float() * self.vae.config.scaling_factor
        b = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator, device=dev)
        if sc.noise_offset:
            noise = noise + sc.noise_offset * torch.randn((b, latents.shape[1], 1, 1), generator=generator, device=dev)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=generator, device=dev)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        if self.noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        text = self._text_inputs(batch, dropped)
        pred = self.engine(noisy.to(self.dtype), t, **text)
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if sc.min_snr_gamma is not None:
            snr = compute_snr(self.noise_scheduler, t)
            weight = snr.clamp(max=sc.min_snr_gamma)
            weight = weight / snr if self.noise_scheduler.config.prediction_type == "epsilon" else weight / (snr + 1)
            loss = loss * weight
        loss = loss.mean()
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()

    def _text_inputs(self, batch: dict, dropped: np.ndarray) -> dict:
        """The model's text arguments: token ids + mask (the LLM runs), or cached states + mask."""
        from training.modeling import tokenize

        dev = self.device
        if "text_states" in batch:
            from training.text_cache import condition_from_cache

            states, mask = condition_from_cache(
                batch["text_states"].to(dev, non_blocking=True),
                batch["text_lengths"],
                dropped,
                self.empty_text,
                self.tcfg.model.conditioning,
            )
            return {"encoder_hidden_states": states, "attention_mask": mask.to(dev, non_blocking=True)}
        from training.modeling import llm_attention_mask

        captions = ["" if d else c for c, d in zip(batch["captions"], dropped.tolist(), strict=True)]
        ids, mask = tokenize(self.tokenizer, captions, self.scfg.max_length, self.tcfg.model.conditioning)
        llm_mask = llm_attention_mask(self.model.llm, mask)  # on the host: the LLM reads no mask on the device
        return {"input_ids": ids.to(dev, non_blocking=True), "attention_mask": mask.to(dev, non_blocking=True),
                "llm_mask": llm_mask.to(dev, non_blocking=True) if llm_mask is not None else None}  # fmt: skip

    def train_step(self, batches: Iterator[dict]) -> dict:
        """One optimiser step: ``gradient_accumulation`` micro-batches through forward/backward.

        Returns device tensors, read nowhere here: ``loss`` (this rank's mean over the
        micro-batches), ``nonfinite`` (true when a micro-batch's loss was NaN or infinite),
        ``grad_norm`` (DeepSpeed's, or None); and host values: ``lr`` (the one the step used),
        ``skipped`` (DeepSpeed skipped the optimizer step), ``rank_samples``, ``keys``. :meth:`_flush` reads the device values every few steps."""
        lr = float(self.engine.get_lr()[0])  # a host number: read before the step, the scheduler moves in step()
        skipped_before = self.engine.skipped_steps  # a host counter DeepSpeed keeps (its overflow check)
        losses, keys = [], []
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        for micro in range(self.scfg.gradient_accumulation):
            batch = next(batches)
            g = _step_generator(self.cfg.project.seed, self.rank, self.step, micro, self.device)
            dropped = caption_dropout(self.cfg.project.seed, self.rank, self.step, micro, len(batch["keys"]),
                                      self.scfg.caption_dropout)  # fmt: skip
            loss = self.forward_backward_step(batch, g, dropped)
            nonfinite = nonfinite | ~torch.isfinite(loss)
            losses.append(loss)
            keys += batch["keys"]
        if self.ema is not None:
            from training.ema import master_fragments

            self.ema.update(master_fragments(self.engine))
        norm = self.engine.get_global_grad_norm()
        return {
            "loss": torch.stack(losses).mean().float(),
            "nonfinite": nonfinite,
            "grad_norm": norm,
            # DeepSpeed skipped this optimizer step (non-finite gradients): the weights did not move
            "skipped": self.engine.skipped_steps > skipped_before,
            "lr": lr,
            "rank_samples": len(keys),
            "keys": keys,
        }

    # ------------------------------------------------------------------ logging and validation
    def log_metrics(self, m: dict, samples_per_s: float) -> None:
        if self.writer is None:
            return
        for k in ("loss", "lr", "grad_norm"):
            self.writer.add_scalar(f"train/{k}", m[k], self.step)
        self.writer.add_scalar("train/samples_per_s", samples_per_s, self.step)
        self.writer.add_scalar("train/skipped_steps", m["skipped_steps"], self.step)
        row = {
            "step": self.step,
            **{k: m[k] for k in ("loss", "lr", "grad_norm", "samples", "skipped", "skipped_steps")},
            "samples_per_s": samples_per_s,
        }
        with open(Path(self.paths["output"]) / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def validate(self) -> None:
        """Images for the fixed validation prompts, to TensorBoard (rank 0; all ranks run for ZeRO-3)."""
        from training.pipeline import ParaDiffusionPipeline, release_scheduler

        lc = self.scfg.logging
        text_states = None
        if self.text_cache is not None:  # the LLM is not loaded: the prompts' states come from the cache
            missing = self.text_cache.missing(lc.validation_prompts)
            if missing:
                log.warning(
                    "validation images skipped: %d validation prompt(s) are not in the text cache (changed since "
                    "`make cache-text STAGE=%d`?), e.g. %r",
                    len(missing),
                    self.stage,
                    missing[0][:60],
                )
                return
            cache, conditioning = self.text_cache, self.tcfg.model.conditioning

            def text_states(prompts: list[str]):
                from training.text_cache import condition_from_cache

                states, lengths = cache.batch(prompts)
                none = np.zeros(len(prompts), dtype=bool)
                return condition_from_cache(states, lengths, none, (states[0], lengths[0]), conditioning)

        pipe = ParaDiffusionPipeline(
            tokenizer=self.tokenizer,
            llm=self.model.llm,
            text_states=text_states,
            projection=self.model.projection,
            unet=self.model.unet,
            vae=self.vae,
            scheduler=release_scheduler(dict(self.noise_scheduler.config)),
            max_length=self.scfg.max_length,
            conditioning=self.tcfg.model.conditioning,
            device=self.device,
            dtype=self.dtype,
        )
        g = torch.Generator(device=self.device).manual_seed(self.cfg.project.seed)
        was_training = self.model.training
        self.model.eval()
        images = pipe(
            lc.validation_prompts,
            height=lc.validation_size[0],
            width=lc.validation_size[1],
            num_inference_steps=lc.validation_steps,
            guidance_scale=lc.guidance_scale,
            generator=g,
        )
        self.model.train(was_training)
        if self.writer is not None:
            arr = np.stack([np.asarray(im) for im in images])
            self.writer.add_images("validation", arr, self.step, dataformats="NHWC")

    # ------------------------------------------------------------------ the loop
    def train(self) -> StageSummary:
        """Set up, run to ``max_steps`` (resuming), export, summarise. Returns the summary."""
        sc = self.scfg
        if not hasattr(self, "engine"):
            self.setup()
        if self.rank == 0:
            announce(
                f"train-stage{self.stage}",
                {
                    "images": self.paths["images"],
                    "captions": f"{sc.data.caption_source} {self.paths['captions'] or ''}",
                    "init from": self.paths["init_from"]
                    or "(fresh UNet" + (" and projection)" if self.model.has_projection else ")"),
                    "LLM": f"{self.tcfg.model.llm} ({'LoRA trained' if sc.train_lora else 'frozen'}), {sc.max_length} tokens"
                    + (f"; not loaded: states from the text cache {sc.data.text_cache}" if self.text_cache else ""),
                    "loader": f"{sc.data.num_workers} processes, {sc.data.prefetch} batches ahead each"
                    if sc.data.num_workers
                    else "in the training loop (data.num_workers: 0)",
                    "ranks": f"{self.world_size} ({self.device.type}, {'bf16' if self.dtype == torch.bfloat16 else 'fp32'}, "
                    f"ZeRO-{self.tcfg.deepspeed.zero_stage})",
                    "batch": f"{sc.micro_batch_size} x {sc.gradient_accumulation} accum x {self.world_size} ranks",
                    "steps": f"{self.step} -> {sc.max_steps}",
                    "output": self.paths["output"]
                    if self.remote_output is None
                    else f"{self.remote_output} (staged in {self.paths['output']})",
                },
            )
        self.model.train()
        batches = self.batch_generator()
        bar = progress(
            range(self.step, sc.max_steps),
            total=sc.max_steps,
            initial=self.step,
            desc=f"train-stage{self.stage}",
            unit="step",
            disable=self.rank != 0,
        )
        rank_samples = 0  # this rank's; self._samples: all ranks', summed when read
        self._samples = 0
        t0 = last_read = time.time()
        lc, ck = sc.logging, sc.checkpoint
        pending: list[dict] = []  # steps not read from the device yet
        streak: list[int] = []  # the steps DeepSpeed skipped in a row, up to now
        self.skipped_steps: list[int] = []  # the steps it skipped in this run
        for _ in bar:
            m = self.train_step(batches)
            self.step += 1
            m.update(step=self.step, time=time.time(), skipped_steps=self.engine.skipped_steps)
            if m["skipped"]:  # a host flag: DeepSpeed read its overflow check already
                streak.append(self.step)
                self.skipped_steps.append(self.step)
                log.warning("step %d: DeepSpeed skipped the optimizer step (non-finite gradients)", self.step)
                if len(streak) > sc.optim.max_skipped_steps:
                    pending.append(m)
                    self._too_many_skipped(streak, pending)
            else:
                streak = []
            rank_samples += m["rank_samples"]
            if len(self.keys_seen) < 1000:
                self.keys_seen.extend(m["keys"])
            pending.append(m)
            log_now = self.step % lc.every_steps == 0 or self.step == sc.max_steps
            save_now = self.step % ck.every_steps == 0 or self.step == sc.max_steps
            validate_now = self.step % lc.validation_every_steps == 0
            if log_now or save_now or validate_now:  # the device is read here only (and a NaN stops the run here)
                rows = self._flush(pending)
                rate = sum(r["samples"] for r in rows) / max(1e-9, rows[-1]["time"] - last_read)
                last_read = rows[-1]["time"]
                for r in rows:
                    if r["step"] % lc.every_steps == 0 or r["step"] == sc.max_steps:
                        self.log_metrics(r, rate)
                if self.rank == 0:
                    bar.set_postfix(loss=f"{rows[-1]['loss']:.4f}", lr=f"{rows[-1]['lr']:.2e}")
            if save_now:
                self.save_checkpoint()
            if validate_now:
                self.validate()
        elapsed = time.time() - t0
        export_dir = self.export()
        if self.writer is not None:
            self.writer.close()
        s = self.summary
        counts = self._all_ranks_counts()
        s.n_in = counts.pop("rows", 0)  # rows of the images table, all ranks
        for reason, n in counts.items():
            if reason.startswith("skipped: ") and n:
                s.reject(reason.removeprefix("skipped: "), n)
        s.n_out = s.n_in - sum(s.rejected.values())  # rows training could use
        trained = self._samples
        s.extra.update(
            {
                "steps": self.step,
                "steps_this_run": len(self.history),
                "samples_trained_this_run": trained,
                "first_loss": self.history[0][1] if self.history else None,
                "last_loss": self.history[-1][1] if self.history else None,
                "samples_per_s": round(trained / elapsed, 2) if elapsed > 0 and trained else None,
                # optimizer steps DeepSpeed skipped (non-finite gradients): this run's, and the run's total
                "skipped_steps_this_run": len(self.skipped_steps),
                "skipped_steps_first": self.skipped_steps[:20],
                "skipped_steps_total": self.engine.skipped_steps,
                "export": str(export_dir),
                "checkpoint": str(self.ckpt.newest()[1]) if self.ckpt.newest() else None,
            }
        )
        s.finish()
        rank_stats = {
            "rank": self.rank,
            "world_size": self.world_size,
            "steps_run": len(self.history),
            "samples": rank_samples,
            "data": dict(self.data.counts),
            "keys_seen_first": self.keys_seen[:1000],
        }
        ranks_dir = Path(self.paths["output"]) / "ranks"
        ranks_dir.mkdir(parents=True, exist_ok=True)
        (ranks_dir / f"rank-{self.rank}.json").write_text(json.dumps(rank_stats))
        if self.rank == 0:
            s.print()
            Table(self.paths["output"]).save_json("_summary.json", s.to_dict())
            if self.remote_output is not None:
                self._mirror_run()
        return s

    def _all_ranks_counts(self) -> dict[str, int]:
        """The data counters (rows, skipped by reason) summed over ranks."""
        import deepspeed.comm as dist

        names = ["rows", "usable", *SKIP_REASONS]  # the same on every rank: the all-reduce lines them up
        t = torch.tensor([float(self.data.counts.get(n, 0)) for n in names], device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return {n: int(v) for n, v in zip(names, t.tolist(), strict=True) if n != "usable"}

    def export(self) -> Path:
        """Write ``<output>/export`` (release layout) from the fp32 EMA, or the fp32 master weights.

        Every rank takes part (each holds a piece of the weights); rank 0 writes. The module's
        bf16 weights are not used: they are a rounding of the masters.
        """
        from training.ema import master_weights

        out = Path(self.paths["output"]) / "export"
        info = out / "paradiffusion.json"
        if info.is_file() and json.loads(info.read_text()).get("step") == self.step:
            return out  # a rerun of a finished stage: the export of this step is there already
        use_ema = self.ema is not None and self.scfg.ema.export
        # one whole fp32 parameter at a time through the accelerator, then to CPU on rank 0
        weights = self.ema.full(self.engine, self.device) if use_ema else master_weights(self.engine, self.device)
        if self.rank == 0:
            self._export_rank0(out, use_ema, weights)
        self._barrier()
        return out

    def _export_rank0(self, out: Path, use_ema: bool, weights: dict[str, torch.Tensor]) -> None:
        from training.export import export_model

        lora_from = None
        if not self.scfg.train_lora and self.paths["init_from"]:
            cand = Path(self.paths["init_from"]) / "text_encoder_lora"
            lora_from = cand if cand.is_dir() else None
        export_model(
            self.model,
            out,
            llm=self.tcfg.model.llm,
            llm_revision=self.tcfg.model.llm_revision,
            vae=self.tcfg.model.vae,
            scheduler_config=dict(self.noise_scheduler.config),
            max_length=self.scfg.max_length,
            llm_dtype=self.tcfg.model.llm_dtype,
            stage=self.stage,
            step=self.step,
            lora_from=lora_from,
            ema=use_ema,
            weights=weights,
        )
