"""The NSFW head equals LAION's Keras architecture on tiny random weights, and the filter uses it.

The reference is built here in Keras 3 (torch backend) with the layers of LAION-AI/CLIP-based-
NSFW-Detector's ``clip_autokeras_binary_nsfw`` (commit d6bb8fe, MIT): Normalization -> Dense 64
-> ReLU -> Dense 512 -> ReLU -> Dropout -> Dense 256 -> ReLU -> Dropout -> Dense 1 -> sigmoid.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras", reason="keras (the dev extra) builds the reference architecture")

from curation.safety.nsfw import NSFWHead, load_nsfw, state_dict_from_keras  # noqa: E402


def reference_model(dim: int, seed: int):
    """The detector's Keras architecture with random weights (spread so outputs cover 0..1)."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(0, 0.05, dim).astype(np.float32)
    var = rng.uniform(0.0005, 0.01, dim).astype(np.float32)
    inp = keras.Input((dim,))
    x = keras.layers.Normalization(mean=mean, variance=var)(inp)
    x = keras.layers.ReLU()(keras.layers.Dense(64)(x))
    x = keras.layers.ReLU()(keras.layers.Dense(512)(x))
    x = keras.layers.Dropout(0.5)(x)
    x = keras.layers.ReLU()(keras.layers.Dense(256)(x))
    x = keras.layers.Dropout(0.5)(x)
    out = keras.layers.Activation("sigmoid", name="classification_head_1")(keras.layers.Dense(1)(x))
    model = keras.Model(inp, out)
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dense):
            n_in, n_out = layer.kernel.shape
            layer.set_weights(
                [
                    rng.normal(0, 1.5 / np.sqrt(n_in), (n_in, n_out)).astype(np.float32),
                    rng.normal(0, 0.1, n_out).astype(np.float32),
                ]  # fmt: skip
            )
    return model


@pytest.mark.parametrize("dim", [32, 768])
def test_the_torch_head_equals_the_keras_reference(dim, tmp_path):
    model = reference_model(dim, seed=dim)
    x = np.random.default_rng(1).normal(size=(256, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    want = np.asarray(model.predict(x, verbose=0)).reshape(-1)
    head = NSFWHead(dim)
    head.load_state_dict(state_dict_from_keras(model))
    got = head.score(x)
    assert want.std() > 0.1  # the outputs spread over 0..1: the comparison means something
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)

    # through the file the filter reads
    from safetensors.torch import save_file

    save_file(state_dict_from_keras(model), tmp_path / "nsfw.safetensors")
    np.testing.assert_allclose(load_nsfw(str(tmp_path / "nsfw.safetensors")).score(x), want, rtol=0, atol=1e-5)


def test_the_converter_refuses_another_architecture():
    inp = keras.Input((8,))
    model = keras.Model(inp, keras.layers.Dense(1)(keras.layers.Normalization(mean=0.0, variance=1.0)(inp)))
    with pytest.raises(ValueError, match="1 Dense layers"):
        state_dict_from_keras(model)


def test_a_zero_variance_is_floored_like_keras():
    dim = 8
    model = reference_model(dim, seed=3)
    sd = state_dict_from_keras(model)
    model.layers[1].variance = keras.ops.convert_to_tensor(np.zeros((1, dim), np.float32))  # Keras's own floor
    sd["variance"] = torch.zeros(dim)
    head = NSFWHead(dim)
    head.load_state_dict(sd)
    x = np.asarray(model.layers[1].mean, np.float32).reshape(1, dim) + 1e-9  # near the mean: finite either way
    np.testing.assert_allclose(
        head(torch.from_numpy(x)).detach().numpy(), np.asarray(model.predict(x, verbose=0)).reshape(-1), atol=1e-5
    )
