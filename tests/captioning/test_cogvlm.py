"""Native CogVLM / CogVLM2: names at real size, checked loading, the captioner on tiny instances."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

DATA = Path(__file__).parent / "data"
NAMES = json.loads((DATA / "cogvlm_checkpoint_names.json").read_text())


# --------------------------------------------------------------------------- names at real size
def _meta_state(config) -> dict[str, tuple[int, ...]]:
    from captioning.cogvlm.loading import expected_tensors

    return expected_tensors(config)


def test_cogvlm2_names_and_size_match_the_published_index():
    """Every name of cogvlm2-llama3-chat-19B's index, and its total size, from our model built on meta."""
    from captioning.cogvlm.configuration import CogVLM2Config

    published = NAMES["cogvlm2-llama3-chat-19B"]
    ours = _meta_state(CogVLM2Config())  # defaults = the published config
    assert sorted(ours) == published["names"], (
        f"missing: {sorted(set(published['names']) - set(ours))[:5]}, extra: {sorted(set(ours) - set(published['names']))[:5]}"
    )
    # The index has no shapes; its total size (bf16, 2 bytes a value) pins them down together.
    assert sum(torch.Size(s).numel() for s in ours.values()) * 2 == published["total_size_bytes"]
    # and a few shapes derived from the config: GQA 32 query + 2 x 8 KV heads of 128
    assert ours["model.layers.0.self_attn.language_expert_query_key_value.weight"] == (6144, 4096)
    assert ours["model.layers.0.self_attn.vision_expert_query_key_value.bias"] == (6144,)
    assert ours["model.vision.patch_embedding.position_embedding.weight"] == (9217, 1792)
    assert ours["model.vision.conv.weight"] == (1792, 1792, 2, 2)
    assert ours["model.vision.linear_proj.dense_h_to_4h.weight"] == (14336, 4096)
    assert ours["lm_head.weight"] == (128256, 4096)


def test_cogvlm_chat_names_match_and_shapes_follow_its_config():
    """cogvlm-chat-hf: the derived name list (see its source in the data file) and config-derived shapes."""
    from captioning.cogvlm.configuration import CogVLMConfig

    expected = NAMES["cogvlm-chat-hf"]["names"]
    ours = _meta_state(CogVLMConfig())
    assert sorted(ours) == expected
    assert ours["model.layers.31.self_attn.language_expert_query_key_value.weight"] == (3 * 4096, 4096)
    assert ours["model.layers.0.mlp.vision_mlp.gate_proj.weight"] == (11008, 4096)
    assert ours["model.vision.patch_embedding.proj.weight"] == (1792, 3, 14, 14)
    assert ours["model.vision.patch_embedding.position_embedding.weight"] == (1226, 1792)
    assert ours["model.vision.transformer.layers.62.mlp.fc1.weight"] == (15360, 1792)
    assert ours["model.vision.linear_proj.linear_proj.weight"] == (4096, 1792)
    assert ours["model.embed_tokens.weight"] == (32000, 4096)
    assert CogVLMConfig().vision_tokens == 35 * 35 + 2
    # cogvlm-base-224-hf: the same names, 16 x 16 patches
    small = CogVLMConfig(vision_config={**CogVLMConfig().vision_config, "image_size": 224, "num_positions": 257})
    assert sorted(_meta_state(small)) == expected and small.vision_tokens == 16 * 16 + 2


# --------------------------------------------------------------------------- checked loading
@pytest.fixture(scope="module")
def tiny_cog(tmp_path_factory) -> str:
    from paradiffusion.testing.tiny_cogvlm import build_tiny_cogvlm

    return build_tiny_cogvlm(tmp_path_factory.mktemp("cog") / "tiny_cogvlm", "cogvlm")


@pytest.fixture(scope="module")
def tiny_cog2(tmp_path_factory) -> str:
    from paradiffusion.testing.tiny_cogvlm import build_tiny_cogvlm

    return build_tiny_cogvlm(tmp_path_factory.mktemp("cog2") / "tiny_cogvlm2", "cogvlm2")


