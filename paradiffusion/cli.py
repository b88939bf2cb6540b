"""CLI machinery for ``paradiffusion <stage> [--config F]... [--set k=v]...``.

Each stage declares its subcommands as :class:`Command` objects in a light module
(``curation/cli.py``, ...) that imports nothing heavy at module level, so ``--help``
stays fast. The registry that maps a subcommand to ``"module:attribute"`` and the
``main`` that runs it live in the composition layer (``pipelines/cli.py``:
``COMMANDS``); this module builds the parser from any such registry and runs a
command with any config loader, so it names no stage.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from paradiffusion.config import ConfigError, RootConfig

if TYPE_CHECKING:
    from paradiffusion.hub import ModelRef


@dataclass
class Command:
    """A subcommand: its help line, its own arguments and what it runs.

    ``run(cfg, args)`` returns the process exit code.

    ``models(cfg, args)`` lists the models the resolved config makes this command load
    (:class:`paradiffusion.hub.ModelRef`); :func:`run_command` resolves them before ``run``, so a
    model that cannot be had stops the run at once with one line. ``args`` is None when
    ``paradiffusion models fetch/check`` asks: then list every model the command could load.
    """

    help: str
    run: Callable[[RootConfig, argparse.Namespace], int]
    add_arguments: Callable[[argparse.ArgumentParser], None] = field(default=lambda p: None)
    models: Callable[[RootConfig, argparse.Namespace | None], list[ModelRef]] | None = None


def _show_config(cfg: RootConfig, args: argparse.Namespace) -> int:
    import yaml

    section = cfg.model_dump(mode="json")
    if args.section:
        for part in args.section.split("."):
            if not isinstance(section, dict) or part not in section:
                have = ", ".join(section) if isinstance(section, dict) else "none (a value)"
                raise ConfigError(f"config: no section {args.section!r} (at {part!r}; there: {have})")
            section = section[part]
    print(yaml.safe_dump(section, sort_keys=False), end="")
    return 0


CONFIG = Command(
    help="validate the config and print it resolved (with overrides and defaults)",
    run=_show_config,
    add_arguments=lambda p: p.add_argument("section", nargs="?", help="only this section, e.g. filter"),
)


def load_command(target: str) -> Command:
    """The :class:`Command` a registry entry ``"module:attribute"`` names (its module imported now)."""
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


class _RedactingParser(argparse.ArgumentParser):
    """argparse with registered credentials hidden in what it prints (usage errors quote arguments)."""

    def _print_message(self, message: str, file=None) -> None:
        from paradiffusion.log import redact

        super()._print_message(redact(message) if message else message, file)

    def exit(self, status: int = 0, message: str | None = None):
        from paradiffusion.log import redact

        super().exit(status, redact(message) if message else message)


def build_parser(commands: Mapping[str, str]) -> argparse.ArgumentParser:
    """The ``paradiffusion`` parser: one subcommand per entry of ``commands`` (name -> "module:attribute")."""
    parser = _RedactingParser(
        prog="paradiffusion",
        description="ParaDiffusion toolkit: curate, caption, train and evaluate paragraph-to-image models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, target in commands.items():
        cmd = load_command(target)
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


def run_command(
    commands: Mapping[str, str],
    load_config: Callable[[list[str] | None, list[str]], RootConfig],
    argv: list[str] | None = None,
) -> int:
    """Parse ``argv``, load the config with ``load_config(files, overrides)``, resolve the command's models, run it.

    Returns the exit code: the command's, 2 for a config or model problem, 1 for a
    missing file, 130 on Ctrl-C (each with one line on stderr, no traceback). A storage
    failure (:mod:`paradiffusion.storage_errors`) is one line too (URL, operation, cause),
    2 when configuration must fix it, 1 when a rerun may pass; its traceback goes to the
    run's log file only. Credentials (``--set`` of a secret setting, the AWS variables, the
    ``storage`` section) are registered for redaction before anything is parsed.
    """
    from paradiffusion.log import register_cli_secrets, set_run_log
    from paradiffusion.storage import mark_run_start, reset_run_start

    register_cli_secrets(sys.argv[1:] if argv is None else list(argv))
    started = mark_run_start()
    previous_log = set_run_log(None)
    try:
        return _run(commands, load_config, argv)
    finally:
        reset_run_start(started)
        set_run_log(previous_log)


def _run(commands, load_config, argv) -> int:
    from paradiffusion.log import has_secrets, redact, write_traceback_to_run_log
    from paradiffusion.storage_errors import StorageError, describe_failure

    parser = build_parser(commands)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(redact(f"error: {exc}"), file=sys.stderr)
        return 2
    from paradiffusion import hub
    from paradiffusion.storage import configure_storage

    cmd: Command = args._command
    name = getattr(args, "command", "run") or "run"
    try:
        # endpoint, region, credentials for every URL this run opens (and the processes it starts)
        configure_storage(getattr(cfg, "storage", None))
        with hub.run_environment(cfg.models):  # the cache folders, for this command and what it starts
            if cmd.models is not None:  # before Ray, DeepSpeed or any data work
                hub.resolve_for_run(cfg.models, cmd.models(cfg, args))
            return int(cmd.run(cfg, args) or 0)
    except ConfigError as exc:
        print(redact(f"error: {exc}"), file=sys.stderr)
        return 2
    except hub.ModelUnavailable as exc:  # one line: the setting, what was tried, the fix
        print(redact(f"error: {exc}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:
        failure = exc if isinstance(exc, StorageError) else describe_failure(exc)
        if failure is not None:  # one line here, the traceback in the run's log file
            where = write_traceback_to_run_log(traceback.format_exc(), name)
            print(
                redact(f"error: {failure} (traceback: {where}; committed shards are kept, rerun to resume)"),
                file=sys.stderr,
            )
            return failure.exit_code
        if isinstance(exc, FileNotFoundError):  # a missing input table, model folder or file: say which
            print(redact(f"error: {exc}"), file=sys.stderr)
            return 1
        if not has_secrets():
            raise
        # a library's error may quote a storage setting: the traceback with credentials hidden
        print(redact(traceback.format_exc()), file=sys.stderr)
        return 1
