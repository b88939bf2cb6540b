"""Checkpoints hold the trained state only: the frozen LLM is left out and checked on resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from train_fixtures import tiny_config, write_image_shards

from paradiffusion.config import ConfigError
from training.trainer import Trainer


def _bigger_llm(tiny_models: dict, folder: Path) -> str:
    """The tiny LLM's tokenizer and width with many more frozen weights (8 layers, MLP 2048)."""
    from transformers import LlamaConfig, LlamaModel

    shutil.copytree(tiny_models["llm"], folder)
    cfg = LlamaConfig.from_pretrained(folder)
    cfg.num_hidden_layers, cfg.intermediate_size = 8, 2048
    for f in folder.glob("model*.safetensors"):
        f.unlink()
    LlamaModel(cfg).save_pretrained(folder)
    return str(folder)


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_checkpoint_size_is_the_trained_state_not_the_frozen_llm(tiny_models, tmp_path):
    write_image_shards(tmp_path / "images", n_shards=1, per_shard=4)
    llms = {"small": tiny_models["llm"], "big": _bigger_llm(tiny_models, tmp_path / "big_llm")}
    size, frozen, trained = {}, {}, {}
    for name, llm in llms.items():
        cfg = tiny_config(tiny_models, tmp_path, max_steps=2)
        cfg.train.model.llm = llm
        cfg.train.deepspeed.precision = "bf16"
        cfg.train.stage1.output = str(tmp_path / name)
        t = Trainer(cfg, 1)
        t.train()
        size[name] = _bytes(tmp_path / name / "checkpoints" / "step-00000002")
        frozen[name] = sum(p.numel() * p.element_size() for p in t.model.parameters() if not p.requires_grad)
        trained[name] = sum(p.numel() for p in t.model.parameters() if p.requires_grad)
    assert trained["small"] == trained["big"]
    assert frozen["big"] - frozen["small"] > 5_000_000  # 6.6 MB more frozen LLM weights (bf16)...
    assert abs(size["big"] - size["small"]) < 20_000  # ...and the checkpoint does not grow with them
    # bf16 weights (2 bytes), fp32 masters (4), Adam's two moments (8), fp32 EMA (4) per trained parameter
    expected = trained["small"] * (2 + 4 + 8 + 4)
    print(f"checkpoint {size['small']} bytes, trained state {expected} bytes, frozen LLM {frozen['big']} bytes")
    assert expected <= size["small"] < 1.02 * expected + 200_000, (size, expected)

    # Resuming with other frozen weights than the checkpoint was trained with stops, naming the setting.
    cfg = tiny_config(tiny_models, tmp_path, max_steps=3)
    cfg.train.model.llm = llms["big"]
    cfg.train.deepspeed.precision = "bf16"
    cfg.train.stage1.output = str(tmp_path / "small")
    with pytest.raises(ConfigError, match=r"frozen weights .*train\.model\.llm.*checkpoint\.resume=false"):
        Trainer(cfg, 1).train()