def _copy(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_shard_is_named(tiny_cog, tmp_path):
    from captioning.cogvlm.loading import CheckpointError, load_model

    folder = _copy(tiny_cog, tmp_path / "m")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(
        CheckpointError, match=rf"shard\(s\) named in model.safetensors.index.json are missing: {shard.name}"
    ):
        load_model(str(folder))


def test_unexpected_and_missing_names_are_named(tiny_cog, tiny_cog2, tmp_path):
    from captioning.cogvlm.loading import CheckpointError, load_model

    # a CogVLM2 checkpoint under a v1 config.json: the GQA/bias/conv tensors do not fit
    folder = _copy(tiny_cog2, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["num_multi_query_heads"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        load_model(str(folder))
    assert "unexpected parameter(s): model.layers.0.self_attn.vision_expert_query_key_value.bias" in str(err.value)
    # a renamed tensor: one missing, one unexpected, both named
    from safetensors.torch import load_file, save_file

    folder = _copy(tiny_cog, tmp_path / "r")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = "model.norm.weight"
    shard = folder / index["weight_map"].pop(name)
    tensors = load_file(str(shard))
    tensors["model.final_norm.weight"] = tensors.pop(name)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index["weight_map"]["model.final_norm.weight"] = shard.name
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError,
        match=r"1 missing parameter\(s\): model.norm.weight; 1 unexpected parameter\(s\): model.final_norm.weight",
    ):
        load_model(str(folder))


def test_wrong_shape_is_named(tiny_cog, tmp_path):
    from captioning.cogvlm.loading import CheckpointError, load_model

    folder = _copy(tiny_cog, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="wrong shape, first model.layers.0.mlp.language_mlp.down_proj.weight"):
        load_model(str(folder))


def test_loaded_model_round_trips_through_save_pretrained(tiny_cog2, tmp_path):
    from captioning.cogvlm.loading import load_model

    model = load_model(tiny_cog2, dtype=torch.float32)
    model.save_pretrained(str(tmp_path / "again"))
    cfg = json.loads((tmp_path / "again" / "config.json").read_text())
    assert cfg["num_multi_query_heads"] == 2 and "vision_config" in cfg
    again = load_model(str(tmp_path / "again"), dtype=torch.float32)
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k


# --------------------------------------------------------------------------- the captioner
def _images():
    from PIL import Image

    specs = [((40, 30), (220, 20, 20)), ((30, 50), (20, 20, 220)), ((64, 64), (20, 200, 20)), ((90, 30), (5, 5, 5))]
    return [Image.new("RGB", size, colour) for size, colour in specs]


@pytest.mark.parametrize("which", ["tiny_cog", "tiny_cog2"])
def test_captioner_batched_equals_one_at_a_time(which, request):
    from captioning.captioners import CogVLMCaptioner, load_captioner
    from captioning.config import CaptionerSpec, GenerationSettings

    folder = request.getfixturevalue(which)
    cap = load_captioner(
        CaptionerSpec(type="cogvlm", model=folder, dtype="float32", device="cpu"), GenerationSettings(max_new_tokens=10)
    )
    assert isinstance(cap, CogVLMCaptioner) and cap.model.config.is_cogvlm2 == (which == "tiny_cog2")
    imgs = _images()
    batched = cap.caption(imgs, "Describe the image in detail.")
    single = [cap.caption([im], "Describe the image in detail.")[0] for im in imgs]
    assert [r.error for r in batched] == [None] * 4
    assert [r.caption for r in batched] == [r.caption for r in single]
    assert len({r.caption for r in batched}) > 1, "different images, different captions"
    assert all(r.finish_reason == "length" and r.n_tokens == 10 for r in batched)


def test_captioner_templates_change_the_prompt(tiny_cog):
    from captioning.captioners import load_captioner
    from captioning.config import CaptionerSpec, GenerationSettings

    caps = {
        t: load_captioner(
            CaptionerSpec(type="cogvlm", model=tiny_cog, dtype="float32", device="cpu", template_version=t),
            GenerationSettings(max_new_tokens=4),
        )
        for t in ("base", "chat")
    }
    rows = {t: c.processor.row(_images()[0], "describe the image") for t, c in caps.items()}
    assert len(rows["chat"]["input_ids"]) > len(rows["base"]["input_ids"])


def test_unknown_template_is_a_config_error():
    from paradiffusion.config import ConfigError
    from pipelines.config import load_config

    with pytest.raises(ConfigError) as err:
        load_config([], ["caption.captioners.cogvlm.template_version=chatty"])
    assert "'chat', 'vqa', 'base', 'chat_old'" in str(err.value)


def test_native_type_refuses_remote_code():
    from captioning.config import CaptionerSpec

    with pytest.raises(ValueError, match="never remote code"):
        CaptionerSpec(type="cogvlm", model="THUDM/cogvlm-chat-hf", trust_remote_code=True)


def test_remote_opt_in_needs_pinned_model_and_tokenizer(tmp_path):
    from captioning.captioners import check_pinned
    from captioning.config import CaptionerSpec

    sha = "0" * 40
    with pytest.raises(ValueError, match="commit SHA"):
        check_pinned(
            CaptionerSpec(type="cogvlm_remote", model="THUDM/cogvlm-chat-hf", tokenizer="lmsys/vicuna-7b-v1.5")
        )
    with pytest.raises(ValueError, match="tokenizer_revision"):
        check_pinned(
            CaptionerSpec(
                type="cogvlm_remote", model="THUDM/cogvlm-chat-hf", revision=sha, tokenizer="lmsys/vicuna-7b-v1.5"
            )
        )
    with pytest.raises(ValueError, match="tokenizer_revision 'main'"):
        CaptionerSpec(
            type="cogvlm_remote", model="THUDM/x-y", revision=sha, tokenizer="lmsys/v", tokenizer_revision="main"
        )
    check_pinned(
        CaptionerSpec(
            type="cogvlm_remote",
            model="THUDM/cogvlm-chat-hf",
            revision=sha,
            tokenizer="lmsys/vicuna-7b-v1.5",
            tokenizer_revision=sha,
        )
    )
    check_pinned(CaptionerSpec(type="cogvlm_remote", model=str(tmp_path)))  # a local folder: what is there runs
    check_pinned(CaptionerSpec(type="cogvlm", model="THUDM/cogvlm-chat-hf"))  # native: nothing remote to pin


def test_caption_rows_record_the_commit_the_model_resolved_to(tmp_path):
    """The driver resolves the captioner (and tokenizer) to commits; rows, shard names and actors use them."""
    from captioning.captioners import pin_to_resolved
    from captioning.config import CaptionConfig, CaptionerSpec
    from captioning.pipeline import ChunkWriter, set_identity
    from captioning.prep import tag_prefix
    from paradiffusion import hub
    from paradiffusion.config import ModelsConfig
    from paradiffusion.schemas import CAPTIONS
    from paradiffusion.stage import StageSummary
    from paradiffusion.storage import Table

    model_sha, tok_sha = "c" * 40, "d" * 40
    for repo, sha in (("THUDM/cogvlm-chat-hf", model_sha), ("lmsys/vicuna-7b-v1.5", tok_sha)):
        storage = tmp_path / "cache" / "hub" / ("models--" + repo.replace("/", "--"))
        (storage / "snapshots" / sha).mkdir(parents=True)
        (storage / "snapshots" / sha / "config.json").write_text("{}")
        (storage / "snapshots" / sha / "model.safetensors").write_text("x")
        (storage / "snapshots" / sha / "tokenizer.model").write_text("x")
        (storage / "refs").mkdir()
        (storage / "refs" / "main").write_text(sha)
    spec = CaptionerSpec(type="cogvlm", model="THUDM/cogvlm-chat-hf", tokenizer="lmsys/vicuna-7b-v1.5")
    c = CaptionConfig(captioner="cog", captioners={"cog": spec})
    assert pin_to_resolved(c).spec.revision is None  # nothing resolved: the config as it is
    mcfg = ModelsConfig(cache_dir=str(tmp_path / "cache"), offline=True)
    refs = [
        hub.model_ref("caption.captioners.cog.model", spec.model),
        hub.model_ref("caption.captioners.cog.tokenizer", spec.tokenizer, layout=("tokenizer",)),
    ]
    with hub.run_environment(mcfg):
        hub.resolve_for_run(mcfg, refs)
        pinned = pin_to_resolved(c)
    assert (pinned.spec.revision, pinned.spec.tokenizer_revision) == (model_sha, tok_sha)
    assert c.spec.revision is None, "the config itself is left as it was"
    ident = set_identity("cog", pinned)
    writer = ChunkWriter(Table(str(tmp_path / "captions"), CAPTIONS), [], pinned, StageSummary("caption"), ident)
    assert writer.common["model_revision"] == model_sha
    assert tag_prefix(pinned.spec.model, pinned.spec.revision, "p" * 8).endswith(f".{model_sha[:10]}.pppppppp.")


@pytest.mark.parametrize("keep", [0.5, 0.001])  # data cut off; header cut off
def test_truncated_shard_is_one_line_naming_the_file(tiny_cog, tmp_path, keep):
    from captioning.cogvlm.loading import CheckpointError, load_model

    folder = _copy(tiny_cog, tmp_path / "m")
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: max(4, int(len(data) * keep))])
    with pytest.raises(CheckpointError) as err:
        load_model(str(folder))
    assert str(shard) in str(err.value) and "\n" not in str(err.value)
