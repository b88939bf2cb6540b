"""`make demo`'s publish step: ParaImage-Big and -Small as a dataset folder from the demo's tables."""

from __future__ import annotations


def step_publish(ctx) -> None:
    """Both subsets with the image bytes and WebDataset tars, into ``<data_root>/paraimage`` (a local
    folder, or the bucket with ``--s3``): the card, croissant.json, Parquet and tar shards."""
    ctx.cli("publish", extra_sets=["publish.include_images=true", "publish.webdataset=true"])
