"""The ``publish`` command (light imports: the work is imported when it runs)."""

from __future__ import annotations

import argparse

from paradiffusion.cli import Command
from paradiffusion.config import RootConfig


def _run(cfg: RootConfig, args: argparse.Namespace) -> int:
    from publish.run import run_publish

    run_publish(cfg)
    return 0


PUBLISH = Command(
    help="write ParaImage-Big/Small as a dataset folder: Parquet shards, dataset card, Croissant, WebDataset "
    "(and upload it to the Hub with publish.repo_id)",
    run=_run,
)
