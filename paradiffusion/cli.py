"""One CLI, a subcommand per stage: ``paradiffusion <stage> [--config F]... [--set k=v]...``.

Each stage declares its subcommands as :class:`Command` objects in a light module
(``curation/cli.py``, ...) that imports nothing heavy at module level, so ``--help``
stays fast. :data:`COMMANDS` maps a subcommand to ``"module:attribute"``; adding a
stage means adding a line there, not another ``if``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from paradiffusion.config import ConfigError, PipelinesConfig, load_config

if TYPE_CHECKING:
    from paradiffusion.hub import ModelRef


@dataclass
class Command:
    """A subcommand: its help line, its own arguments and what it runs.

    ``run(cfg, args)`` returns the process exit code.

    ``models(cfg, args)`` lists the models the resolved config makes this command load
    (:class:`paradiffusion.hub.ModelRef`); :func:`main` resolves them before ``run``, so a
    model that cannot be had stops the run at once with one line. ``args`` is None when
    ``paradiffusion models fetch/check`` asks: then list every model the command could load.
    """

    help: str
    run: Callable[[PipelinesConfig, argparse.Namespace], int]
    add_arguments: Callable[[argparse.ArgumentParser], None] = field(default=lambda p: None)
    models: Callable[[PipelinesConfig, argparse.Namespace | None], list[ModelRef]] | None = None


def _show_config(cfg: PipelinesConfig, args: argparse.Namespace) -> int:
    import yaml

    section = cfg.model_dump(mode="json")
    if args.section:
        for part in args.section.split("."):
            section = section[part]
    print(yaml.safe_dump(section, sort_keys=False), end="")
    return 0


CONFIG = Command(
    help="validate the config and print it resolved (with overrides and defaults)",
    run=_show_config,
    add_arguments=lambda p: p.add_argument("section", nargs="?", help="only this section, e.g. filter"),
)

#: subcommand -> "module:attribute" of its Command. Kept sorted by pipeline order.
COMMANDS: dict[str, str] = {
    "config": "paradiffusion.cli:CONFIG",
    "demo": "paradiffusion.demo:DEMO",
    "models": "paradiffusion.hub_cli:MODELS",
    "download": "curation.cli:DOWNLOAD",
    "filter": "curation.cli:FILTER",
    "caption": "captioning.cli:CAPTION",
    "select-small": "captioning.small.cli:SELECT_SMALL",
    "annotations": "captioning.small.cli:ANNOTATIONS",
    "stats": "stats.cli:STATS",
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


def _load_command(target: str) -> Command:
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paradiffusion",
        description="ParaDiffusion toolkit: curate, caption, train and evaluate paragraph-to-image models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, target in COMMANDS.items():
        cmd = _load_command(target)
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        p.add_argument(
            "--config",
            action="append",
            default=None,
            metavar="FILE",
            help="config file (repeatable; later files override earlier ones). Default: pipelines.yaml",
        )
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            dest="overrides",
            help="override one setting for this run, e.g. --set filter.batch_size=64 (repeatable)",
        )
        cmd.add_arguments(p)
        p.set_defaults(_command=cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from paradiffusion import hub

    cmd: Command = args._command
    try:
        with hub.run_environment(cfg.models):  # the cache folders, for this command and what it starts
            if cmd.models is not None:  # before Ray, DeepSpeed or any data work
                hub.resolve_for_run(cfg.models, cmd.models(cfg, args))
            return int(cmd.run(cfg, args) or 0)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except hub.ModelUnavailable as exc:  # one line: the setting, what was tried, the fix
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:  # a missing input table, model folder or file: say which, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; rerun the same command to resume", file=sys.stderr)
        return 130
