"""The NSFW and watermark scores in the filter: measured, thresholded, re-decided without model work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from curation.filter import run_filter
from curation.safety.nsfw import NSFWHead
from paradiffusion.storage import Table
from paradiffusion.testing.image_shards import write_image_shards
from paradiffusion.testing.sample import build_sample
from paradiffusion.testing.tiny_clip import build_tiny_clip
from pipelines.config import load_config


@pytest.mark.slow  # three filter runs, one with an EfficientNet-B3 on CPU
def test_nsfw_and_watermark_scores_reject_above_the_threshold_and_are_redecided(tmp_path):
    from safetensors.torch import save_file

    records = build_sample(tmp_path / "sample", n_synthetic=8, broken=False)
    tiny = build_tiny_clip(tmp_path / "models")
    write_image_shards(records, tmp_path / "sample", tmp_path / "data" / "images", shard_size=16, n_failed=0)
    torch.manual_seed(0)
    head = NSFWHead(tiny["embed_dim"])
    with torch.no_grad():  # spread the random head's outputs over 0..1
        head.variance.fill_(0.01)
        head.linear_4.weight.mul_(20)
    save_file(head.state_dict(), tmp_path / "nsfw.safetensors")
    from curation.safety.watermark import build_watermark_net

    torch.save(build_watermark_net().state_dict(), tmp_path / "watermark_model_v1.pt")
    sets = [
        f"project.data_root={tmp_path / 'data'}",
        "filter.runner=local",
        f"filter.models.clip_model={tiny['clip_model']}",
        f"filter.models.aesthetic={tiny['aesthetic']}",
        f"filter.models.nsfw={tmp_path / 'nsfw.safetensors'}",
        f"filter.models.watermark={tmp_path / 'watermark_model_v1.pt'}",
        "filter.thresholds.min_short_side=null",
        "filter.thresholds.max_aspect_ratio=null",
        "filter.thresholds.aesthetic_min=null",
        "filter.thresholds.clip_score_min=null",
        "filter.thresholds.languages=[]",
        "filter.thresholds.dedup=exact",
    ]
    off = ["filter.thresholds.nsfw_max=null", "filter.thresholds.watermark_max=null"]
    assert run_filter(load_config([], [*sets, *off])) == 0
    rows = Table(str(tmp_path / "data" / "scores")).read().to_pylist()
    scored = [r for r in rows if r["clip_score"] is not None]
    scores = np.array([r["nsfw"] for r in scored])
    assert len(scored) >= 8 and np.isfinite(scores).all() and scores.std() > 0.05
    assert not any(r["reject_reason"] in ("nsfw", "watermark") for r in rows)
    assert all(0 < r["watermark"] < 1 for r in scored)
    assert all(r["watermark"] is None and r["nsfw"] is None for r in rows if r["clip_score"] is None)

    cut = float(np.median(scores))
    assert run_filter(load_config([], [*sets, *off, f"filter.thresholds.nsfw_max={cut}"])) == 0
    out = Table(str(tmp_path / "data" / "scores"))
    summary = out.load_json("_summary.json")
    assert summary["shards_measured_this_run"] == 0  # re-decided from the stored scores
    again = {r["key"]: r for r in out.read().to_pylist()}
    for r in scored:
        want = "nsfw" if r["nsfw"] > cut else None
        got = again[r["key"]]["reject_reason"]
        assert got == want or (want is None and got == "duplicate"), (r["key"], got, want)
        assert again[r["key"]]["nsfw"] == r["nsfw"]
    assert summary["rejected"]["nsfw"] == int((scores > cut).sum()) > 0

    # every watermark score is above 0: all scored rows are re-decided as `watermark`, no model work
    assert run_filter(load_config([], [*sets, *off, "filter.thresholds.watermark_max=0.0"])) == 0
    summary = out.load_json("_summary.json")
    assert summary["shards_measured_this_run"] == 0
    third = {r["key"]: r["reject_reason"] for r in out.read().to_pylist()}
    assert {third[r["key"]] for r in scored} == {"watermark"}
