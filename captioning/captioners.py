"""Captioners: one interface, several model families, picked by ``caption.captioners.<name>.type``.

A :class:`Captioner` turns a batch of RGB images and one prompt into one
:class:`CaptionResult` per image. Implementations:

- :class:`TransformersCaptioner` (``type: transformers``): any
  ``AutoModelForImageTextToText`` with an ``AutoProcessor`` chat template (Qwen2.5-VL,
  LLaVA, SmolVLM, GLM-4V, ...). Batched ``generate`` with left padding and a KV cache
  (dynamic, or static so transformers compiles the decode step).
- :class:`CogVLMCaptioner` (``type: cogvlm``): CogVLM / CogVLM2 implemented natively in
  :mod:`captioning.cogvlm` (no remote code; which of the two comes from the checkpoint's
  ``config.json``), batched ``generate`` with left padding, a dynamic or static KV cache.
- :class:`captioning.openai_client.OpenAICaptioner` (``type: openai``): a model served by
  vLLM / lmdeploy / SGLang / ``transformers serve``, over the OpenAI API.
- :class:`CogVLMRemoteCaptioner` (``type: cogvlm_remote``): the Hub's own remote code
  (``build_conversation_input_ids`` + ``generate``), an explicit opt-in that only runs
  pinned revisions of the model and of its tokenizer. That code was written for
  transformers 4.3x/4.4x and does not run on the transformers this project pins.

:data:`CAPTIONERS` maps the type to the class (a registry, not an ``if`` chain). The
module imports torch and transformers only inside functions, so the CLI stays fast.
"""

from __future__ import annotations

import os
import re
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from paradiffusion.deps import require
from paradiffusion.log import get_logger

if TYPE_CHECKING:
    from PIL import Image

    from captioning.config import CaptionConfig, CaptionerSpec, GenerationSettings

log = get_logger("captioning")

_SHA_RE = re.compile(r"^[0-9a-f]{40}$")


@dataclass
class CaptionResult:
    """What a captioner says about one image."""

    caption: str | None
    n_tokens: int = 0
    finish_reason: str = "stop"  # "stop" | "length" | "error"
    error: str | None = None


def is_local(model: str) -> bool:
    """A model named by a folder on this machine (not a Hub id)."""
    return os.path.isdir(os.path.expanduser(model))


def check_pinned(spec: CaptionerSpec) -> None:
    """Refuse to run Hub remote code (model or tokenizer) that is not pinned to a commit SHA."""
    remote = spec.trust_remote_code or spec.type == "cogvlm_remote"
    if remote and not is_local(spec.model) and not _SHA_RE.match(spec.revision or ""):
        raise ValueError(
            f"{spec.model}: remote code runs the model repo's own Python code, so its revision must be "
            f"pinned to a full commit SHA (got {spec.revision!r}). Find the commit you reviewed on the model "
            "page's 'Files and versions' > 'History' and set caption.captioners.<name>.revision to it."
        )
    if remote and spec.tokenizer and not is_local(spec.tokenizer) and not _SHA_RE.match(spec.tokenizer_revision or ""):
        raise ValueError(
            f"{spec.tokenizer}: the tokenizer of a remote-code captioner must be pinned too: set "
            f"caption.captioners.<name>.tokenizer_revision to a full commit SHA (got {spec.tokenizer_revision!r})"
        )


def pin_to_resolved(c: CaptionConfig) -> CaptionConfig:
    """``c`` with its captioner's model and tokenizer revisions set to the commits they resolved to.

    Before the run, the driver resolved every Hub model (``models.lock`` decides the commit
    where there is one; :func:`paradiffusion.hub.resolved_commit`). From here on the caption
    set is identified by that commit: the shard names, the done keys of a resume, each row's
    ``model_revision``, and what every actor loads (the commit itself, not a branch that
    may move). A local folder, or a model resolved by nobody (a test that builds its own
    config), keeps what the config says.
    """
    from paradiffusion.hub import resolved_commit

    spec = c.spec
    update: dict[str, Any] = {}
    if not is_local(spec.model) and (commit := resolved_commit(spec.model, spec.revision)):
        update["revision"] = commit
    if spec.tokenizer and not is_local(spec.tokenizer):
        if commit := resolved_commit(spec.tokenizer, spec.tokenizer_revision):
            update["tokenizer_revision"] = commit
    if not update:
        return c
    return c.model_copy(update={"captioners": {**c.captioners, c.captioner: spec.model_copy(update=update)}})


