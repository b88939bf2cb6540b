"""CLI command of the captioning stage (light imports only; the work is imported on run)."""

from __future__ import annotations

import argparse

from paradiffusion.cli import Command
from paradiffusion.config import PipelinesConfig


def _run_caption(cfg: PipelinesConfig, args: argparse.Namespace) -> int:
    from captioning.pipeline import run_caption

    summary = run_caption(cfg, recaption=args.recaption, limit=args.limit)
    return 1 if summary.rejected.get("lost_in_pipeline") else 0


def _caption_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--recaption",
        action="store_true",
        help="caption again keys this model+revision+prompt already captioned (the new row replaces the old)",
    )
    p.add_argument("--limit", type=int, default=None, metavar="N", help="caption at most N pending images this run")


CAPTION = Command(
    help="caption the kept set with a vision-language model (CogVLM, Qwen2.5-VL, LLaVA, ...) into the captions table",
    run=_run_caption,
    add_arguments=_caption_arguments,
)
