"""Two ranks under the real `deepspeed` launcher (CPU, gloo), ZeRO-2, through `paradiffusion train`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from train_fixtures import tiny_config, write_image_shards

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.cluster
def test_two_rank_zero2_under_the_deepspeed_launcher(tiny_models, tmp_path):
    write_image_shards(tmp_path / "images", n_shards=2, per_shard=6)
    cfg = tiny_config(tiny_models, tmp_path, max_steps=3)
    f = tmp_path / "cfg.yaml"
    f.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("LOCAL_RANK", None)
    env.pop("RANK", None)
    cmd = [
        sys.executable,
        "-m",
        "paradiffusion",
        "train",
        "--stage",
        "1",
        "--config",
        str(f),
        "--set",
        "train.launch.launcher=deepspeed",
        "--set",
        "train.launch.num_gpus=2",
        "--set",
        "train.deepspeed.zero_stage=2",
        "--set",
        "train.launch.master_port=29531",
    ]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "train" / "stage1"
    ranks = [json.loads((out / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["steps_run"] for r in ranks] == [3, 3]
    seen = [set(r["keys_seen_first"]) for r in ranks]
    assert seen[0] and seen[1] and not seen[0] & seen[1]  # disjoint data
    assert (out / "checkpoints" / "step-00000003" / "COMMITTED").is_file()
    assert len(list((out / "checkpoints" / "step-00000003").glob("rank-*.pt"))) == 2
    assert (out / "export" / "unet" / "config.json").is_file()
