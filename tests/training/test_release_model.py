"""The release's model and conditioning as the default; the projection / masked variants as options."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from train_fixtures import tiny_config, write_image_shards

from paradiffusion.config import ConfigError
from pipelines.config import load_config
from training.modeling import ParaDiffusionModel, build_model, load_llm, load_tokenizer, tokenize
from training.pipeline import ParaDiffusionPipeline, model_settings


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory) -> str:
    from paradiffusion.testing.tiny_diffusion import build_tiny_release

    return build_tiny_release(tmp_path_factory.mktemp("tiny_release"))


def test_release_conditioning_pads_with_eos_to_max_length(tiny_models):
    tok = load_tokenizer(tiny_models["llm"])
    ids, mask = tokenize(tok, ["", "A red fox in the snow.", "word " * 400], 256)
    assert ids.shape == mask.shape == (3, 256)
    assert ids[0, 0] == tok.bos_token_id and bool((ids[0, 1:] == tok.eos_token_id).all())  # "" -> <s> + 255 </s>
    assert mask[0].tolist() == [1] + [0] * 255
    n = int(mask[1].sum())
    assert 3 < n < 20 and bool((ids[1, n:] == tok.eos_token_id).all())
    assert int(mask[2].sum()) == 256 and ids[2, -1] != tok.eos_token_id  # cut at 256, no EOS appended
    ids_m, mask_m = tokenize(tok, ["", "A red fox in the snow."], 256, "masked")
    assert ids_m.shape == (2, n) and torch.equal(ids_m[1], ids[1, :n])  # padded to the longest only
    with pytest.raises(ValueError, match="release, masked"):
        tokenize(tok, ["x"], 8, "padded")


def test_tokenizer_keeps_the_files_pretokenization(tiny_models):
    """transformers 5 rebuilds a Llama tokenizer's pre-tokenizer; the file's own (Llama-2's, the release's) wins."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    own = Tokenizer.from_file(str(Path(tiny_models["llm"]) / "tokenizer.json"))
    tok = load_tokenizer(tiny_models["llm"])
    texts = ["   three leading spaces", " one leading", "none", "tabs\tand\nnewlines", "Ünïcode ☃"]
    for text in texts:
        assert tok(text).input_ids == own.encode(text).ids, text
    rebuilt = AutoTokenizer.from_pretrained(tiny_models["llm"])
    assert rebuilt("   three leading spaces").input_ids != own.encode("   three leading spaces").ids, (
        "transformers now keeps tokenizer.json's pre-tokenization: load_tokenizer's fix can go"
    )


def test_unet_attends_to_padding_only_with_release_conditioning(tiny_models):
    from diffusers import UNet2DConditionModel

    tok = load_tokenizer(tiny_models["llm"])
    llm, unet = load_llm(tiny_models["llm"]), UNet2DConditionModel.from_pretrained(tiny_models["unet"])
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    short, long_ = tokenize(tok, ["a red fox"], 16), tokenize(tok, ["a red fox"], 32)  # same caption, more padding
    with torch.no_grad():
        out = {}
        for cond in ("release", "masked"):
            m = ParaDiffusionModel(llm, None, unet, conditioning=cond).eval()
            out[cond] = (m(x, t, *short), m(x, t, *long_))
    assert torch.allclose(*out["masked"], atol=1e-5)  # the mask hides the extra padding
    assert (out["release"][0] - out["release"][1]).abs().max() > 1e-3  # the release attends to it


