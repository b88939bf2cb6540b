"""Tiny random CLIP and aesthetic models, built offline for tests, the demo and benchmarks.

``build_tiny_clip(out_dir)`` writes::

    out_dir/clip/open_clip_config.json        {"model_cfg": ..., "preprocess_cfg": ...}
    out_dir/clip/open_clip_pytorch_model.bin  random weights (seeded)
    out_dir/aesthetic.pth                     random AestheticPredictor state dict

The folder is the layout of an open_clip Hugging Face repo, so
``curation.models.load_clip(info["clip_model"])`` loads it with no network. The
model is a real open_clip ``CLIP`` (ViT image tower, transformer text tower, the
standard tokenizer) with few, narrow layers: its outputs mean nothing, the plumbing
is real. Building takes well under a second.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

TINY_MODEL_CFG: dict = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def build_tiny_clip(out_dir: str | os.PathLike, seed: int = 0, model_cfg: dict | None = None) -> dict:
    """Write a tiny random open_clip model and aesthetic MLP under ``out_dir``.

    Returns ``{"clip_model": <folder for load_clip>, "aesthetic": <weights file>,
    "embed_dim": int, "image_size": int}``. Reuses what is already there (same
    config), so calling it twice is cheap and gives the same weights.
    """
    import open_clip
    import torch

    from curation.models import AestheticPredictor

    cfg = model_cfg or TINY_MODEL_CFG
    out = Path(out_dir)
    clip_dir = out / "clip"
    cfg_file = clip_dir / "open_clip_config.json"
    weights = clip_dir / "open_clip_pytorch_model.bin"
    aesthetic = out / "aesthetic.pth"
    doc = {
        "model_cfg": cfg,
        "preprocess_cfg": {
            "mean": list(OPENAI_MEAN),
            "std": list(OPENAI_STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }
    info = {
        "clip_model": str(clip_dir),
        "aesthetic": str(aesthetic),
        "embed_dim": int(cfg["embed_dim"]),
        "image_size": int(cfg["vision_cfg"]["image_size"]),
    }
    if cfg_file.is_file() and weights.is_file() and aesthetic.is_file():
        if json.loads(cfg_file.read_text()) == doc:
            return info
    clip_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    torch.save(model.state_dict(), weights)
    cfg_file.write_text(json.dumps(doc, indent=2))
    torch.manual_seed(seed + 1)
    torch.save(AestheticPredictor(input_size=int(cfg["embed_dim"])).state_dict(), aesthetic)
    return info


def build_random_clip(
    out_dir: str | os.PathLike, model_name: str = "ViT-B-32", seed: int = 0, half: bool = True
) -> dict:
    """Like :func:`build_tiny_clip` with a real open_clip architecture (e.g. ``ViT-L-14``), random weights.

    For benchmarks: the speed of the real model without downloading its weights. Weights
    are saved in fp16 when ``half`` (ViT-L/14: about 0.9 GB). Returns the same dict.
    """
    import open_clip
    import torch

    from curation.models import AestheticPredictor

    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {model_name!r}")
    out = Path(out_dir)
    clip_dir = out / "clip"
    info = {
        "clip_model": str(clip_dir),
        "aesthetic": str(out / "aesthetic.pth"),
        "embed_dim": int(cfg["embed_dim"]),
        "image_size": int(cfg["vision_cfg"]["image_size"]),
    }
    doc = {"model_cfg": cfg, "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)}}
    cfg_file = clip_dir / "open_clip_config.json"
    if cfg_file.is_file() and json.loads(cfg_file.read_text()) == doc and Path(info["aesthetic"]).is_file():
        return info
    clip_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.create_model(model_name, pretrained=None)
    state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in model.state_dict().items()}
    torch.save(state, clip_dir / "open_clip_pytorch_model.bin")
    cfg_file.write_text(json.dumps(doc, indent=2))
    torch.save(AestheticPredictor(input_size=int(cfg["embed_dim"])).state_dict(), info["aesthetic"])
    return info
