"""Captioners on tiny local models: the transformers-native path and the shared batching logic.

The native CogVLM captioner has its own tests in test_cogvlm.py and test_cogvlm_parity.py.
"""

import pytest
from caption_fixtures import COLOURS
from PIL import Image

from captioning.captioners import CAPTIONERS, Captioner, CaptionResult, check_pinned, finish_of, load_captioner
from captioning.config import CaptionerSpec, GenerationSettings
from paradiffusion.config import ConfigError
from paradiffusion.deps import MissingDependency
from pipelines.config import load_config


def images(n=5):
    names = list(COLOURS)
    sizes = [(40, 30), (30, 50), (64, 64), (90, 30), (33, 47)]
    return [Image.new("RGB", sizes[i % len(sizes)], COLOURS[names[i % len(names)]]) for i in range(n)], names


def test_finish_reason():
    assert finish_of([5, 6, 2, 0, 0], {2}, 0, 5) == (2, "stop")
    assert finish_of([5, 6, 7], {2}, 0, 3) == (3, "length")
    assert finish_of([5, 6, 0], {2}, 0, 3) == (2, "stop")  # ended early in a batch: padded, not truncated
    assert finish_of([], {2}, 0, 3) == (0, "stop")


def test_registry_names_match_config_choices():
    assert set(CAPTIONERS) == {"transformers", "cogvlm", "cogvlm_remote", "openai"}
    with pytest.raises(ConfigError) as err:
        load_config([], ["caption.captioners.cogvlm.type=vllm"])
    assert "'transformers', 'cogvlm', 'cogvlm_remote', 'openai'" in str(err.value)


def test_transformers_captioner_batched_equals_one_at_a_time(tiny_vlm):
    cap = load_captioner(
        CaptionerSpec(model=tiny_vlm, dtype="float32", device="cpu"), GenerationSettings(max_new_tokens=10)
    )
    imgs, _ = images(5)
    batched = cap.caption(imgs, "Describe the image in detail.")
    single = [cap.caption([im], "Describe the image in detail.")[0] for im in imgs]
    assert len(batched) == 5 and all(r.finish_reason in ("stop", "length") for r in batched)
    assert [r.caption for r in batched] == [r.caption for r in single]
    assert all(r.n_tokens <= 10 for r in batched)
    assert any(r.caption for r in batched)


def test_static_cache_path_runs(tiny_vlm):
    cap = load_captioner(
        CaptionerSpec(model=tiny_vlm, dtype="float32", device="cpu", cache="static"),
        GenerationSettings(max_new_tokens=6),
    )
    out = cap.caption(images(2)[0], "Describe.")
    assert len(out) == 2 and all(r.error is None for r in out)


def test_one_bad_image_costs_one_error(tiny_vlm):
    class Flaky(Captioner):
        def __init__(self):  # no model: only the batching/isolation logic is under test
            pass

        def _caption_batch(self, imgs, prompt):
            if any(im.width == 1 for im in imgs):
                raise RuntimeError("CUDA error: device-side assert")
            return [CaptionResult("fine", 1) for _ in imgs]

    imgs = [Image.new("RGB", (8, 8)), Image.new("RGB", (1, 1)), Image.new("RGB", (8, 8))]
    out = Flaky().caption(imgs, "p")
    assert [r.finish_reason for r in out] == ["stop", "error", "stop"]
    assert "device-side assert" in out[1].error


def test_quantization_without_bitsandbytes_says_what_to_install(tiny_vlm):
    pytest.importorskip("transformers")
    try:
        import bitsandbytes  # noqa: F401

        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    with pytest.raises(MissingDependency, match="bitsandbytes.*pip install"):
        load_captioner(CaptionerSpec(model=tiny_vlm, device="cpu", quantization="4bit"), GenerationSettings())


def test_remote_code_must_be_pinned():
    with pytest.raises(ValueError, match="commit SHA"):
        check_pinned(CaptionerSpec(model="org/vlm-with-remote-code", trust_remote_code=True))
    with pytest.raises(ValueError, match="40-hex"):
        CaptionerSpec(type="cogvlm_remote", model="THUDM/cogvlm-chat-hf", revision="main")
    check_pinned(CaptionerSpec(model="org/vlm-with-remote-code", trust_remote_code=True, revision="0" * 40))


def test_config_errors_name_the_choices():
    with pytest.raises(ConfigError, match=r"caption.captioner = 'nope'.*one of: cogvlm"):
        load_config([], ["caption.captioner=nope"])
    with pytest.raises(ConfigError, match=r"caption.prompt = 'long'.*one of: paper"):
        load_config([], ["caption.prompt=long"])
    with pytest.raises(ConfigError, match=r"quantization.*'none', '8bit', '4bit'"):
        load_config([], ["caption.captioners.cogvlm.quantization=3bit"])
    with pytest.raises(ConfigError, match=r"max_new_tokens.*>= 1"):
        load_config([], ["caption.generation.max_new_tokens=0"])
