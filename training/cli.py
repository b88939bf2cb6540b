"""``paradiffusion train --stage 1|2|3`` and ``paradiffusion generate``. Light imports only.

``train`` runs in this process (one rank, gloo on CPU) unless the config asks for more
than one GPU or names a hostfile (``train.launch``): then it re-runs itself under the
``deepspeed`` launcher, one process per GPU, on every host of the hostfile.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

from paradiffusion.cli import Command
from paradiffusion.config import ConfigError, PipelinesConfig


def launch_command(cfg: PipelinesConfig, argv: list[str]) -> list[str] | None:
    """The ``deepspeed`` launcher command for this run, or None to run in this process."""
    lc = cfg.train.launch
    if "LOCAL_RANK" in os.environ or lc.launcher == "none":  # already a launched rank, or asked for one process
        return None
    if lc.launcher == "auto":
        gpus = 0
        try:
            import torch

            gpus = torch.cuda.device_count()
        except ImportError:  # pragma: no cover
            pass
        if not (lc.hostfile or (lc.num_gpus or gpus) > 1 or (lc.num_nodes or 1) > 1):
            return None
    exe = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [exe, "--master_port", str(lc.master_port)]
    if lc.hostfile:
        cmd += ["--hostfile", lc.hostfile]
    if lc.num_nodes:
        cmd += ["--num_nodes", str(lc.num_nodes)]
    if lc.num_gpus:
        cmd += ["--num_gpus", str(lc.num_gpus)]
    return cmd + ["--no_local_rank", "--module", "paradiffusion", *argv]


def _train_argv(args: argparse.Namespace) -> list[str]:
    argv = ["train", "--stage", str(args.stage)]
    for c in args.config or []:
        argv += ["--config", os.path.abspath(c)]
    for s in args.overrides:
        argv += ["--set", s]
    return argv


def run_train(cfg: PipelinesConfig, args: argparse.Namespace) -> int:
    cmd = launch_command(cfg, _train_argv(args))
    if cmd is not None:
        print("$ " + " ".join(cmd), file=sys.stderr)
        return subprocess.call(cmd)
    from training.trainer import Trainer, TrainingDiverged

    try:
        Trainer(cfg, args.stage).train()
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    return 0


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--stage",
        type=int,
        choices=(1, 2, 3),
        required=True,
        help="1: LLM frozen, alt text; 2: LLM LoRA, paragraph captions; 3: LLM frozen, ParaImage-Small",
    )


def run_generate(cfg: PipelinesConfig, args: argparse.Namespace) -> int:
    from training.generate import generate

    prompts = [p for p in args.prompt or [] if p.strip()]  # `make generate` without PROMPT passes ""
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ConfigError(
            'generate: give --prompt TEXT (repeatable) or --prompts-file FILE (make generate PROMPT="...")'
        )
    generate(cfg, prompts)
    return 0


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", action="append", help="text prompt (repeatable)")
    p.add_argument("--prompts-file", help="a text file, one prompt per line")


def run_cache_latents(cfg: PipelinesConfig, args: argparse.Namespace) -> int:
    from training.latents import cache_latents

    cache_latents(cfg, args.stage)
    return 0


CACHE_LATENTS = Command(
    help="encode a stage's images with the VAE once (then set train.stageN.data.latents to train without the VAE)",
    run=run_cache_latents,
    add_arguments=_train_args,
)
TRAIN = Command(
    help="train the ParaDiffusion model: --stage 1, 2 or 3 (DeepSpeed)", run=run_train, add_arguments=_train_args
)
GENERATE = Command(
    help="text to image with an export or the official weights; PNGs with settings in metadata",
    run=run_generate,
    add_arguments=_generate_args,
)
