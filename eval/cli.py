"""Commands of the eval stage (light: heavy imports happen inside the run functions)."""

from __future__ import annotations

import argparse

from paradiffusion.cli import Command
from paradiffusion.config import PipelinesConfig


def _generate(cfg: PipelinesConfig, args: argparse.Namespace) -> int:
    from eval.generate import run_generate

    return run_generate(cfg, args)


def _generate_args(p: argparse.ArgumentParser) -> None:
    from eval.generate import _add_arguments

    _add_arguments(p)


def _metrics(cfg: PipelinesConfig, args: argparse.Namespace) -> int:
    from eval.metrics import run_metrics

    return run_metrics(cfg, args)


def _vote(cfg: PipelinesConfig, args: argparse.Namespace) -> int:
    from eval.vote.admin import run_vote

    return run_vote(cfg, args)


def _vote_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=None, help="override eval.vote.host")
    p.add_argument("--port", type=int, default=None, help="override eval.vote.port")


def _vote_admin(cfg: PipelinesConfig, args: argparse.Namespace) -> int:
    from eval.vote.admin import run_vote_admin

    return run_vote_admin(cfg, args)


def _vote_admin_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "action",
        choices=["pairs", "invite", "revoke", "progress", "export"],
        help="pairs: (re)build the pairs from eval_images; invite NAME...: new invite tokens; "
        "revoke NAME...; progress: per voter and comparison; export: votes to Parquet",
    )
    p.add_argument("names", nargs="*", help="voter names (invite, revoke)")
    p.add_argument("--admin", action="store_true", help="invite: make admin tokens (the /admin page)")
    p.add_argument("--base-url", default=None, help="invite: print links with this base URL")


def _report(cfg: PipelinesConfig, args: argparse.Namespace) -> int:
    from eval.report import run_report

    return run_report(cfg, args)


EVAL_GENERATE = Command(
    help="generate seeded images for the eval prompt sets from every configured model",
    run=_generate,
    add_arguments=_generate_args,
)
EVAL_METRICS = Command(
    help="automatic metrics (CLIP score, aesthetic, FID, preference models) with bootstrap CIs", run=_metrics
)
VOTE = Command(help="serve the blind pairwise voting app (builds the pairs first)", run=_vote, add_arguments=_vote_args)
VOTE_ADMIN = Command(
    help="voting admin: invite tokens, pairs, progress, export votes to Parquet",
    run=_vote_admin,
    add_arguments=_vote_admin_args,
)
EVAL_REPORT = Command(help="HTML report: voting rates with 95%% CIs, metrics, image grids", run=_report)
