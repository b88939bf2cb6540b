"""The tiny CLIP and aesthetic models, and the loaders the filter and eval share."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from curation.models import (
    AestheticPredictor,
    clip_input_size,
    clip_scores,
    clip_tokenizer,
    is_known_clip,
    load_aesthetic,
    load_clip,
)
from paradiffusion.testing.tiny_clip import build_tiny_clip

# The keys of the released sac+logos+ava1-l14-linearMSE.pth state dict.
LAION_KEYS = [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("models"))


def test_aesthetic_predictor_matches_the_laion_layout():
    sd = AestheticPredictor().state_dict()
    assert sorted(sd) == sorted(LAION_KEYS)
    assert sd["layers.0.weight"].shape == (1024, 768) and sd["layers.7.weight"].shape == (1, 16)


def test_tiny_clip_loads_offline_from_folder_and_local_dir(tiny):
    assert is_known_clip(tiny["clip_model"]) and clip_input_size(tiny["clip_model"]) == tiny["image_size"]
    a = load_clip(tiny["clip_model"], device="cpu")
    b = load_clip("local-dir:" + tiny["clip_model"], device="cpu")
    px = np.random.default_rng(0).integers(0, 255, (3, a.image_size, a.image_size, 3), dtype=np.uint8)
    ea, eb = a.encode_images(px), b.encode_images(px)
    assert ea.shape == (3, tiny["embed_dim"]) and np.allclose(ea, eb, atol=1e-5)  # same saved weights
    assert np.allclose(np.linalg.norm(ea, axis=1), 1.0, atol=1e-4)
    te = a.encode_texts(["a cat", "", "a very long caption " * 40])
    s = clip_scores(ea, te)
    assert s.shape == (3,) and np.all(np.abs(s) <= 1.0 + 1e-5)


def test_tokens_made_elsewhere_give_the_same_text_embeddings(tiny):
    clip = load_clip(tiny["clip_model"], device="cpu")
    texts = ["a cat on a mat", "", "un chat"]
    tokens = clip_tokenizer(tiny["clip_model"])(texts).numpy().astype(np.int32)
    assert np.allclose(clip.encode_tokens(tokens), clip.encode_texts(texts), atol=1e-6)


def test_encode_pil_uses_the_same_geometry(tiny):
    from PIL import Image

    clip = load_clip(tiny["clip_model"], device="cpu")
    px = np.random.default_rng(1).integers(0, 255, (2, clip.image_size, clip.image_size, 3), dtype=np.uint8)
    pil = [Image.fromarray(p) for p in px]
    assert np.allclose(clip.encode_pil(pil), clip.encode_images(px), atol=1e-4)


def test_build_is_deterministic_and_reused(tmp_path, tiny):
    again = build_tiny_clip(tmp_path / "other")
    a = torch.load(again["aesthetic"], weights_only=True)
    b = torch.load(tiny["aesthetic"], weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_load_aesthetic_infers_width_and_scores(tiny):
    model = load_aesthetic(tiny["aesthetic"], device="cpu")
    assert model.input_size == tiny["embed_dim"]
    scores = model.score(np.random.default_rng(0).normal(size=(4, tiny["embed_dim"])).astype(np.float32))
    assert scores.shape == (4,) and np.isfinite(scores).all()


class _Evil:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_load_aesthetic_refuses_pickled_objects_and_wrong_state_dicts(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"layers.0.weight": _Evil()}, evil)
    with pytest.raises(Exception, match="(?i)weights only|unsupported|global"):
        load_aesthetic(str(evil), device="cpu")
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(ValueError, match="layers.0.weight"):
        load_aesthetic(str(wrong), device="cpu")


def test_unknown_clip_names(tmp_path):
    assert not is_known_clip("ViT-Nope-99")
    assert not is_known_clip(str(tmp_path))  # a folder without open_clip_config.json
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        load_clip(str(tmp_path), device="cpu")
