"""A local stand-in for a CogVLM model repo: remote code implementing CogVLM's public interface.

CogVLM's model card documents two calls: ``model.build_conversation_input_ids(tokenizer,
query=..., history=[...], images=[PIL image], template_version=...)`` returning 1-D
``input_ids``, ``token_type_ids``, ``attention_mask`` and ``images`` (a list with one
image tensor), and ``model.generate(input_ids=..., token_type_ids=...,
attention_mask=..., images=[[tensor], ...], **gen_kwargs)`` returning the prompt ids
followed by the new ids. :func:`write_tiny_cogvlm` writes a model folder whose
``modeling_tinycog.py`` (loaded through ``auto_map`` + ``trust_remote_code``, exactly
as the real repo is) implements those calls, checks that a caller batches them the
way CogVLM needs (left padding, token types, one image list per row, the model's
dtype), and "captions" each image with the name of its colour, so a test can tell
whether every caption came back to the right key.

This checks OUR adapter (captioning.captioners.CogVLMCaptioner), not CogVLM's weights
or its real modelling code.
"""

from __future__ import annotations

import json
from pathlib import Path

CONFIGURATION = """
from transformers import PretrainedConfig


class TinyCogConfig(PretrainedConfig):
    model_type = "tinycog"

    def __init__(self, colour_token_ids=None, filler_ids=None, caption_words=8, vision_tokens=4, **kwargs):
        self.colour_token_ids = colour_token_ids or {}
        self.filler_ids = filler_ids or []
        self.caption_words = caption_words
        self.vision_tokens = vision_tokens
        super().__init__(**kwargs)
"""

MODELING = """
import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from .configuration_tinycog import TinyCogConfig

LANGUAGE_TOKEN_TYPE = 0
VISION_TOKEN_TYPE = 1
COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "white": (250, 250, 250),
           "black": (5, 5, 5), "yellow": (230, 230, 20)}


class TinyCogForCausalLM(PreTrainedModel):
    config_class = TinyCogConfig
    base_model_prefix = "tinycog"

    def __init__(self, config):
        super().__init__(config)
        self.proj = nn.Linear(3, 3)
        self.post_init()

    def _init_weights(self, module):
        pass

    def build_conversation_input_ids(self, tokenizer, *, query, history=None, images=None, template_version=None):
        assert images is not None and len(images) == 1, "one image per conversation"
        assert template_version in ("chat", "vqa", "base"), template_version
        img = images[0].convert("RGB").resize((8, 8))
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        text = tokenizer.encode(f"Question: {query} Answer:", add_special_tokens=False)
        n_vis = self.config.vision_tokens + (2 if images[0].height > images[0].width else 0)  # ragged rows
        ids = [tokenizer.bos_token_id] + [tokenizer.pad_token_id] * n_vis + text
        types = [LANGUAGE_TOKEN_TYPE] + [VISION_TOKEN_TYPE] * n_vis + [LANGUAGE_TOKEN_TYPE] * len(text)
        return {"input_ids": torch.tensor(ids, dtype=torch.long),
                "token_type_ids": torch.tensor(types, dtype=torch.long),
                "attention_mask": torch.ones(len(ids), dtype=torch.long), "images": [pixels]}

    def _colour(self, pixels):
        mean = pixels.float().mean(dim=(1, 2)) * 255.0
        return min(COLOURS, key=lambda c: sum((float(m) - v) ** 2 for m, v in zip(mean, COLOURS[c])))

    @torch.no_grad()
    def generate(self, input_ids=None, token_type_ids=None, attention_mask=None, images=None,
                 max_new_tokens=20, pad_token_id=0, **kwargs):
        b, width = input_ids.shape
        assert token_type_ids.shape == (b, width) and attention_mask.shape == (b, width), "ragged batch"
        assert isinstance(images, list) and len(images) == b, "images: one list per row"
        rows = []
        for i in range(b):
            mask = attention_mask[i].tolist()
            start = mask.index(1)
            assert all(mask[start:]), "padding must be on the left"
            assert all(int(t) == pad_token_id for t in input_ids[i, :start]), "pad with pad_token_id"
            assert int(token_type_ids[i, :start].sum()) == 0, "padding has the language token type"
            assert int(token_type_ids[i, start]) == LANGUAGE_TOKEN_TYPE
            assert len(images[i]) == 1 and images[i][0].dtype == self.dtype, "image in the model's dtype"
            words = [self.config.colour_token_ids[self._colour(images[i][0])]]
            words += [self.config.filler_ids[k % len(self.config.filler_ids)] for k in range(self.config.caption_words - 1)]
            new = (words + [self.config.eos_token_id])[:max_new_tokens]
            rows.append(new)
        longest = max(len(r) for r in rows)
        gen = torch.tensor([r + [pad_token_id] * (longest - len(r)) for r in rows], dtype=torch.long)
        return torch.cat([input_ids, gen.to(input_ids.device)], dim=1)
"""


def write_tiny_cogvlm(out: Path, tokenizer_dir: str, caption_words: int = 8) -> str:
    """Write the stand-in model folder into ``out``; returns its path."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok.convert_tokens_to_ids
    (out / "configuration_tinycog.py").write_text(CONFIGURATION)
    (out / "modeling_tinycog.py").write_text(MODELING)
    config = {
        "model_type": "tinycog",
        "architectures": ["TinyCogForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_tinycog.TinyCogConfig",
            "AutoModelForCausalLM": "modeling_tinycog.TinyCogForCausalLM",
        },
        "colour_token_ids": {c: ids(c) for c in ("red", "green", "blue", "white", "black", "yellow")},
        "filler_ids": [ids(w) for w in "image shows a quiet scene with soft light".split()],
        "caption_words": caption_words,
        "vision_tokens": 4,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    cfg = AutoConfig.from_pretrained(out, trust_remote_code=True)
    AutoModelForCausalLM.from_config(cfg, trust_remote_code=True).save_pretrained(out)
    return str(out)
