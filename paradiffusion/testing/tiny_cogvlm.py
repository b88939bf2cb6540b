"""Tiny random CogVLM / CogVLM2 (the real native architectures, few narrow layers) for tests, the demo, benchmarks.

``build_tiny_cogvlm(out_dir, family="cogvlm")`` writes a folder the ``type: cogvlm``
captioner loads with no network, laid out like the official checkpoints::

    out_dir/config.json                       cogvlm-chat-hf's fields (cogvlm2: + num_multi_query_heads)
    out_dir/model-0000N-of-0000M.safetensors  sharded, with model.safetensors.index.json
    out_dir/tokenizer.json, ...               the word-level tokenizer of tiny_vlm (CogVLM2 ships its own)

Weights are drawn with a wider spread than the usual 0.02 init, so images change the
captions (a test can tell whether each caption came back to its own image). Building
takes about a second and reuses a folder built with the same settings.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def tiny_config(
    family: str = "cogvlm", vocab_size: int = 256, image_size: int = 28, hidden_size: int = 64, layers: int = 2, **ids
):
    """A CogVLM (``family="cogvlm"``) or CogVLM2 config, a few hundred kB big at the defaults."""
    from captioning.cogvlm.configuration import CogVLM2Config, CogVLMConfig

    vision = {
        "dropout_prob": 0.0,
        "hidden_act": "gelu",
        "in_channels": 3,
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "patch_size": 7 if family == "cogvlm" else 4,
        "num_heads": 2,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-6,
        "image_size": image_size,
    }
    vision["num_positions"] = (image_size // vision["patch_size"]) ** 2 + 1
    common = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "max_position_embeddings": 1024,
        "vision_config": vision,
        **ids,
    }
    if family == "cogvlm2":
        return CogVLM2Config(num_multi_query_heads=2, **common)
    if family == "cogvlm":
        return CogVLMConfig(**common)
    raise ValueError(f"family {family!r}: one of cogvlm, cogvlm2")


def spread_weights(model, seed: int) -> None:
    """Re-draw every parameter (norms near 1, biases small, matrices with std 1/sqrt(fan-in))."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(max(1, p.numel() // p.shape[0])))


def build_tiny_cogvlm(
    out_dir: str | os.PathLike,
    family: str = "cogvlm",
    seed: int = 0,
    shard_size: str = "100KB",
    hidden_size: int = 64,
    layers: int = 2,
) -> str:
    """Write a tiny random native CogVLM (or CogVLM2) with its tokenizer into ``out_dir``; returns the folder."""
    from paradiffusion.testing.tiny_vlm import WORDS, build_tokenizer

    out = Path(out_dir)
    stamp = out / "tiny_cogvlm.json"
    settings = {
        "family": family,
        "seed": seed,
        "shard_size": shard_size,
        "hidden_size": hidden_size,
        "layers": layers,
        "words": len(WORDS),
        "version": 1,
    }
    if stamp.is_file() and json.loads(stamp.read_text()) == settings and (out / "config.json").is_file():
        return str(out)
    import torch

    from captioning.cogvlm.modeling import CogVLMForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    config = tiny_config(family, vocab_size=len(tok), hidden_size=hidden_size, layers=layers, **ids)
    torch.manual_seed(seed)
    model = CogVLMForCausalLM(config).eval()
    spread_weights(model, seed)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.save_pretrained(str(out), max_shard_size=shard_size)
    tok.save_pretrained(str(out))
    stamp.write_text(json.dumps(settings))
    return str(out)
