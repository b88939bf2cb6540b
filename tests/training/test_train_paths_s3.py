"""A training stage whose run folder (or init_from) is a URL runs in a local staging folder."""

from pathlib import Path

import pytest

from paradiffusion.storage import is_url
from pipelines.config import load_config


def test_url_run_folders_are_staged_locally(tmp_path, s3_root):
    from training.trainer import stage_paths, staging_folder

    cfg = load_config(None, [f"project.data_root={s3_root}/pd", f"train.staging_dir={tmp_path}"])
    p2 = stage_paths(cfg, 2)
    assert p2["output_url"] == f"{s3_root}/pd/train/stage2"
    assert p2["init_from_url"] == f"{s3_root}/pd/train/stage1/export"
    assert not is_url(p2["output"]) and p2["output"].startswith(str(tmp_path))
    assert p2["output"] == staging_folder(cfg, f"{s3_root}/pd/train/stage2")
    assert p2["init_from"] == staging_folder(cfg, f"{s3_root}/pd/train/stage1/export") != p2["output"]
    assert p2["images"] == f"{s3_root}/pd/images"  # data is read in place
    local = stage_paths(load_config(None, ["project.data_root=/d"]), 2)
    assert local["output_url"] is None and local["init_from_url"] is None and local["output"] == "/d/train/stage2"


@pytest.mark.slow
def test_a_run_on_s3_mirrors_checkpoints_resumes_on_a_fresh_machine_and_feeds_the_next_stage(
    tiny_models, tmp_path, s3_root
):
    from train_fixtures import tiny_config, write_image_shards

    from paradiffusion.storage import storage_filesystem, upload_folder
    from training.trainer import Trainer

    write_image_shards(tmp_path / "images", n_shards=1, per_shard=4)
    upload_folder(tmp_path / "images", f"{s3_root}/pd/images")  # images (and alt text) read from S3
    cfg = tiny_config(tiny_models, tmp_path, max_steps=2, **{"data.num_workers": 1})
    cfg.project.data_root = f"{s3_root}/pd"
    cfg.train.staging_dir = str(tmp_path / "machine-a")
    Trainer(cfg, 1).train()
    fs = storage_filesystem(s3_root)
    run = f"{s3_root}/pd/train/stage1".removeprefix("s3://")
    assert fs.exists(f"{run}/checkpoints/step-00000002/COMMITTED") and fs.exists(f"{run}/export/paradiffusion.json")
    assert fs.exists(f"{run}/_summary.json") and fs.exists(f"{run}/metrics.jsonl")
    # another machine (an empty staging folder) resumes from the copy on S3
    cfg.train.staging_dir = str(tmp_path / "machine-b")
    cfg.train.stage1.max_steps = 3
    t = Trainer(cfg, 1)
    t.train()
    assert t.summary.extra["resumed_from"] == "step-00000002" and t.step == 3
    steps = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{run}/checkpoints"))
    assert steps == ["step-00000002", "step-00000003"]  # keep_last: 2, pruned on S3 too
    # stage 2 starts from stage 1's export on S3, fetched into its staging folder
    cfg.train.stage2.data.caption_source = "alt_text"
    t2 = Trainer(cfg, 2)
    t2.train()
    assert t2.paths["init_from_url"] == f"{s3_root}/pd/train/stage1/export"
    assert Path(t2.paths["init_from"], "unet").is_dir()
    assert fs.exists(f"{run.rsplit('/', 1)[0]}/stage2/export/paradiffusion.json")
