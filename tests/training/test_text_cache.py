"""The text-embedding cache: what it stores, training from it gives the LLM's losses, stale caches stop."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from train_fixtures import tiny_config, write_image_shards

from paradiffusion.config import ConfigError
from training.text_cache import TextCache, cache_text, text_hash
from training.trainer import Trainer


def test_padding_states_depend_on_the_caption(tiny_models):
    """Why a release-conditioning row holds the whole padded sequence: the LLM's state at an EOS
    padding position attends (causally) to the caption's tokens, so it differs from caption to
    caption and cannot be rebuilt from one shared padding state. The caption's own tokens do not
    see the padding: masked conditioning can keep only them."""
    from training.modeling import load_llm, load_tokenizer, tokenize

    tok, llm = load_tokenizer(tiny_models["llm"]), load_llm(tiny_models["llm"])
    captions = ["a red fox", "a blue car"]
    with torch.no_grad():
        ids, mask = tokenize(tok, captions, 32, "release")
        padded = llm(input_ids=ids, attention_mask=mask).last_hidden_state
        ids_m, mask_m = tokenize(tok, captions, 32, "masked")
        short = llm(input_ids=ids_m, attention_mask=mask_m).last_hidden_state
    n = mask.sum(1)
    assert int(n.max()) < 20  # both captions end well before position 20: 20..31 are padding in both
    assert torch.equal(ids[0, 20:], ids[1, 20:])  # the same EOS tokens at the same positions...
    assert (padded[0, 20:] - padded[1, 20:]).abs().amax(dim=-1).min() > 1e-2  # ...different states at every one
    assert (padded[0, 20] - padded[0, 21]).abs().max() > 1e-4  # and not one state repeated along the padding
    for i in range(2):  # the caption's tokens: the same with 32 or with the batch's longest
        k = int(n[i])
        assert torch.allclose(padded[i, :k], short[i, :k], atol=1e-6)


def _losses(t: Trainer) -> list[float]:
    return [loss for _, loss in t.history]


def _with_cache(cfg, stage: int, url) -> object:
    c = cfg.model_copy(deep=True)
    c.train.stage(stage).data.text_cache = str(url)
    return c


@pytest.mark.parametrize("variant", ["release", "masked+projection"])
def test_training_from_the_cache_gives_the_llms_losses(tiny_models, tmp_path, variant):
    """fp32: stage 1 trained from the cache has the losses of stage 1 running the LLM (caption
    dropout on, so the cached "" is used), without loading the LLM; a run checkpointed with the
    LLM resumes from the cache (same frozen weights) and continues with the same losses."""
    write_image_shards(tmp_path / "images", n_shards=2, per_shard=5)
    cfg = tiny_config(tiny_models, tmp_path, max_steps=4, caption_dropout=0.5)
    cfg.train.stage1.max_length = 32
    if variant != "release":
        cfg.train.model.conditioning = "masked"
        cfg.train.model.text_projection = "linear"
        cfg.train.model.unet = tiny_models["unet_projection"]
    import json

    import yaml

    from pipelines.cli import main

    f = tmp_path / "cfg.yaml"
    f.write_text(yaml.safe_dump(_with_cache(cfg, 1, tmp_path / "tc").model_dump(mode="json")))
    assert main(["cache-text", "--stage", "1", "--config", str(f), "--batch-size", "3"]) == 0
    s = json.loads((tmp_path / "tc" / "_summary.json").read_text())
    assert s["in"] == s["out"] == 4 + 1 + 2  # the 4 alt texts, "" and the 2 validation prompts

    def run(name: str, cached: bool, steps: int = 4) -> Trainer:
        c = _with_cache(cfg, 1, tmp_path / "tc") if cached else cfg.model_copy(deep=True)
        c.train.stage1.output = str(tmp_path / name)
        c.train.stage1.max_steps = steps
        t = Trainer(c, 1)
        t.train()
        return t

    fly, cached = run("fly", False), run("cached", True)
    assert cached.model.llm is None and cached.tokenizer is None  # the LLM was never loaded
    assert [s for s, _ in cached.history] == [1, 2, 3, 4]
    assert _losses(cached) == pytest.approx(_losses(fly), rel=1e-6, abs=1e-7)
    run("mixed", False, steps=2)
    resumed = run("mixed", True)
    assert resumed.summary.extra["resumed_from"] == "step-00000002"
    assert _losses(resumed) == pytest.approx(_losses(fly)[2:], rel=1e-6, abs=1e-7)
    info = json.loads((tmp_path / "cached" / "export" / "paradiffusion.json").read_text())
    assert info["llm"] == tiny_models["llm"]  # the export names the LLM it was never given


def _small_table(path, keys) -> dict[str, list[str]]:
    """A ParaImage-Small table written with annotations.train_rule: each (several texts per key)."""
    texts = {k: [f"First annotator describes {k}.", f"Second annotator writes about {k} at length."] for k in keys[:3]}
    texts.update({k: [f"Only text of {k}."] for k in keys[3:5]})
    rows = [{"key": k, "caption": c, "annotator": f"a{i}"} for k, cs in texts.items() for i, c in enumerate(cs)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return texts


def test_stage3_cache_merges_the_lora_resumes_and_stops_when_stale(tiny_models, tmp_path, monkeypatch):
    """Stage 3 from the official release's layout (its LoRA merged into the LLM): the cache holds
    every approved text of a key; training from it gives the losses of the merged LLM; a killed
    cache-text resumes without duplicates; a new caption, another LoRA, length or conditioning stop."""
    from paradiffusion.testing.tiny_diffusion import build_tiny_release

    release = build_tiny_release(tmp_path / "release")
    keys = write_image_shards(tmp_path / "images", n_shards=2, per_shard=3)
    texts = _small_table(tmp_path / "small.parquet", keys)
    cfg = tiny_config(tiny_models, tmp_path, max_steps=3, caption_dropout=0.3)
    cfg.train.model.llm = f"{release}/Llama-2-7b-hf"
    cfg.train.stage3.init_from = release
    cfg.train.stage3.data.captions = str(tmp_path / "small.parquet")
    url = tmp_path / "tc3"
    cached_cfg = _with_cache(cfg, 3, url)

    import training.text_cache as tc

    real_write, calls = tc._write, []

    def dies_second_time(out, shard, rows):
        calls.append(shard)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while writing the second shard
        return real_write(out, shard, rows)

    monkeypatch.setattr(tc, "_write", dies_second_time)
    with pytest.raises(KeyboardInterrupt):
        cache_text(cached_cfg, 3, batch_size=2)
    monkeypatch.setattr(tc, "_write", real_write)
    s = cache_text(cached_cfg, 3, batch_size=2)
    n_texts = sum(len(v) for v in texts.values()) + 1 + 2  # every approved text, "" and the validation prompts
    assert s.extra["texts_cached_before"] + s.n_out == n_texts and 0 < s.extra["texts_cached_before"] < n_texts
    cache = TextCache(str(url))
    assert len(cache) == n_texts  # nothing twice
    assert not cache.missing([c for cs in texts.values() for c in cs] + [""])
    x, n = cache.states("")
    assert x.shape == (32, 64) and x.dtype == torch.float32 and n == 1  # release: <s> + 31 EOS positions, all kept
    assert s.extra["bytes_per_text"] == 32 * 64 * 4
    assert cache_text(cached_cfg, 3).n_out == 0  # complete: nothing to do

    def run(c, name):
        c = c.model_copy(deep=True)
        c.train.stage3.output = str(tmp_path / name)
        t = Trainer(c, 3)
        t.train()
        return t

    fly, cached = run(cfg, "fly"), run(cached_cfg, "cached")
    assert cached.model.llm is None
    assert _losses(cached) == pytest.approx(_losses(fly), rel=1e-6, abs=1e-7)  # the LoRA was merged as stage 3 does
    assert (tmp_path / "cached" / "export" / "text_encoder_lora").is_dir()  # carried to the export as before

    # A new approved text: training stops and names the fix; cache-text adds just that one.
    texts[keys[4]].append("A third text, approved later.")
    rows = [{"key": k, "caption": c} for k, cs in texts.items() for c in cs]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "small.parquet")
    with pytest.raises(ConfigError, match=r"1 of the stage's .* captions are not in it.*make cache-text STAGE=3"):
        Trainer(cached_cfg, 3).setup()
    assert cache_text(cached_cfg, 3).n_out == 1

    # Another stage-2 LoRA merged into the LLM, another length or conditioning: the cache is stale.
    other = tmp_path / "release2"
    shutil.copytree(release, other)
    from safetensors.torch import load_file, save_file

    f = other / "text_encoder_lora" / "adapter_model.safetensors"
    save_file({k: v * 1.5 for k, v in load_file(str(f)).items()}, str(f))
    bad = cached_cfg.model_copy(deep=True)
    bad.train.stage3.init_from = str(other)
    with pytest.raises(ConfigError, match=r"train\.stage3\.init_from \(the stage-2 LoRA"):
        Trainer(bad, 3).setup()
    with pytest.raises(ConfigError, match=r"init_from"):
        cache_text(bad, 3)  # nor can it be added to
    bad = cached_cfg.model_copy(deep=True)
    bad.train.stage3.max_length = 24
    with pytest.raises(
        ConfigError, match=r"train\.stage3\.max_length: the text cache .* made with 32, this run has 24"
    ):
        Trainer(bad, 3).setup()
    bad = cached_cfg.model_copy(deep=True)
    bad.train.model.conditioning = "masked"
    with pytest.raises(ConfigError, match=r"train\.model\.conditioning"):
        Trainer(bad, 3).setup()


def test_stage2_cannot_use_a_text_cache_and_the_cli_does_not_fetch_the_llm(tiny_models, tmp_path):
    from pipelines.config import load_config
    from training.cli import train_models

    f = tmp_path / "p.yaml"
    f.write_text("{}\n")
    with pytest.raises(ConfigError, match=r"stage2\.data\.text_cache: this stage trains the LLM's LoRA"):
        load_config([f], ["train.stage2.data.text_cache=/x"])
    cfg = load_config([f], ["train.stage3.data.text_cache=/x"])

    class Args:
        stage = 3

    assert "train.model.llm" not in [r.setting for r in train_models(cfg, Args())]
    Args.stage = 1
    assert "train.model.llm" in [r.setting for r in train_models(cfg, Args())]
    assert text_hash("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
