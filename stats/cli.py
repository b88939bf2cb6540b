"""The ``stats`` command (light imports: the work is imported when it runs)."""

from __future__ import annotations

import argparse

from paradiffusion.cli import Command
from paradiffusion.config import RootConfig


def _run(cfg: RootConfig, args: argparse.Namespace) -> int:
    from stats.run import run_stats

    run_stats(cfg, only=args.only.split(",") if args.only else None)
    return 0


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", help="comma-separated canned queries to run (default: all), e.g. table1,funnel")


STATS = Command(
    help="DuckDB views over every table (views.sql, stats.duckdb), canned queries, report with plots",
    run=_run,
    add_arguments=_args,
)
