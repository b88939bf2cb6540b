"""LAION's CLIP-based NSFW detector as a torch module, and the converter from its Keras weights.

Reference: LAION-AI/CLIP-based-NSFW-Detector (commit d6bb8fe31fd4aecbfed7dfb62df4fe5858bfc014,
MIT licence, Christoph Schuhmann), file ``clip_autokeras_binary_nsfw.zip``: an AutoKeras
model on the L2-normalised CLIP ViT-L/14 image embedding (768), 0..1 with 1 = NSFW. Its
layers: ``Normalization`` (per-feature mean and variance; Keras divides by
``max(sqrt(variance), epsilon=1e-7)``) -> Dense 64 -> ReLU -> Dense 512 -> ReLU -> Dense
256 -> ReLU -> Dense 1 -> sigmoid (AutoKeras' ``classification_head_1``); its Dropout
layers do nothing at inference. :class:`NSFWHead` computes the same function, and
``tests/curation/test_safety_nsfw.py`` proves it equal (<= 1e-5) to that architecture
built in Keras 3 on tiny random weights, converted by :func:`state_dict_from_keras`.

The published weights are a TensorFlow SavedModel, which only TensorFlow (+ autokeras)
loads; convert once, in an environment that has them, to a safetensors file the filter
reads (``filter.models.nsfw``)::

    python -m curation.safety.nsfw convert clip_autokeras_binary_nsfw/ nsfw_l14.safetensors

(``convert`` also takes a Keras 3 ``.keras`` / ``.h5`` file; it uses only the model's layers.)
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np
import torch
from torch import nn

#: Keras' backend.epsilon(): the floor of the standard deviation in ``Normalization``.
KERAS_EPSILON = 1e-7
HIDDEN = (64, 512, 256)


class NSFWHead(nn.Module):
    """The detector's layers in torch; ``input_size`` is the CLIP embedding width (768 for ViT-L/14)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.register_buffer("mean", torch.zeros(input_size))
        self.register_buffer("variance", torch.ones(input_size))
        dims = (input_size, *HIDDEN, 1)
        self.linear_1, self.linear_2, self.linear_3, self.linear_4 = (
            nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.variance.sqrt().clamp_min(KERAS_EPSILON)
        x = torch.relu(self.linear_1(x))
        x = torch.relu(self.linear_2(x))
        x = torch.relu(self.linear_3(x))
        return torch.sigmoid(self.linear_4(x)).squeeze(-1)

    @torch.inference_mode()
    def score(self, image_emb: np.ndarray | torch.Tensor) -> np.ndarray:
        """NSFW probability of each image from its (re-)L2-normalised CLIP embedding."""
        p = next(self.parameters())
        x = torch.as_tensor(image_emb).to(p.device, torch.float32)
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return self(x).float().cpu().numpy()


def state_dict_from_keras(model: Any) -> dict[str, torch.Tensor]:
    """The :class:`NSFWHead` state dict of a Keras model of the detector's architecture
    (tf.keras 2 or Keras 3): its Normalization's mean/variance and its four Dense layers, in order."""
    norm, dense = None, []
    for layer in _walk(model):
        kind = type(layer).__name__
        if kind == "Normalization":
            if norm is not None:
                raise ValueError("the model has two Normalization layers; expected the NSFW detector's one")
            norm = layer
        elif kind == "Dense":
            dense.append(layer)
    if norm is None or len(dense) != 4:
        raise ValueError(
            f"not the NSFW detector's architecture: {'no' if norm is None else 'one'} Normalization layer and "
            f"{len(dense)} Dense layers (expected one and 4: {HIDDEN} then 1)"
        )
    mean = np.asarray(_value(norm.mean), np.float32).reshape(-1)
    var = np.asarray(_value(norm.variance), np.float32).reshape(-1)
    out = {"mean": torch.from_numpy(mean.copy()), "variance": torch.from_numpy(var.copy())}
    for i, layer in enumerate(dense, start=1):
        kernel, bias = (np.asarray(w, np.float32) for w in layer.get_weights()[:2])
        out[f"linear_{i}.weight"] = torch.from_numpy(kernel.T.copy())  # Keras kernels are (in, out)
        out[f"linear_{i}.bias"] = torch.from_numpy(bias.copy())
    dims = [mean.shape[0], *HIDDEN, 1]
    for i in range(4):
        want = (dims[i + 1], dims[i])
        got = tuple(out[f"linear_{i + 1}.weight"].shape)
        if got != want:
            raise ValueError(f"Dense layer {i + 1}: weight {got} where the detector has {want}")
    return out


def _walk(model: Any):
    for layer in getattr(model, "layers", []):
        if hasattr(layer, "layers") and type(layer).__name__ in ("Functional", "Sequential", "Model"):
            yield from _walk(layer)
        else:
            yield layer


def _value(v: Any) -> np.ndarray:
    """A Keras weight as numpy: a torch tensor (Keras 3 on torch), a Keras / TF variable, an array."""
    if hasattr(v, "value") and not hasattr(v, "detach"):  # keras.Variable
        v = v.value
    if hasattr(v, "detach"):
        return v.detach().cpu().numpy()
    if hasattr(v, "numpy"):
        return np.asarray(v.numpy())
    return np.asarray(v)


def load_nsfw(path_or_url: str, device: str = "cpu") -> NSFWHead:
    """Load converted weights (safetensors or a torch state dict, read with weights_only)."""
    from curation.models import _load_state_dict, resolve_device

    state = _load_state_dict(path_or_url)
    if "linear_1.weight" not in state or "mean" not in state:
        raise ValueError(
            f"{path_or_url}: not converted NSFW-detector weights (keys: {sorted(state)[:6]}); convert the published "
            "Keras model with `python -m curation.safety.nsfw convert`"
        )
    head = NSFWHead(int(state["linear_1.weight"].shape[1]))
    head.load_state_dict(state)
    return head.to(resolve_device(device)).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m curation.safety.nsfw", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    conv = sub.add_parser("convert", help="Keras model (SavedModel folder, .keras, .h5) -> safetensors")
    conv.add_argument("keras_model")
    conv.add_argument("output")
    args = parser.parse_args(argv)
    try:  # TensorFlow's Keras reads the published SavedModel (with autokeras' custom objects)
        import autokeras as ak  # noqa: F401
        from tensorflow.keras.models import load_model

        model = load_model(args.keras_model, custom_objects=ak.CUSTOM_OBJECTS, compile=False)
    except ImportError:
        import keras

        model = keras.saving.load_model(args.keras_model, compile=False)
    from safetensors.torch import save_file

    state = state_dict_from_keras(model)
    save_file(state, args.output)
    print(f"wrote {args.output}: NSFW head for {state['mean'].shape[0]}-dim embeddings", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
