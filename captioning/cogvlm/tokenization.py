"""The tokenizer of a native CogVLM: what the official demo loads, with the pinned transformers.

CogVLM v1 reads Vicuna's tokenizer, and the official demo (THUDM/CogVLM ``basic_demo/cli_demo_hf.py``,
Apache-2.0) loads it with ``LlamaTokenizer.from_pretrained('lmsys/vicuna-7b-v1.5')``: the
*slow* class of transformers 4.x, which encodes each stretch of text between special tokens
with the SentencePiece model (``tokenizer.model``) itself and decodes with it. Transformers 5
no longer has that class: its ``LlamaTokenizer`` is the ``tokenizers`` port, which gives other
ids for text that starts with whitespace (its Metaspace pre-tokenizer adds no ``▁`` before a
leading space: " a" and "a" become the same ids), and its generic ``SentencePieceBackend``
decodes byte-fallback pieces as ``<0xE6>`` text. :class:`SentencePieceLlamaTokenizer` is the
slow class's encode/decode written over the ``sentencepiece`` library (hand-written because
no installed library offers it any more); ``tests/captioning/test_cogvlm_tokenizer.py``
proves its ids equal SentencePiece's own on varied text and the prompt templates.

CogVLM2 ships a Llama-3 ``tokenizer.json`` (no SentencePiece model) that its demo loads with
``AutoTokenizer``; so do we, and so for any v1 tokenizer folder without ``tokenizer.model``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

SPM_FILE = "tokenizer.model"


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json / special_tokens_map.json write it (str or AddedToken dict)."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class SentencePieceLlamaTokenizer:
    """transformers 4.x's slow ``LlamaTokenizer`` behaviour over a SentencePiece model (what CogVLM's demo runs).

    ``encode`` splits the text on the special tokens (``<s>``, ``</s>``, ``<unk>``) and encodes
    every stretch between them with the SentencePiece model; ``decode`` decodes with it, special
    tokens dropped (``skip_special_tokens``) or written out. Only what captioning needs.
    """

    def __init__(self, model_file: str | Path, special: dict[str, str | None] | None = None):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None} | (special or {})
        self.bos_token, self.eos_token = special["bos_token"], special["eos_token"]
        self.unk_token, self.pad_token = special["unk_token"], special["pad_token"]
        self.bos_token_id = self._id(self.bos_token)
        self.eos_token_id = self._id(self.eos_token)
        self.unk_token_id = self._id(self.unk_token)
        self.pad_token_id = self._id(self.pad_token)
        self.all_special_ids = sorted(
            {i for i in (self.bos_token_id, self.eos_token_id, self.unk_token_id) if i is not None}
        )
        tokens = sorted({self.sp.id_to_piece(i) for i in self.all_special_ids}, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(t) for t in tokens) + ")") if tokens else None

    def _id(self, token: str | None) -> int | None:
        if token is None:
            return None
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else int(i)

    @classmethod
    def from_folder(cls, folder: str | Path) -> SentencePieceLlamaTokenizer:
        """``tokenizer.model`` plus the special tokens named by ``tokenizer_config.json`` / ``special_tokens_map.json``."""
        folder = Path(folder)
        special: dict[str, str | None] = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            f = folder / name
            if f.is_file():
                doc = json.loads(f.read_text())
                for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
                    if key in doc:
                        special[key] = _token_text(doc[key])
        return cls(folder / SPM_FILE, special)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        parts = self._split.split(text) if self._split else [text]
        ids: list[int] = [self.bos_token_id] if add_special_tokens and self.bos_token_id is not None else []
        for k, part in enumerate(parts):
            if k % 2:  # a special token's text
                ids.append(self.sp.piece_to_id(part))
            elif part:
                ids += self.sp.encode(part)
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        special = set(self.all_special_ids)
        out, run = [], []
        for i in (int(x) for x in ids):
            if i in special:
                out.append(self.sp.decode(run))
                run = []
                if not skip_special_tokens:
                    out.append(self.sp.id_to_piece(i))
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)


def load_tokenizer(name: str, revision: str | None, is_cogvlm2: bool):
    """The tokenizer a native CogVLM captioner uses for ``name`` (a folder or a Hub id, at ``revision``)."""
    from transformers import AutoTokenizer

    if not is_cogvlm2:
        from transformers.utils import cached_file

        spm_file = cached_file(name, SPM_FILE, revision=revision, _raise_exceptions_for_missing_entries=False)
        if spm_file is not None:
            return SentencePieceLlamaTokenizer.from_folder(Path(spm_file).parent)
    return AutoTokenizer.from_pretrained(name, revision=revision)