def torch_dtype(name: str):
    import torch

    return {"auto": "auto", "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("caption.captioners.<name>.device is 'cuda' but no CUDA GPU is visible here")
    return name


def quantization_config(spec: CaptionerSpec):
    """A ``BitsAndBytesConfig`` for 8/4-bit loading, or None. bitsandbytes is imported only here."""
    if spec.quantization == "none":
        return None
    require("bitsandbytes", "bitsandbytes")  # optional: a clear error with the install line if missing
    import torch
    from transformers import BitsAndBytesConfig

    if spec.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if spec.dtype in ("auto", "bfloat16") else torch_dtype(spec.dtype)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute, bnb_4bit_quant_type="nf4")


def finish_of(gen_ids: list[int], eos_ids: set[int], pad_id: int | None, max_new_tokens: int) -> tuple[int, str]:
    """``(n_tokens, finish_reason)`` of one row of generated ids (prompt removed).

    Tokens after the first end-of-sequence id are batch padding. A row that never
    emitted one and used the whole budget hit the token limit (``"length"``).
    """
    for i, t in enumerate(gen_ids):
        if t in eos_ids:
            return i, "stop"
    n = len(gen_ids)
    if pad_id is not None and pad_id not in eos_ids:
        while n and gen_ids[n - 1] == pad_id:
            n -= 1
    return n, ("length" if n >= max_new_tokens else "stop")


class Captioner(ABC):
    """Caption a batch of images with one prompt. Subclasses load their model in ``__init__``."""

    def __init__(self, spec: CaptionerSpec, generation: GenerationSettings):
        self.spec = spec
        self.generation = generation
        check_pinned(spec)

    @property
    def model_id(self) -> str:
        return self.spec.model

    @property
    def revision(self) -> str | None:
        return self.spec.revision

    @abstractmethod
    def _caption_batch(self, images: list[Image.Image], prompt: str) -> list[CaptionResult]:
        """Caption all of ``images`` in one ``generate`` call."""

    def caption(self, images: list[Image.Image], prompt: str) -> list[CaptionResult]:
        """Caption ``images``; one result per image, in order, never raises for a bad image.

        If the batch fails (a model error), each image is retried alone so one bad
        image costs one ``error`` result, not the batch.
        """
        if not images:
            return []
        try:
            return self._caption_batch(images, prompt)
        except Exception as exc:  # noqa: BLE001 - isolate the failing image below
            if len(images) == 1:
                return [CaptionResult(None, 0, "error", f"{type(exc).__name__}: {exc}"[:500])]
            log.warning(
                "batch of %d failed (%s: %s); retrying one image at a time",
                len(images),
                type(exc).__name__,
                str(exc)[:200],
            )
        return [r for img in images for r in self.caption([img], prompt)]