def test_config_defaults_are_the_releases(tmp_path):
    from training.config import DEFAULT_UNET

    f = tmp_path / "p.yaml"
    f.write_text("{}\n")
    cfg = load_config([f])
    assert cfg.train.model.text_projection == "none" and cfg.train.model.conditioning == "release"
    assert DEFAULT_UNET["cross_attention_dim"] == 4096 and "addition_embed_type" not in DEFAULT_UNET
    assert (cfg.generate.width, cfg.generate.height) == (1024, 640)
    assert cfg.train.model.llm_dtype == "float32"  # the LLM computes text states in fp32, as the release samples
    assert cfg.generate.llm_dtype is None and cfg.generate.conditioning is None  # None: as the model was trained
    for override, needle in [
        ("train.model.conditioning=padded", "'release', 'masked'"),
        ("train.model.text_projection=mlp", "'none', 'linear'"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            load_config([f], [override])
    yaml_cfg = load_config([Path(__file__).resolve().parents[2] / "pipelines.yaml"])
    assert (yaml_cfg.generate.width, yaml_cfg.generate.height) == (1024, 640)
    assert (yaml_cfg.eval.models["paradiffusion"].width, yaml_cfg.eval.models["paradiffusion"].height) == (1024, 640)


def test_no_projection_needs_matching_widths(tiny_models, tmp_path):
    cfg = tiny_config(tiny_models, tmp_path)
    cfg.train.model.unet = tiny_models["unet_projection"]  # cross-attention 32, LLM 64
    with pytest.raises(ValueError, match=r"text_projection: none .* cross_attention_dim \(32\) .* hidden size \(64\)"):
        build_model(cfg.train, cfg.train.stage1)
    cfg.train.model.text_projection = "linear"
    model, _ = build_model(cfg.train, cfg.train.stage1)
    assert model.has_projection and (model.projection.in_features, model.projection.out_features) == (64, 32)
    cfg.train.model.unet = tiny_models["unet"]
    cfg.train.model.text_projection = "none"
    model, _ = build_model(cfg.train, cfg.train.stage1)
    assert not model.has_projection and list(model.projection.parameters()) == []


@pytest.fixture(scope="module")
def exports(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """One-step stage-1 exports of both variants: release (default) and projection + masked."""
    from training.trainer import Trainer

    root = tmp_path_factory.mktemp("variants")
    write_image_shards(root / "images", n_shards=1, per_shard=4)
    out = {}
    for name in ("release", "projection"):
        cfg = tiny_config(tiny_models, root, max_steps=1, **{"ema.enabled": False})
        cfg.train.stage1.output = str(root / name)
        if name == "projection":
            cfg.train.model.unet = tiny_models["unet_projection"]
            cfg.train.model.text_projection = "linear"
            cfg.train.model.conditioning = "masked"
        Trainer(cfg, 1).train()
        out[name] = root / name / "export"
    return out


def test_exports_record_how_they_condition(exports):
    rel, proj = (json.loads((exports[k] / "paradiffusion.json").read_text()) for k in ("release", "projection"))
    assert (rel["conditioning"], rel["text_projection"], rel["max_length"]) == ("release", "none", 256)
    assert not (exports["release"] / "text_projection").exists()
    assert (proj["conditioning"], proj["text_projection"]) == ("masked", "linear")
    assert (exports["projection"] / "text_projection" / "model.safetensors").is_file()
    for k, doc in (("release", rel), ("projection", proj)):
        pipe = ParaDiffusionPipeline.from_pretrained(str(exports[k]), device="cpu")
        assert (pipe.max_length, pipe.conditioning) == (doc["max_length"], doc["conditioning"])


def test_an_export_from_before_format_2_keeps_masked_conditioning(tmp_path):
    (tmp_path / "paradiffusion.json").write_text(json.dumps({"llm": "x", "vae": "y", "max_length": 512}))
    assert model_settings(tmp_path) == {
        "max_length": 512,
        "conditioning": "masked",
        "text_projection": "linear",
        "llm_dtype": "float32",  # not recorded then: fp32, as generate sampled it
    }
    assert model_settings(tmp_path / "official")["conditioning"] == "release"  # no paradiffusion.json


def test_official_layout_gets_the_release_settings(tiny_release):
    pipe = ParaDiffusionPipeline.from_pretrained(tiny_release, device="cpu", torch_dtype=torch.bfloat16)
    assert (pipe.max_length, pipe.conditioning, pipe.projection) == (256, "release", None)
    assert next(pipe.llm.parameters()).dtype == torch.float32 and pipe.unet.dtype == torch.bfloat16
    sc = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert (sc.steps_offset, sc.clip_sample, sc.final_sigmas_type) == (1, False, "sigma_min")  # the file says 0, true
    params = inspect.signature(ParaDiffusionPipeline.__call__).parameters
    assert (params["width"].default, params["height"].default) == (1024, 640)
    assert (params["num_inference_steps"].default, params["guidance_scale"].default) == (100, 7.5)
    images = pipe("a red fox", width=16, height=8, num_inference_steps=2)
    assert images[0].size == (16, 8)


def test_eval_and_generate_sample_every_layout(exports, tiny_release, tmp_path):
    """eval's paradiffusion loader and `paradiffusion generate` with both export variants and the release layout."""
    from eval.config import ModelConfig
    from eval.models import load_model
    from pipelines.config import PipelinesConfig
    from training.generate import generate

    for path in (exports["release"], exports["projection"], tiny_release):
        mc = ModelConfig(kind="paradiffusion", path=str(path), dtype="fp32", width=24, height=16, steps=2)
        images = load_model("m", mc, "cpu")(["a red fox", "a blue car"], [0, 1])
        assert [im.size for im in images] == [(24, 16), (24, 16)]
    cfg = PipelinesConfig.model_validate(
        {
            "project": {"data_root": str(tmp_path)},
            "generate": {"model": tiny_release, "width": 24, "height": 16, "num_inference_steps": 2},
        }
    )
    from PIL import Image

    (png,) = generate(cfg, ["a red fox"])
    params = json.loads(Image.open(png).text["parameters"])
    assert (params["max_length"], params["conditioning"], params["width"], params["height"]) == (256, "release", 24, 16)


def test_lora_config_stays_readable_by_the_releases_peft(tiny_models, tmp_path):
    """peft 0.7 builds LoraConfig(**adapter_config.json): only its keys may stay, unless one matters."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from training.modeling import PEFT_07_LORA_FIELDS, add_lora, make_lora_config_portable

    add_lora(load_llm(tiny_models["llm"]), 4, 8, 0.0, ["q_proj", "v_proj"]).save_pretrained(str(tmp_path / "a"))
    assert make_lora_config_portable(tmp_path / "a") == []
    doc = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert set(doc) <= PEFT_07_LORA_FIELDS and (doc["r"], doc["lora_alpha"]) == (4, 8)
    loaded = PeftModel.from_pretrained(load_llm(tiny_models["llm"]), str(tmp_path / "a"))
    assert loaded.peft_config["default"].r == 4 and not loaded.peft_config["default"].use_rslora
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_rslora=True)
    get_peft_model(load_llm(tiny_models["llm"]), cfg).save_pretrained(str(tmp_path / "b"))
    assert make_lora_config_portable(tmp_path / "b") == ["use_rslora"]  # it changes the scaling: kept, reported
