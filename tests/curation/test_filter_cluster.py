"""The filter against a real two-node Ray cluster started with `ray start` on this machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from paradiffusion.storage import Table
from paradiffusion.testing.image_shards import write_image_shards
from paradiffusion.testing.ray_cluster import LocalRayCluster
from paradiffusion.testing.sample import build_sample
from paradiffusion.testing.tiny_clip import build_tiny_clip

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.cluster
def test_filter_runs_on_a_two_node_cluster(ray_cluster, tmp_path):
    records = build_sample(tmp_path / "sample")
    tiny = build_tiny_clip(tmp_path / "models")
    write_image_shards(records, tmp_path / "sample", tmp_path / "data" / "images", shard_size=8, n_failed=1)
    sets = [
        f"project.data_root={tmp_path / 'data'}",
        "filter.runner=ray",
        f"filter.models.clip_model={tiny['clip_model']}",
        f"filter.models.aesthetic={tiny['aesthetic']}",
        "filter.thresholds.min_short_side=128",
        "filter.thresholds.aesthetic_min=null",
        "filter.thresholds.clip_score_min=null",
        "filter.num_actors=1",
        "filter.cpus_per_actor=0.5",
        "filter.batch_size=8",
        "filter.decode_batch_size=4",
        *ray_cluster.ray_overrides(),
    ]
    cmd = [sys.executable, "-m", "paradiffusion", "filter", "--config", os.devnull]
    for s in sets:
        cmd += ["--set", s]
    env = {**ray_cluster.env, "PYTHONPATH": str(REPO)}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = Table(str(tmp_path / "data" / "scores")).load_json("_summary.json")
    assert f"Ray cluster at {ray_cluster.address} (2 node(s)" in summary["ran_on"]
    scores = Table(str(tmp_path / "data" / "scores")).read(columns=["key"])["key"].to_pylist()
    n_shards = -(-len(records) // 8)
    assert len(scores) == len(set(scores)) == len(records) + n_shards
    assert summary["out"] > 0


@pytest.mark.cluster
def test_cluster_teardown_leaves_no_process(tmp_path):
    cluster = LocalRayCluster(n_workers=1).start()
    assert any("raylet" in " ".join(p.cmdline()) for p in cluster.processes())
    cluster.stop()
    assert cluster.processes() == []
