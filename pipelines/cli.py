"""The ``paradiffusion`` command: every stage's subcommands, composed.

:data:`COMMANDS` maps a subcommand to ``"module:attribute"`` of its
:class:`paradiffusion.cli.Command`; adding a stage means adding a line there, not
another ``if``. Parsing, model resolution and error handling are the core's
(:func:`paradiffusion.cli.run_command`).
"""

from __future__ import annotations

import argparse

from paradiffusion import cli as _core
from pipelines.config import load_config

#: subcommand -> "module:attribute" of its Command. Kept sorted by pipeline order.
COMMANDS: dict[str, str] = {
    "config": "paradiffusion.cli:CONFIG",
    "demo": "pipelines.demo:DEMO",
    "models": "pipelines.hub_cli:MODELS",
    "download": "curation.cli:DOWNLOAD",
    "filter": "curation.cli:FILTER",
    "caption": "captioning.cli:CAPTION",
    "select-small": "captioning.small.cli:SELECT_SMALL",
    "annotations": "captioning.small.cli:ANNOTATIONS",
    "stats": "stats.cli:STATS",
    "publish": "publish.cli:PUBLISH",
    "cache-latents": "training.cli:CACHE_LATENTS",
    "cache-text": "training.cli:CACHE_TEXT",
    "train": "training.cli:TRAIN",
    "generate": "training.cli:GENERATE",
    "eval-generate": "eval.cli:EVAL_GENERATE",
    "eval": "eval.cli:EVAL_METRICS",
    "vote": "eval.cli:VOTE",
    "vote-admin": "eval.cli:VOTE_ADMIN",
    "eval-report": "eval.cli:EVAL_REPORT",
}


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand in :data:`COMMANDS`."""
    return _core.build_parser(COMMANDS)


def main(argv: list[str] | None = None) -> int:
    """``paradiffusion <command> ...``: returns the exit code."""
    return _core.run_command(COMMANDS, load_config, argv)
