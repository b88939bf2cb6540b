"""`pipelines.yaml` composed: the core sections plus each stage's own section.

Each stage owns its section's schema (``curation/config.py``, ...); the machinery
(strict models, YAML merging, ``--set``, error messages) is the core's
(:mod:`paradiffusion.config`). This module only puts them together.
"""

from __future__ import annotations

import os

from pydantic import Field

from captioning.config import CaptionConfig
from captioning.small.config import AnnotationsConfig, SelectSmallConfig
from curation.config import DownloadConfig, FilterConfig
from eval.config import EvalConfig
from paradiffusion.config import (
    ModelsConfig,
    ProjectConfig,
    RayConfig,
    StorageConfig,
    StrictModel,
    load_config_model,
)
from publish.config import PublishConfig
from stats.config import StatsConfig
from training.config import GenerateConfig, TrainConfig


class PipelinesConfig(StrictModel):
    """The whole `pipelines.yaml`."""

    project: ProjectConfig = Field(default_factory=ProjectConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    caption: CaptionConfig = Field(default_factory=CaptionConfig)
    select_small: SelectSmallConfig = Field(default_factory=SelectSmallConfig)
    annotations: AnnotationsConfig = Field(default_factory=AnnotationsConfig)
    stats: StatsConfig = Field(default_factory=StatsConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)


def load_config(
    paths: list[str | os.PathLike] | str | os.PathLike | None = None,
    overrides: list[str] | None = None,
) -> PipelinesConfig:
    """Load one or more YAML files (later ones override earlier ones), then ``--set`` overrides.

    ``paths`` None loads ``pipelines.yaml`` from the current folder when it exists and
    the defaults otherwise. Raises :class:`paradiffusion.config.ConfigError` naming the
    key, the bad value and what is allowed.
    """
    return load_config_model(PipelinesConfig, paths, overrides)