class TransformersCaptioner(Captioner):
    """Any transformers-native image-text-to-text model with a processor chat template."""

    def __init__(self, spec: CaptionerSpec, generation: GenerationSettings):
        super().__init__(spec, generation)
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device = resolve_device(spec.device)
        self.processor = AutoProcessor.from_pretrained(
            spec.model, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
        kwargs: dict[str, Any] = {
            "revision": spec.revision,
            "trust_remote_code": spec.trust_remote_code,
            "dtype": torch_dtype(spec.dtype),
        }
        if spec.attn_implementation:
            kwargs["attn_implementation"] = spec.attn_implementation
        q = quantization_config(spec)
        if q is not None:
            kwargs.update(quantization_config=q, device_map={"": self.device})
        self.model = AutoModelForImageTextToText.from_pretrained(spec.model, **kwargs).eval()
        if q is None:
            self.model.to(self.device)
        self._setup()

    @classmethod
    def from_objects(
        cls, model, processor, spec: CaptionerSpec, generation: GenerationSettings
    ) -> TransformersCaptioner:
        """Wrap an already loaded model and processor (benchmarks, notebooks) instead of loading by name."""
        self = cls.__new__(cls)
        Captioner.__init__(self, spec, generation)
        self.device = str(next(model.parameters()).device)
        self.processor, self.model = processor, model.eval()
        self._setup()
        return self

    def _setup(self) -> None:
        tok = getattr(self.processor, "tokenizer", None)
        if tok is not None:
            tok.padding_side = "left"  # batched generation appends to the right end of every row
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
        self.tokenizer = tok
        gc = self.model.generation_config
        self.eos_ids = set(_as_list(gc.eos_token_id) or _as_list(getattr(tok, "eos_token_id", None)))
        self.pad_id = gc.pad_token_id if gc.pad_token_id is not None else getattr(tok, "pad_token_id", None)
        self._prompt_cache: dict[str, str] = {}

    def chat_text(self, prompt: str) -> str:
        """The prompt rendered by the processor's chat template, with one image slot."""
        if prompt not in self._prompt_cache:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            self._prompt_cache[prompt] = self.processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        return self._prompt_cache[prompt]

    def _caption_batch(self, images: list[Image.Image], prompt: str) -> list[CaptionResult]:
        import torch

        text = self.chat_text(prompt)
        inputs = self.processor(images=images, text=[text] * len(images), return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs and self.model.dtype in (torch.bfloat16, torch.float16):
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        kw = self.generation.generate_kwargs()
        if self.spec.cache == "static":
            kw["cache_implementation"] = "static"
        if self.pad_id is not None:
            kw["pad_token_id"] = self.pad_id
        with torch.inference_mode():
            out = self.model.generate(**inputs, **kw)
        gen = out[:, inputs["input_ids"].shape[1] :].tolist()
        return _decode_rows(gen, self.processor, self.eos_ids, self.pad_id, self.generation.max_new_tokens)


class CogVLMRemoteCaptioner(Captioner):
    """``type: cogvlm_remote``: CogVLM / CogVLM2 through their Hub remote code (pinned revisions only).

    Each image goes through ``model.build_conversation_input_ids`` (which returns 1-D
    ``input_ids``, ``token_type_ids``, ``attention_mask`` and ``images``); the rows are
    left-padded into one batch (text padding has token type 0, as CogVLM's batch
    demos do) and passed to ``model.generate`` with ``images`` as a list of lists.
    """

    def __init__(self, spec: CaptionerSpec, generation: GenerationSettings):
        super().__init__(spec, generation)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = resolve_device(spec.device)
        self.dtype = torch_dtype("bfloat16" if spec.dtype == "auto" else spec.dtype)
        tok_name = spec.tokenizer or spec.model
        tok_rev = spec.tokenizer_revision if spec.tokenizer else spec.revision
        self.tokenizer = AutoTokenizer.from_pretrained(tok_name, revision=tok_rev, trust_remote_code=True)
        kwargs: dict[str, Any] = {
            "revision": spec.revision,
            "trust_remote_code": True,
            # the remote code runs under an older transformers, which reads torch_dtype (dtype came in 4.56)
            _dtype_kwarg(): self.dtype,
            "low_cpu_mem_usage": True,
        }
        q = quantization_config(spec)
        if q is not None:
            kwargs.update(quantization_config=q, device_map={"": self.device})
        self.model = AutoModelForCausalLM.from_pretrained(spec.model, **kwargs).eval()
        if q is None:
            self.model.to(self.device)
        if not hasattr(self.model, "build_conversation_input_ids"):
            raise TypeError(
                f"{spec.model} has no build_conversation_input_ids: it is not a CogVLM-style model; "
                "use type: transformers for image-text-to-text models"
            )
        pad = spec.pad_token_id if spec.pad_token_id is not None else self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else 0
        gc = getattr(self.model, "generation_config", None)
        eos = _as_list(getattr(gc, "eos_token_id", None)) or _as_list(self.tokenizer.eos_token_id)
        self.eos_ids = set(eos)

    def _caption_batch(self, images: list[Image.Image], prompt: str) -> list[CaptionResult]:
        import torch

        rows = [
            self.model.build_conversation_input_ids(
                self.tokenizer, query=prompt, history=[], images=[img], template_version=self.spec.template_version
            )
            for img in images
        ]
        width = max(int(r["input_ids"].shape[0]) for r in rows)

        def left_pad(t: torch.Tensor, value: int) -> torch.Tensor:
            return torch.nn.functional.pad(t, (width - t.shape[0], 0), value=value)

        batch = {
            "input_ids": torch.stack([left_pad(r["input_ids"], self.pad_id) for r in rows]).to(self.device),
            "token_type_ids": torch.stack([left_pad(r["token_type_ids"], 0) for r in rows]).to(self.device),
            "attention_mask": torch.stack([left_pad(r["attention_mask"], 0) for r in rows]).to(self.device),
            "images": [[r["images"][0].to(self.device, self.dtype)] for r in rows],
        }
        if all(r.get("cross_images") for r in rows):  # CogAgent's high-resolution branch
            batch["cross_images"] = [[r["cross_images"][0].to(self.device, self.dtype)] for r in rows]
        kw = self.generation.generate_kwargs()
        kw["pad_token_id"] = self.pad_id
        with torch.inference_mode():
            out = self.model.generate(**batch, **kw)
        gen = out[:, width:].tolist()
        return _decode_rows(gen, self.tokenizer, self.eos_ids, self.pad_id, self.generation.max_new_tokens)


def _dtype_kwarg() -> str:
    """``from_pretrained``'s name for the dtype in the installed transformers."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def _as_list(v) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)]


def _decode_rows(
    gen: list[list[int]], decoder, eos_ids: set[int], pad_id: int | None, max_new_tokens: int
) -> list[CaptionResult]:
    out = []
    for row in gen:
        n, reason = finish_of(row, eos_ids, pad_id, max_new_tokens)
        text = decoder.decode(row[:n], skip_special_tokens=True).strip()
        out.append(CaptionResult(text, n, reason))
    return out


class CogVLMCaptioner(Captioner):
    """``type: cogvlm``: CogVLM (``THUDM/cogvlm-*-hf``) or CogVLM2, natively (:mod:`captioning.cogvlm`).

    The checkpoint's ``config.json`` says which family it is; the folder is checked before
    loading (missing shards, unexpected or missing parameter names stop with their names).
    Each image becomes ``[BOS] + image slots + template(prompt)``, rows are left-padded into
    one batch and captioned by one ``generate`` call (``cache: static`` pre-allocates the KV
    cache, which transformers then compiles the decode step for on a GPU).
    """

    def __init__(self, spec: CaptionerSpec, generation: GenerationSettings):
        super().__init__(spec, generation)
        from captioning.cogvlm.loading import load_model
        from captioning.cogvlm.tokenization import load_tokenizer

        self.device = resolve_device(spec.device)
        dtype = torch_dtype("bfloat16" if spec.dtype == "auto" else spec.dtype)
        tok_name = spec.tokenizer or spec.model
        tok_rev = spec.tokenizer_revision if spec.tokenizer else spec.revision
        q = quantization_config(spec)
        model = load_model(
            spec.model,
            revision=spec.revision,
            dtype=dtype,
            attn_implementation=spec.attn_implementation,
            quantization_config=q,
            device_map={"": self.device} if q is not None else None,
        )
        if q is None:
            model.to(self.device)
        # v1: Vicuna's SentencePiece model as the official demo's slow LlamaTokenizer; CogVLM2: AutoTokenizer
        tokenizer = load_tokenizer(tok_name, tok_rev, is_cogvlm2=model.config.is_cogvlm2)
        self._setup(model, tokenizer)

    @classmethod
    def from_objects(cls, model, tokenizer, spec: CaptionerSpec, generation: GenerationSettings) -> CogVLMCaptioner:
        """Wrap an already built native model and tokenizer (benchmarks, notebooks)."""
        self = cls.__new__(cls)
        Captioner.__init__(self, spec, generation)
        self.device = str(next(model.parameters()).device)
        self._setup(model.eval(), tokenizer)
        return self

    def _setup(self, model, tokenizer) -> None:
        from captioning.cogvlm.processing import CogVLMProcessor

        self.model, self.tokenizer = model, tokenizer
        self.processor = CogVLMProcessor(tokenizer, model.config, self.spec.template_version)
        pad = self.spec.pad_token_id if self.spec.pad_token_id is not None else self.processor.pad_id
        self.processor.pad_id = self.pad_id = pad
        gc = model.generation_config
        self.eos_ids = set(_as_list(gc.eos_token_id) or _as_list(model.config.eos_token_id))
        self.eos_ids |= set(_as_list(getattr(tokenizer, "eos_token_id", None)))

    def _caption_batch(self, images: list[Image.Image], prompt: str) -> list[CaptionResult]:
        import torch

        batch = self.processor(images, prompt)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        kw = self.generation.generate_kwargs()
        if self.spec.cache == "static":
            kw["cache_implementation"] = "static"
        kw["pad_token_id"] = self.pad_id
        kw["eos_token_id"] = sorted(self.eos_ids)
        with torch.inference_mode():
            out = self.model.generate(**batch, **kw)
        gen = out[:, batch["input_ids"].shape[1] :].tolist()
        return _decode_rows(gen, self.tokenizer, self.eos_ids, self.pad_id, self.generation.max_new_tokens)


#: ``type`` in the config -> captioner class.
CAPTIONERS: dict[str, type[Captioner]] = {
    "transformers": TransformersCaptioner,
    "cogvlm": CogVLMCaptioner,
    "cogvlm_remote": CogVLMRemoteCaptioner,
}
# type openai (a model behind a serving engine's OpenAI API) registers itself here
import captioning.openai_client  # noqa: E402,F401


def load_captioner(spec: CaptionerSpec, generation: GenerationSettings) -> Captioner:
    """Build the captioner ``spec`` names (loads the model: once per process or actor)."""
    if spec.type != "openai":  # a served model needs no transformers in this process
        require("transformers", "transformers", extra="captioning")
    t0 = time.time()
    captioner = CAPTIONERS[spec.type](spec, generation)
    log.info("loaded %s (%s, revision %s) in %.1f s", spec.model, spec.type, spec.revision or "-", time.time() - t0)
    return captioner
