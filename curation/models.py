"""The models the filter (and the CLIP-score metrics in eval) run: open_clip CLIP and
the LAION improved aesthetic predictor.

Public API::

    clip = load_clip("ViT-L-14", "openai", device="cuda", precision="fp16")
    img_emb = clip.encode_images(pixels)      # uint8 NHWC arrays at clip.image_size, or
    img_emb = clip.encode_pil(list_of_pil)    # PIL images through open_clip's own transform
    txt_emb = clip.encode_texts(["a cat"])    # both L2-normalised float32 numpy arrays
    scores = clip_scores(img_emb, txt_emb)    # row-wise cosine similarity

    aesthetic = load_aesthetic("sac+logos+ava1-l14-linearMSE.pth", device="cuda")
    aesthetic.score(img_emb)                  # one float per image (about 1..10)

Nothing here downloads unless the caller names something remote (an open_clip
``pretrained`` tag, an ``hf-hub:`` id or an ``http(s)://`` aesthetic URL). Tests and
the demo use the tiny random models of :mod:`paradiffusion.testing.tiny_clip`.
"""

from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

Precision = Literal["fp32", "fp16", "bf16"]

_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _open_clip():
    from paradiffusion.deps import require

    return require("open_clip", "open_clip_torch", extra="curation")


def resolve_device(device: str) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; anything else is passed to torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _model_identifier(model_name: str) -> str:
    """A plain local folder holding ``open_clip_config.json`` becomes open_clip's ``local-dir:``."""
    if model_name.startswith(("hf-hub:", "local-dir:")):
        return model_name
    if os.path.isdir(model_name):
        if not (Path(model_name) / "open_clip_config.json").is_file():
            raise FileNotFoundError(
                f"CLIP model folder {model_name!r} has no open_clip_config.json "
                "(expected the layout of an open_clip hf-hub repo: open_clip_config.json + weights)"
            )
        return "local-dir:" + str(Path(model_name).resolve())
    return model_name


@dataclass
class ClipModel:
    """A loaded open_clip model with what is needed to embed images and texts.

    ``image_size``, ``mean`` and ``std`` describe the model's input, so a CPU stage can
    decode and resize images to uint8 arrays and :meth:`encode_images` does the rest
    (scale, normalise) on the model's device.
    """

    model: nn.Module
    preprocess: Any  # open_clip's eval transform: PIL image -> CHW float tensor
    tokenizer: Any  # list[str] -> LongTensor of token ids
    name: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embed_dim: int
    device: torch.device
    dtype: torch.dtype

    @torch.inference_mode()
    def encode_images(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """L2-normalised image embeddings of uint8 pixels, shape ``(N, H, W, 3)``."""
        x = torch.as_tensor(pixels)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 pixels of shape (N, H, W, 3), got {tuple(x.shape)}")
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).to(self.dtype).div_(255.0)
        mean = torch.tensor(self.mean, device=self.device, dtype=self.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device, dtype=self.dtype).view(1, 3, 1, 1)
        x = (x - mean) / std
        return self._normalised(self.model.encode_image(x))

    @torch.inference_mode()
    def encode_pil(self, images: list) -> np.ndarray:
        """L2-normalised image embeddings of PIL images, through open_clip's own transform."""
        x = torch.stack([self.preprocess(im) for im in images]).to(self.device, self.dtype)
        return self._normalised(self.model.encode_image(x))

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """L2-normalised text embeddings (texts longer than the context are truncated)."""
        return self.encode_tokens(self.tokenizer([t or "" for t in texts]))

    @torch.inference_mode()
    def encode_tokens(self, tokens: np.ndarray | torch.Tensor) -> np.ndarray:
        """L2-normalised text embeddings of token ids from :func:`clip_tokenizer` (tokenised elsewhere,
        e.g. in CPU tasks, so a GPU actor does not spend its time in the Python tokenizer)."""
        tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64)).to(self.device, non_blocking=True)
        return self._normalised(self.model.encode_text(tokens))

    @staticmethod
    def _normalised(emb: torch.Tensor) -> np.ndarray:
        emb = emb.float()
        emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return emb.cpu().numpy()


