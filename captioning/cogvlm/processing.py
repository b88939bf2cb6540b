"""Prompts, image preprocessing and batching for CogVLM / CogVLM2, as the reference builds them.

Per image, the reference's ``build_conversation_input_ids`` gives::

    input_ids      = [BOS] + [pad] * vision_tokens + tokenize(template(query))
    token_type_ids = [0]   + [1]   * vision_tokens + [0] * len(text)
    pixels         = normalize(to_tensor(resize(image, (S, S), bicubic)))   # CLIP mean/std

:class:`CogVLMProcessor` does the same and left-pads rows into a batch (padding has token
type 0 and attention 0, as the reference's batch demos do), so the model sees what the
reference would. Templates (``TEMPLATES``) render the query as the Hub code does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from captioning.cogvlm.configuration import CogVLMConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

History = Sequence[tuple[str, str]]


def _qa(answer_format: str) -> Callable[[str, History], str]:
    def render(query: str, history: History = ()) -> str:
        prompt = "".join(f"Question: {q} {answer_format} {a}\n" for q, a in history)
        return prompt + f"Question: {query} {answer_format}"

    return render


def _chat_old(query: str, history: History = ()) -> str:
    prompt = "<EOI>Question: "
    for q, a in history:
        prompt += q + " Answer: " + a + "\nQuestion: "
    return prompt + query + " Answer:"


#: Conversation templates. ``base``, ``chat`` and ``vqa`` are the CogVLM / CogVLM2 Hub code's
#: (``_history_to_prompt``); ``chat_old`` is the CogAgent Hub code's template of that name
#: (the CogVLM v1.0 "Question: ... Answer:" prompt behind a literal ``<EOI>``).
TEMPLATES: dict[str, Callable[[str, History], str]] = {
    "base": lambda query, history=(): query,
    "chat": _qa("Answer:"),
    "vqa": _qa("Short answer:"),
    "chat_old": _chat_old,
}


def render_prompt(template: str, query: str, history: History = ()) -> str:
    """The text the model reads after the image for ``query`` under ``template``."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown CogVLM template {template!r}; one of: {', '.join(TEMPLATES)}")
    return TEMPLATES[template](query, history)


def image_to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """Resize to ``size`` x ``size`` (PIL bicubic), scale to [0, 1], normalise with CLIP's mean and std.

    The same steps as the reference's torchvision ``Resize(BICUBIC) -> ToTensor -> Normalize``
    on a PIL image (torchvision resizes PIL images with PIL), written out so a captioner
    does not need torchvision.
    """
    import torch
    from PIL import Image as PILImage

    if image.mode != "RGB":
        image = image.convert("RGB")
    resized = image.resize((size, size), PILImage.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=x.dtype)[:, None, None]
    return x.sub(mean).div(std)


class CogVLMProcessor:
    """Turns (image, query) pairs into a left-padded batch for :class:`~captioning.cogvlm.modeling.CogVLMForCausalLM`."""

    def __init__(self, tokenizer, config: CogVLMConfig, template: str | None = None):
        self.tokenizer = tokenizer
        self.config = config
        self.template = template or getattr(config, "template_version", None) or "chat"
        render_prompt(self.template, "")  # unknown template: fail now, not per batch
        tok_pad = getattr(tokenizer, "pad_token_id", None)
        #: id of the image slots: CogVLM2 hard-codes 128002 (its config's pad id); v1 uses the tokenizer's pad
        self.image_slot_id = config.pad_token_id if config.is_cogvlm2 or tok_pad is None else tok_pad
        #: id of the left padding between rows
        self.pad_id = tok_pad if tok_pad is not None else (config.pad_token_id or 0)
        self.image_size = int(config.vision_config["image_size"])
        self._text_cache: dict[tuple[str, str], list[int]] = {}

    def text_ids(self, query: str, template: str | None = None) -> list[int]:
        key = (template or self.template, query)
        if key not in self._text_cache:
            text = render_prompt(key[0], query)
            self._text_cache[key] = list(self.tokenizer.encode(text, add_special_tokens=False))
        return self._text_cache[key]

    def row(self, image: Image.Image | None, query: str, template: str | None = None) -> dict:
        """One conversation turn: 1-D ``input_ids`` and ``token_type_ids`` and the image tensor (or None)."""
        import torch

        ids, types = [self.tokenizer.bos_token_id], [0]
        pixels = None
        if image is not None:
            pixels = image_to_tensor(image, self.image_size)
            n = self.config.vision_tokens
            ids += [self.image_slot_id] * n
            types += [1] * n
        text = self.text_ids(query, template)
        ids += text
        types += [0] * len(text)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "token_type_ids": torch.tensor(types, dtype=torch.long),
            "pixel_values": pixels,
        }

    def pad(self, rows: list[dict]) -> dict:
        """Left-pad rows into a batch: pad id, token type 0, attention 0 on the left."""
        import torch

        width = max(int(r["input_ids"].shape[0]) for r in rows)

        def left(t: torch.Tensor, value: int) -> torch.Tensor:
            return torch.nn.functional.pad(t, (width - t.shape[0], 0), value=value)

        batch = {
            "input_ids": torch.stack([left(r["input_ids"], self.pad_id) for r in rows]),
            "token_type_ids": torch.stack([left(r["token_type_ids"], 0) for r in rows]),
            "attention_mask": torch.stack([left(torch.ones_like(r["input_ids"]), 0) for r in rows]),
        }
        pixels = [r["pixel_values"] for r in rows if r["pixel_values"] is not None]
        if pixels:
            batch["pixel_values"] = torch.stack(pixels)
        return batch

    def __call__(self, images: Sequence[Image.Image], queries: str | Sequence[str], template: str | None = None):
        """A left-padded batch for ``images`` with one query each (or the same query for all)."""
        if isinstance(queries, str):
            queries = [queries] * len(images)
        if len(queries) != len(images):
            raise ValueError(f"{len(images)} image(s) but {len(queries)} quer(ies)")
        return self.pad([self.row(im, q, template) for im, q in zip(images, queries, strict=True)])
