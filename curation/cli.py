"""CLI commands of the curation stages (light imports only; the work is imported on run)."""

from __future__ import annotations

import argparse

from paradiffusion.cli import Command
from paradiffusion.config import RootConfig


# --------------------------------------------------------------------------- download
def _run_download(cfg: RootConfig, args: argparse.Namespace) -> int:
    import sys

    from curation.download import REASON_SHARD_FAILED, run_download

    summary = run_download(cfg)
    if summary.rejected.get(REASON_SHARD_FAILED):
        print("some shards did not finish: rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


DOWNLOAD = Command(
    help="download a URL list (parquet/csv/tsv/jsonl, LAION columns too) into image shards with img2dataset",
    run=_run_download,
)


# --------------------------------------------------------------------------- filter
def _run_filter(cfg: RootConfig, args: argparse.Namespace) -> int:
    from curation.filter import run_filter

    return run_filter(cfg, args)


def _filter_models(cfg: RootConfig, args: argparse.Namespace | None) -> list:
    """The CLIP model (open_clip name + tag, hf-hub: id or folder), the aesthetic head, the NSFW head and the
    watermark detector (path or URL)."""
    from paradiffusion.hub import open_clip_refs, weights_ref

    m = cfg.filter.models
    refs = open_clip_refs("filter.models.clip_model", m.clip_model, m.clip_pretrained, "filter.models.clip_pretrained")
    if m.aesthetic:
        refs.append(weights_ref("filter.models.aesthetic", m.aesthetic, note="LAION aesthetic predictor"))
    if m.nsfw:
        refs.append(weights_ref("filter.models.nsfw", m.nsfw, note="LAION CLIP-based NSFW detector (converted)"))
    if m.watermark:
        refs.append(weights_ref("filter.models.watermark", m.watermark, note="LAION watermark detector"))
    return refs


FILTER = Command(
    help="decode, measure and score the image shards (CLIP, aesthetic), dedup, and write the scores table",
    run=_run_filter,
    models=_filter_models,
)