def load_clip(
    model_name: str, pretrained: str | None = None, device: str = "auto", precision: Precision = "fp32"
) -> ClipModel:
    """Load an open_clip model for inference.

    ``model_name`` is one of: an open_clip built-in name (``"ViT-L-14"``) with
    ``pretrained`` a tag (``"openai"``, downloads once into open_clip's cache) or a
    local checkpoint file; an ``hf-hub:org/repo`` id; or a local folder (optionally
    written ``local-dir:/path``) holding ``open_clip_config.json`` and the weights, the
    layout of an open_clip Hugging Face repo (and of the tiny test models).
    """
    open_clip = _open_clip()

    if precision not in _DTYPES:
        raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {precision!r}")
    dev = resolve_device(device)
    ident = _model_identifier(model_name)
    model, _, preprocess = open_clip.create_model_and_transforms(
        ident, pretrained=None if ident.startswith(("hf-hub:", "local-dir:")) else pretrained, device=dev
    )
    dtype = _DTYPES[precision]
    model = model.to(dtype=dtype).eval()
    tokenizer = clip_tokenizer(model_name)
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    embed_dim = int(getattr(model, "embed_dim", 0) or model.text_projection.shape[-1])
    return ClipModel(
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        name=model_name,
        image_size=size,
        mean=tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
        embed_dim=embed_dim,
        device=dev,
        dtype=dtype,
    )


@functools.lru_cache(maxsize=4)
def clip_tokenizer(model_name: str):
    """The model's tokenizer (``list[str] -> LongTensor``), loaded once per process."""
    return _open_clip().get_tokenizer(_model_identifier(model_name))


def clip_input_size(model_name: str) -> int:
    """The model's input side in pixels, read from its config without loading weights."""
    open_clip = _open_clip()

    ident = _model_identifier(model_name)
    cfg = open_clip.get_model_config(ident if ident.startswith(("hf-hub:", "local-dir:")) else ident.replace("/", "-"))
    if cfg is None:
        raise ValueError(f"unknown open_clip model {model_name!r}")
    size = cfg.get("vision_cfg", {}).get("image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def is_known_clip(model_name: str) -> bool:
    """True for an open_clip built-in name, an ``hf-hub:`` id or an existing local model folder."""
    open_clip = _open_clip()

    if model_name.startswith("hf-hub:"):
        return True
    if model_name.startswith("local-dir:") or os.path.isdir(model_name):
        return (Path(model_name.removeprefix("local-dir:")) / "open_clip_config.json").is_file()
    return model_name.replace("/", "-") in open_clip.list_models()


def clip_scores(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of L2-normalised embeddings (the LAION "CLIP score")."""
    return np.einsum("nd,nd->n", image_emb.astype(np.float32), text_emb.astype(np.float32))


class AestheticPredictor(nn.Module):
    """The LAION improved aesthetic predictor (christophschuhmann/improved-aesthetic-predictor).

    An MLP 768 -> 1024 -> 128 -> 64 -> 16 -> 1 on the L2-normalised CLIP ViT-L/14 image
    embedding, trained on SAC + LAION-Logos + AVA ratings (about 1..10). The module
    layout (``layers`` with the Dropouts in between) matches the original, so the
    state-dict keys of ``sac+logos+ava1-l14-linearMSE.pth`` (``layers.0.weight`` ...
    ``layers.7.bias``) load as they are. ``input_size`` is the embedding width, so a
    tiny test CLIP gets a tiny predictor.
    """

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    @torch.inference_mode()
    def score(self, image_emb: np.ndarray | torch.Tensor) -> np.ndarray:
        """Aesthetic score of each image from its (re-)L2-normalised embedding."""
        p = next(self.parameters())
        x = torch.as_tensor(image_emb).to(p.device, torch.float32)
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return self.layers(x.to(p.dtype)).float().squeeze(-1).cpu().numpy()


def _load_state_dict(path_or_url: str) -> dict[str, torch.Tensor]:
    """A state dict from a path, fsspec URL or http(s) URL, never unpickling arbitrary objects."""
    if path_or_url.startswith(("http://", "https://")):
        # torch.hub caches the file under $TORCH_HOME/hub/checkpoints.
        return torch.hub.load_state_dict_from_url(path_or_url, map_location="cpu", weights_only=True)
    import fsspec

    with fsspec.open(path_or_url, "rb") as f:
        data = f.read()
    if path_or_url.endswith(".safetensors"):
        from safetensors.torch import load

        return load(data)
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def load_aesthetic(path_or_url: str, device: str = "auto") -> AestheticPredictor:
    """Load the aesthetic MLP; its input width comes from the weights (768 for ViT-L/14)."""
    state = _load_state_dict(path_or_url)
    if "layers.0.weight" not in state:
        raise ValueError(
            f"{path_or_url}: not an aesthetic-predictor state dict (no 'layers.0.weight'; keys: {sorted(state)[:6]})"
        )
    model = AestheticPredictor(input_size=int(state["layers.0.weight"].shape[1]))
    model.load_state_dict(state)
    return model.to(resolve_device(device)).eval()
