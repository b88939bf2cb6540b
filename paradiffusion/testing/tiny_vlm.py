"""A tiny random vision-language model, built offline for tests, the demo and benchmarks.

``build_tiny_vlm(out_dir)`` writes a folder that ``AutoModelForImageTextToText`` and
``AutoProcessor`` load with no network::

    out_dir/config.json, model.safetensors     LlavaForConditionalGeneration (random, seeded)
    out_dir/tokenizer.json, ...                a word-level tokenizer over a small English vocabulary
    out_dir/preprocessor_config.json           CLIPImageProcessor at 32 px
    out_dir/chat_template.jinja                a small chat template with an image slot

It is a real LLaVA architecture (CLIP vision tower, projector, Llama decoder) with
few, narrow layers, so every code path of a transformers-native captioner runs on it:
the processor's chat template, image-token expansion, left padding, batched
``generate`` with a KV cache. Its captions are random English words: they mean
nothing, the plumbing is real. Building takes about a second.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

#: Words of the tiny vocabulary: enough for the paper's prompt and for captions that
#: look like English to a language identifier.
WORDS = (
    "a an the of and in on with at to from by for is are this that it its there image picture photo "
    "provide detailed description using around words including objects attributes spatial locations "
    "depicted describe left right top bottom center middle front behind near next above below "
    "red green blue yellow white black brown orange gray pink purple dark light bright small large "
    "tall wide round old new wooden metal glass stone soft sky tree trees water lake sea river road "
    "street city house building window door table chair cup plate bowl fruit apple flower grass field "
    "mountain cloud clouds sun light shadow cat dog bird person man woman child people car boat bicycle "
    "sits stands lies shows appears holding wearing looking walking covered filled surrounded scene "
    "background foreground corner edge side surface floor wall ground room kitchen garden park beach "
    "snow forest path morning evening night day warm cold calm quiet busy several many few two three "
    "one some each other while which where has have can be as but or also very"
).split()

SPECIAL = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "<|user|>", "<|assistant|>", "<|end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>{% else %}<|assistant|>{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %} {{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

IMAGE_SIZE = 32
PATCH_SIZE = 8


def build_tokenizer(vocab_size: int | None = None):
    """A word-level tokenizer over :data:`WORDS` (padded with ``<extra_i>`` tokens up to ``vocab_size``)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    while vocab_size is not None and len(vocab) < vocab_size:
        vocab[f"<extra_{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<image>", "<|user|>", "<|assistant|>", "<|end|>"],
        padding_side="left",
    )


def build_tiny_vlm(out_dir: str | os.PathLike, seed: int = 0, hidden_size: int = 64, layers: int = 2) -> str:
    """Write a tiny random LLaVA (model, tokenizer, processor) into ``out_dir``; returns the folder.

    Reuses what is already there when it was built with the same settings, so calling
    it twice is cheap and gives the same weights.
    """
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    out = Path(out_dir)
    stamp = out / "tiny_vlm.json"
    settings = {"seed": seed, "hidden_size": hidden_size, "layers": layers, "words": len(WORDS), "version": 1}
    if stamp.is_file() and json.loads(stamp.read_text()) == settings and (out / "config.json").is_file():
        return str(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,  # the CLS token the "default" strategy drops
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=32,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    stamp.write_text(json.dumps(settings))
    return str(out)
