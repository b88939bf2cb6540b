"""Two ranks under the real `deepspeed` launcher (CPU, gloo), ZeRO-2 and ZeRO-3, through `paradiffusion train`."""

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
@pytest.mark.parametrize(("zero_stage", "projection"), [(2, "none"), (3, "linear")])
def test_two_ranks_under_the_deepspeed_launcher(tiny_models, tmp_path, zero_stage, projection):
    """Two ranks, ZeRO-2 or ZeRO-3, bf16, shards of 7 and 4 rows: equal disjoint rows per rank, summaries that sum
    the ranks, an export equal to DeepSpeed's own fp32 reconstruction of the checkpoint, and
    EMA pieces that tile every trained parameter exactly once. ZeRO-2 runs the release model (UNet on the LLM
    states, no projection), ZeRO-3 the projection variant."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    write_image_shards(tmp_path / "images", per_shard=[7, 4])
    cfg = tiny_config(tiny_models, tmp_path, max_steps=3, **{"ema.export": False})
    if projection == "linear":
        cfg.train.model.unet = tiny_models["unet_projection"]
        cfg.train.model.text_projection = "linear"
    f = tmp_path / "cfg.yaml"
    f.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("LOCAL_RANK", None)
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "paradiffusion", "train", "--stage", "1", "--config", str(f)]
    for s in ("train.launch.launcher=deepspeed", "train.launch.num_gpus=2", f"train.deepspeed.zero_stage={zero_stage}",
              "train.deepspeed.precision=bf16", f"train.launch.master_port={29529 + zero_stage}"):  # fmt: skip
        cmd += ["--set", s]
    if zero_stage == 3:  # ZeRO-3 partitions the LLM in the training dtype: the bf16 LLM (recorded in the export)
        cmd += ["--set", "train.model.llm_dtype=bfloat16"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "train" / "stage1"
    ranks = [json.loads((out / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["steps_run"] for r in ranks] == [3, 3]
    assert ranks[0]["data"]["usable"] == ranks[1]["data"]["usable"]  # split by rows, not by shard (7 / 4)
    seen = [set(r["keys_seen_first"]) for r in ranks]
    assert seen[0] and seen[1] and not seen[0] & seen[1]  # disjoint data
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["samples_trained_this_run"] == ranks[0]["samples"] + ranks[1]["samples"]  # summed, not x2
    assert summary["in"] == 11
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert sum(m["samples"] for m in metrics) == summary["samples_trained_this_run"]
    ck = out / "checkpoints" / "step-00000003"
    assert (ck / "COMMITTED").is_file()
    assert len(list(ck.glob("rank-*.pt"))) == 2 and len(list(ck.glob("ema-rank-*.pt"))) == 2

    # The export holds the fp32 master weights: what DeepSpeed's zero_to_fp32 rebuilds from the checkpoint.
    ref = get_fp32_state_dict_from_zero_checkpoint(str(ck), tag="state", exclude_frozen_parameters=True)
    unet = load_file(str(out / "export" / "unet" / "diffusion_pytorch_model.safetensors"))
    exported = {f"unet.{k}": v for k, v in unet.items()}
    proj_file = out / "export" / "text_projection" / "model.safetensors"
    assert proj_file.is_file() == (projection == "linear")
    if projection == "linear":
        exported.update({f"projection.{k}": v for k, v in load_file(str(proj_file)).items()})
        assert any(k.startswith("projection.") for k in ref)
    assert set(exported) == {k for k in ref if not k.startswith("llm.")}
    assert all(torch.equal(exported[k], ref[k].float()) for k in exported)
    # Each rank's EMA pieces cover its part of the flat masters; together every element once.
    covered = {k: torch.zeros(v.numel(), dtype=torch.int32) for k, v in exported.items()}
    for r in (0, 1):
        for name, frag in torch.load(ck / f"ema-rank-{r}.pt", weights_only=True)["fragments"].items():
            covered[name][frag["start"] : frag["start"] + frag["value"].numel()] += 1
    assert all(bool((c == 1).all()) for c in covered.values())
