"""Where eval's outputs live by default (all under ``<project.data_root>/eval/``)."""

from __future__ import annotations

from paradiffusion.config import RootConfig
from paradiffusion.storage import join


def images_url(cfg: RootConfig) -> str:
    return cfg.eval.generate.output or join(cfg.project.data_root, "eval", "images")


def metrics_url(cfg: RootConfig) -> str:
    return cfg.eval.metrics.output or join(cfg.project.data_root, "eval", "metrics")


def votes_folder(cfg: RootConfig) -> str:
    return cfg.eval.vote.folder or join(cfg.project.data_root, "eval", "votes")


def report_folder(cfg: RootConfig) -> str:
    return cfg.eval.report.output or join(cfg.project.data_root, "eval", "report")


def dpg_answers_url(cfg: RootConfig) -> str:
    """DPG-Bench judge answers: a table inside the metrics folder."""
    return join(metrics_url(cfg), "dpg_answers")
