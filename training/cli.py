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
from paradiffusion.config import ConfigError, RootConfig


def launch_command(cfg: RootConfig, argv: list[str]) -> list[str] | None:
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


def run_train(cfg: RootConfig, args: argparse.Namespace) -> int:
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


def run_generate(cfg: RootConfig, args: argparse.Namespace) -> int:
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


def run_cache_latents(cfg: RootConfig, args: argparse.Namespace) -> int:
    from training.latents import cache_latents

    cache_latents(cfg, args.stage)
    return 0


def run_cache_text(cfg: RootConfig, args: argparse.Namespace) -> int:
    from training.text_cache import cache_text

    cache_text(cfg, args.stage, batch_size=args.batch_size)
    return 0


def _cache_text_args(p: argparse.ArgumentParser) -> None:
    _train_args(p)
    p.add_argument("--batch-size", type=int, default=16, help="captions per LLM forward (default 16)")


# --------------------------------------------------------------------------- models each command loads
def _vae_ref(cfg: RootConfig) -> list:
    from paradiffusion.hub import model_ref

    return [model_ref("train.model.vae", cfg.train.model.vae, layout=("diffusers",))]


def _llm_ref(cfg: RootConfig):
    from paradiffusion.hub import model_ref

    mc = cfg.train.model
    return model_ref(
        "train.model.llm",
        mc.llm,
        revision=mc.llm_revision,
        revision_setting="train.model.llm_revision",
        layout=("transformers", "tokenizer"),
    )


def train_models(cfg: RootConfig, args: argparse.Namespace | None) -> list:
    """The LLM (+ tokenizer), the VAE, and the UNet / scheduler when named (all three stages share them).

    A stage that trains on a text cache (``data.text_cache``, LLM frozen) does not load the LLM."""
    from paradiffusion.hub import model_ref

    mc = cfg.train.model
    stage = getattr(args, "stage", None)
    cached = stage is not None and cfg.train.stage(stage).data.text_cache and not cfg.train.stage(stage).train_lora
    refs = [*([] if cached else [_llm_ref(cfg)]), *_vae_ref(cfg)]
    if mc.unet:
        refs.append(model_ref("train.model.unet", mc.unet, subfolder=mc.unet_subfolder, layout=("diffusers",)))
    if mc.scheduler:
        refs.append(model_ref("train.model.scheduler", mc.scheduler, layout=("scheduler",)))
    return refs


def paradiffusion_models(
    setting: str,
    path: str,
    llm: str | None = None,
    vae: str | None = None,
    llm_setting: str | None = None,
    vae_setting: str | None = None,
) -> list:
    """What ``ParaDiffusionPipeline.from_pretrained(path, llm=..., vae=...)`` reads.

    Our export folder (``unet/``, ``scheduler/``, ``paradiffusion.json`` naming the LLM and
    VAE) or the official release on the Hub (the whole repository: the pipeline takes a full
    snapshot, ``Llama-2-7b-hf/`` and ``sdxl-vae-fp16-fix/`` included). ``llm`` / ``vae``
    override where those come from.
    """
    import json

    from paradiffusion.hub import ModelRef, looks_local, model_ref

    parts: tuple[str, ...] = ("unet:diffusers", "scheduler:scheduler")
    llm_from = (llm_setting or setting) if llm else setting
    vae_from = (vae_setting or setting) if vae else setting
    info: dict = {}
    if not looks_local(path):
        refs = [ModelRef(setting, path, "hf", layout=("any", *parts), note="ParaDiffusion release")]
    else:
        root = os.path.expanduser(path)
        info_file = os.path.join(root, "paradiffusion.json")
        if os.path.isfile(info_file):
            with open(info_file) as f:
                info = json.load(f)
        llm, vae = llm or info.get("llm"), vae or info.get("vae")
        if not llm and os.path.isdir(os.path.join(root, "Llama-2-7b-hf")):  # a local copy of the release
            parts += ("Llama-2-7b-hf:transformers", "Llama-2-7b-hf:tokenizer")
        if not vae and os.path.isdir(os.path.join(root, "sdxl-vae-fp16-fix")):
            parts += ("sdxl-vae-fp16-fix:diffusers",)
        refs = [ModelRef(setting, path, "folder", layout=parts, note="ParaDiffusion export")]
    named = "its paradiffusion.json names it"
    if llm:
        rev = info.get("llm_revision")  # the pipeline passes the export's revision on
        note = named if llm_from == setting else ""
        refs.append(model_ref(llm_from, llm, revision=rev, layout=("transformers", "tokenizer"), note=note))
    if vae:
        refs.append(model_ref(vae_from, vae, layout=("diffusers",), note=named if vae_from == setting else ""))
    return refs


def _generate_models(cfg: RootConfig, args: argparse.Namespace | None) -> list:
    from paradiffusion.storage import join

    gc = cfg.generate
    model = gc.model or join(cfg.project.data_root, "train", "stage3", "export")
    refs = paradiffusion_models("generate.model", model, gc.llm, gc.vae, "generate.llm", "generate.vae")
    if args is None and gc.model is None:  # models fetch: the stage-3 export is trained here, not fetched
        refs = refs[1:]
    return refs


CACHE_LATENTS = Command(
    help="encode a stage's images with the VAE once (then set train.stageN.data.latents to train without the VAE)",
    run=run_cache_latents,
    add_arguments=_train_args,
    models=lambda cfg, args: _vae_ref(cfg),
)
CACHE_TEXT = Command(
    help="the frozen LLM's states of a stage's captions, once (then set train.stageN.data.text_cache: the stage "
    "trains without loading the LLM); stages 1 and 3",
    run=run_cache_text,
    add_arguments=_cache_text_args,
    models=lambda cfg, args: [_llm_ref(cfg)],
)
TRAIN = Command(
    help="train the ParaDiffusion model: --stage 1, 2 or 3 (DeepSpeed)",
    run=run_train,
    add_arguments=_train_args,
    models=train_models,
)
GENERATE = Command(
    help="text to image with an export or the official weights; PNGs with settings in metadata",
    run=run_generate,
    add_arguments=_generate_args,
    models=_generate_models,
)
