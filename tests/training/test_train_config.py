"""The train/generate config sections: stage defaults and clear errors."""

from __future__ import annotations

import pytest

from paradiffusion.config import ConfigError
from pipelines.config import load_config


def _load(tmp_path, text: str, overrides: list[str] | None = None):
    f = tmp_path / "p.yaml"
    f.write_text(text)
    return load_config([f], overrides)


def test_stage_defaults_survive_a_partial_stage_block(tmp_path):
    cfg = _load(tmp_path, "train:\n  stage2:\n    max_steps: 7\n  stage3:\n    data: {resolution: 512}\n")
    assert cfg.train.stage1.max_length == 256 and not cfg.train.stage1.train_lora
    assert cfg.train.stage2.max_steps == 7
    assert cfg.train.stage2.train_lora and cfg.train.stage2.max_length == 512
    assert cfg.train.stage2.data.caption_source == "captions"
    assert cfg.train.stage3.data.caption_source == "table" and cfg.train.stage3.data.resolution == 512
    assert cfg.train.model.llm == "meta-llama/Llama-2-7b-hf"
    assert cfg.train.model.vae == "madebyollin/sdxl-vae-fp16-fix"


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.deepspeed.zero_stage=4", "zero_stage"),
        ("train.model.prediction_type=x0", "'epsilon', 'v_prediction'"),
        ("train.stage1.data.caption_source=web", "'alt_text', 'captions', 'table'"),
        ("train.stage1.caption_dropout=1.5", "caption_dropout"),
        ("train.stage3.train_lora=true", "stage 3 keeps the LLM frozen"),
        ("train.stage1.lr=1", "unknown key"),
        ("train.model.unet_gradient_checkpointing=false", "moved to each stage: set train.stage1/2/3.gradient_"),
        ("train.stage1.data.prefetch=0", "prefetch"),
        ("train.stage2.compile.mode=fast", "'default', 'reduce-overhead'"),
    ],
)
def test_bad_values_name_the_key(tmp_path, override, needle):
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, "{}\n", [override])
    assert needle in str(exc.value)


def test_launch_command_only_for_gpus_or_hostfile(tmp_path, monkeypatch):
    from training.cli import launch_command

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert launch_command(_load(tmp_path, "{}\n"), ["train"]) is None  # CPU machine: one plain process
    cfg = _load(tmp_path, "{}\n", ["train.launch.hostfile=/etc/hosts.ds", "train.launch.master_port=29999"])
    cmd = launch_command(cfg, ["train", "--stage", "1"])
    assert cmd[0].endswith("deepspeed") and "--hostfile" in cmd and "/etc/hosts.ds" in cmd
    assert cmd[-5:] == ["--module", "paradiffusion", "train", "--stage", "1"]
    monkeypatch.setenv("LOCAL_RANK", "0")  # inside a launched rank: never relaunch
    assert launch_command(cfg, ["train"]) is None


def test_paths_and_deepspeed_config_follow_the_config(tmp_path):
    from training.trainer import _lr_lambda, deepspeed_config, stage_paths

    cfg = _load(tmp_path, "project: {data_root: /d}\n", ["train.stage2.output=/runs/s2"])
    p1, p2, p3 = (stage_paths(cfg, s) for s in (1, 2, 3))
    assert p1["output"] == "/d/train/stage1" and p1["init_from"] is None and p1["captions"] is None
    assert p2["init_from"] == "/d/train/stage1/export" and p2["captions"] == "/d/captions"
    assert p3["init_from"] == "/runs/s2/export" and p3["captions"] == "/d/small_train"
    ds = deepspeed_config(cfg.train, cfg.train.stage1, on_gpu=True)
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 2
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_clipping"] == 1.0
    assert not deepspeed_config(cfg.train, cfg.train.stage1, on_gpu=False)["bf16"]["enabled"]  # fp32 on CPU
    cfg3 = _load(tmp_path, "{}\n", ["train.deepspeed.zero_stage=3", "train.deepspeed.offload_optimizer=true"])
    z = deepspeed_config(cfg3.train, cfg3.train.stage1, on_gpu=True)["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu"
    f = _lr_lambda(10, 110, "cosine")
    assert f(0) == 0.1 and f(9) == 1.0 and abs(f(60) - 0.5) < 1e-9 and f(110) < 1e-9
    assert _lr_lambda(0, 100, "constant")(50) == 1.0
