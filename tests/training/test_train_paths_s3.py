"""A training stage whose run folder (or init_from) is a URL runs in a local staging folder."""

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
