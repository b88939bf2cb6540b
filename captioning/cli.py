"""CLI command of the captioning stage (light imports only; the work is imported on run)."""

from __future__ import annotations

import argparse

from paradiffusion.cli import Command
from paradiffusion.config import RootConfig


def _run_caption(cfg: RootConfig, args: argparse.Namespace) -> int:
    from captioning.pipeline import run_caption

    summary = run_caption(cfg, recaption=args.recaption, limit=args.limit)
    return 1 if summary.rejected.get("lost_in_pipeline") or summary.extra.get("stopped") else 0


def _caption_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--recaption",
        action="store_true",
        help="caption again keys this model+revision+prompt already captioned (the new row replaces the old)",
    )
    p.add_argument("--limit", type=int, default=None, metavar="N", help="caption at most N pending images this run")


def _caption_models(cfg: RootConfig, args: argparse.Namespace | None) -> list:
    """The selected captioner (``caption.captioner``) and, for CogVLM v1, its separate tokenizer.

    Remote code must be pinned before anything is downloaded, so that check comes first.
    """
    name = cfg.caption.captioner
    spec = cfg.caption.captioners.get(name)
    if spec is None:
        return []  # the stage reports the unknown captioner with the names it knows
    return captioner_models(f"caption.captioners.{name}", spec)


def captioner_models(key: str, spec) -> list:
    """The weights (and separate tokenizer) one ``caption.captioners`` entry loads; refuses unpinned remote code.

    Shared by every command that loads a captioner (``caption``, and ``eval`` for the DPG-Bench judge).
    """
    from captioning.captioners import check_pinned
    from paradiffusion.config import ConfigError
    from paradiffusion.hub import model_ref

    if spec.type == "openai":
        return []  # the engines hold the weights; the stage asks them what they serve before any work

    try:
        check_pinned(spec)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    refs = [
        model_ref(
            f"{key}.model",
            spec.model,
            revision=spec.revision,
            revision_setting=f"{key}.revision",
            # CogVLM v1's repository has no tokenizer: it names Vicuna's as a separate setting
            layout=("transformers",) if spec.tokenizer else ("transformers", "tokenizer"),
        )
    ]
    if spec.tokenizer:
        refs.append(
            model_ref(
                f"{key}.tokenizer",
                spec.tokenizer,
                revision=spec.tokenizer_revision,
                revision_setting=f"{key}.tokenizer_revision",
                layout=("tokenizer",),
            )
        )
    return refs


CAPTION = Command(
    help="caption the kept set with a vision-language model (CogVLM, Qwen2.5-VL, LLaVA, ...) into the captions table",
    run=_run_caption,
    add_arguments=_caption_arguments,
    models=_caption_models,
)
