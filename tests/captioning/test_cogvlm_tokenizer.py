"""The native CogVLM v1 tokenizes as the official demo's slow ``LlamaTokenizer`` (Vicuna's SentencePiece model).

A tiny SentencePiece model is trained here with Llama-2's trainer settings (BPE, byte
fallback, split digits, whitespace kept, a dummy prefix, identity normalisation), written in
Vicuna's file layout. The slow ``LlamaTokenizer`` of transformers 4.x encodes text without
special tokens as ``sp_model.encode(text)``: that is the reference here.
"""

from __future__ import annotations

import io
import json

import pytest

spm = pytest.importorskip("sentencepiece")

from captioning.cogvlm.processing import TEMPLATES, CogVLMProcessor, render_prompt  # noqa: E402
from captioning.cogvlm.tokenization import SentencePieceLlamaTokenizer, load_tokenizer  # noqa: E402

CORPUS = [
    "A photo of a cat sitting on a red sofa.",
    "Question: Describe the image in detail. Answer: two dogs run across the grass.",
    "Café crème, naïve façade — 東京 タワー 🙂",
    "Numbers 12345 and 2024-01-02",
    "line one\nline two\n\ttabbed   spaced",
] * 5

TEXTS = [
    "Describe the image.",
    " leading space",
    "  two leading spaces",
    "two  spaces   three",
    "trailing ",
    " ",
    "line\nbreak\n\nand\ttab",
    "\n leading newline",
    "Café 東京 🙂 ñ Ω",
    "12345 67",
    "▁already underlined",
    "<EOI>Question: hi Answer:",
    "",
]


@pytest.fixture(scope="module")
def vicuna_like(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vicuna")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    # as lmsys/vicuna-7b-v1.5 writes it: the slow class, BOS added, no pad token in the config
    config = {"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True, "add_eos_token": False}
    config |= {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"})
    )
    return folder


def _queries():
    yield from TEXTS
    for template in TEMPLATES:
        for q in ("Describe the image in detail.", " What is  in it?", "Café?\nAnd 🙂"):
            yield render_prompt(template, q)


def test_v1_loads_the_sentencepiece_tokenizer_with_the_slow_llama_ids(vicuna_like):
    tok = load_tokenizer(str(vicuna_like), None, is_cogvlm2=False)
    assert isinstance(tok, SentencePieceLlamaTokenizer)
    sp = spm.SentencePieceProcessor(model_file=str(vicuna_like / "tokenizer.model"))
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (1, 2, 0, 0)
    for text in _queries():
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text), repr(text)
        assert tok.encode(text) == [1, *ids]
        assert tok.decode(ids) == sp.decode(ids), repr(text)
    # special tokens in the text are their ids, as the slow class splits on them; skipped when decoding
    ids = tok.encode("a photo</s> of", add_special_tokens=False)
    assert ids == sp.encode("a photo") + [2] + sp.encode(" of")
    assert tok.decode(ids, skip_special_tokens=True) == sp.decode(sp.encode("a photo")) + sp.decode(sp.encode(" of"))
    assert "</s>" in tok.decode(ids)


def test_the_tokenizers_port_differs_on_leading_whitespace(vicuna_like):
    """Why v1 does not load AutoTokenizer: transformers' own LlamaTokenizer drops a leading space's ``▁``."""
    from transformers import AutoTokenizer

    fast = AutoTokenizer.from_pretrained(str(vicuna_like))
    sp = spm.SentencePieceProcessor(model_file=str(vicuna_like / "tokenizer.model"))
    differ = [t for t in TEXTS if fast.encode(t, add_special_tokens=False) != sp.encode(t)]
    assert " leading space" in differ


def test_the_processor_puts_the_sentencepiece_ids_after_the_image_slots(vicuna_like):
    from captioning.cogvlm.configuration import CogVLMConfig

    tok = load_tokenizer(str(vicuna_like), None, is_cogvlm2=False)
    config = CogVLMConfig(vision_config={"image_size": 28, "patch_size": 14}, pad_token_id=0)
    proc = CogVLMProcessor(tok, config, "chat")
    row = proc.row(None, " Describe it.")
    sp = spm.SentencePieceProcessor(model_file=str(vicuna_like / "tokenizer.model"))
    assert row["input_ids"].tolist() == [1, *sp.encode(render_prompt("chat", " Describe it."))]


def test_cogvlm2_and_a_folder_without_a_sentencepiece_model_use_autotokenizer(vicuna_like, tmp_path):
    from transformers import PreTrainedTokenizerBase

    assert isinstance(load_tokenizer(str(vicuna_like), None, is_cogvlm2=True), PreTrainedTokenizerBase)
    from paradiffusion.testing.tiny_vlm import build_tokenizer

    build_tokenizer().save_pretrained(str(tmp_path))
    assert isinstance(load_tokenizer(str(tmp_path), None, is_cogvlm2=False), PreTrainedTokenizerBase)
