"""The ``caption:`` section of ``pipelines.yaml``.

Captioners are named entries in ``caption.captioners``; ``caption.captioner`` picks the
one a run uses, and ``caption.prompt`` picks a named prompt template from
``caption.prompts``. Several captioners and prompts can be listed at once: captions
from each (model, revision, prompt) are kept side by side in the ``captions`` table.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from paradiffusion.config import StrictModel

#: The prompt ParaDiffusion used with CogVLM-17B to caption ParaImage-Big.
PAPER_PROMPT = (
    "Provide a detailed description of the image using around 100-500 words, including the objects, "
    "attributes, and spatial locations depicted in the picture."
)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.count("/") != 1


class ServerSettings(StrictModel):
    """``type: openai``: OpenAI-compatible serving engines (vLLM, lmdeploy, SGLang, ``transformers serve``)."""

    endpoints: list[str] = Field(
        ...,
        min_length=1,
        description="base URLs of the API, each ending in /v1 (e.g. http://gpu-node-1:8000/v1); the stage spreads "
        "requests over them (fewest in flight first)",
    )
    served_model: str | None = Field(
        None, description="the name the servers know the model by (vLLM --served-model-name); null: the model setting"
    )
    api_key_env: str | None = Field(
        "PARADIFFUSION_CAPTION_API_KEY",
        description="name of the environment variable holding the API key (the key itself is never written to a "
        "config or log); unset or empty variable: no Authorization header",
    )
    engine: str | None = Field(
        None,
        description="engine label recorded with each caption when the server does not report one "
        "(transformers serve does not; vLLM, lmdeploy and SGLang do)",
    )
    concurrency: int = Field(16, ge=1, le=4096, description="requests in flight per endpoint (over all actors)")
    connect_timeout_s: float = Field(10.0, gt=0, le=600)
    timeout_s: float = Field(600.0, gt=0, le=7200, description="seconds one request may take (read timeout)")
    retries: int = Field(5, ge=0, le=100, description="retries of a request that failed (429, 5xx, timeout, no route)")
    backoff_s: float = Field(1.0, ge=0, le=600, description="first wait before a retry; doubles each retry")
    max_backoff_s: float = Field(60.0, ge=0, le=3600, description="longest wait (a Retry-After header wins over it)")
    max_consecutive_failures: int = Field(
        20,
        ge=1,
        le=100_000,
        description="requests in a row that failed after their retries: the stage stops, rows in flight stay pending",
    )
    image_format: Literal["png", "jpeg"] = Field(
        "png", description="how images travel as data URLs: png (lossless: the server sees our pixels) or jpeg"
    )
    jpeg_quality: int = Field(95, ge=50, le=100)
    extra_body: dict = Field(
        default_factory=dict, description="engine-specific request fields sent as they are (e.g. {top_k: 1})"
    )

    @field_validator("endpoints")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        out = []
        for url in v:
            u = url.strip().rstrip("/")
            if not re.match(r"^https?://[^/\s]+", u):
                raise ValueError(f"endpoint {url!r} is not an http(s) URL (e.g. http://gpu-node-1:8000/v1)")
            out.append(u)
        if len(set(out)) != len(out):
            raise ValueError("an endpoint is listed twice")
        return out


class CaptionerSpec(StrictModel):
    """One vision-language model and how to load it."""

    type: Literal["transformers", "cogvlm", "cogvlm_remote", "openai"] = Field(
        "transformers",
        description="transformers: any AutoModelForImageTextToText with a processor chat template; "
        "cogvlm: CogVLM / CogVLM2 implemented natively (no remote code; the family comes from config.json); "
        "cogvlm_remote: their Hub remote code (opt-in; pinned model and tokenizer revisions only); "
        "openai: a model served by an engine (vLLM, lmdeploy, SGLang, transformers serve) over the OpenAI API",
    )
    model: str = Field(
        ..., min_length=1, description="Hugging Face id or local folder (openai: what the server serves)"
    )
    server: ServerSettings | None = Field(None, description="type openai only: the endpoints and how to call them")
    revision: str | None = Field(
        None,
        description="commit SHA on the Hub; required (40 hex digits) for remote code "
        "(trust_remote_code or type cogvlm_remote)",
    )
    trust_remote_code: bool = False
    tokenizer: str | None = Field(None, description="tokenizer id or folder when not the model's own (CogVLM v1)")
    tokenizer_revision: str | None = Field(
        None, description="commit SHA of the tokenizer repo (required for remote code)"
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "bfloat16"
    quantization: Literal["none", "8bit", "4bit"] = Field("none", description="8/4-bit loading needs bitsandbytes")
    device: Literal["auto", "cuda", "cpu"] = "auto"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = None
    cache: Literal["dynamic", "static"] = Field(
        "dynamic", description="static: a pre-allocated KV cache that transformers compiles the decode step for"
    )
    template_version: Literal["chat", "vqa", "base", "chat_old"] = Field(
        "chat",
        description="CogVLM prompt template: chat 'Question: {prompt} Answer:', vqa '... Short answer:', base "
        "the prompt alone, chat_old CogAgent's '<EOI>Question: {prompt} Answer:'",
    )
    pad_token_id: int | None = Field(None, ge=0, description="CogVLM: pad id when the tokenizer has none")
    batch_size: int | None = Field(None, ge=1, le=4096, description="overrides caption.batch_size for this model")

    @model_validator(mode="after")
    def _remote_code_is_pinned(self) -> CaptionerSpec:
        if self.type == "openai" and self.server is None:
            raise ValueError("type openai needs server.endpoints (the base URLs of the serving engines)")
        if self.type != "openai" and self.server is not None:
            raise ValueError(f"server is for type openai only (this captioner is type {self.type})")
        if self.type == "cogvlm" and self.trust_remote_code:
            raise ValueError(
                "type cogvlm runs the native CogVLM code and never remote code: drop trust_remote_code, "
                "or use type cogvlm_remote to run the Hub's own code (pinned revisions only)"
            )
        remote = self.trust_remote_code or self.type == "cogvlm_remote"
        pins = [("revision", self.model, self.revision)]
        if self.tokenizer:
            pins.append(("tokenizer_revision", self.tokenizer, self.tokenizer_revision))
        for key, name, rev in pins:
            if remote and not _looks_local(name) and rev is not None and not _SHA_RE.match(rev):
                raise ValueError(
                    f"{key} {rev!r}: remote code runs Python from the Hub, so pin {name} to a full 40-hex commit SHA "
                    "(not a branch or tag)"
                )
        return self


class GenerationSettings(StrictModel):
    """Decoding settings, passed to ``generate`` and saved (as JSON) with every caption."""

    max_new_tokens: int = Field(512, ge=1, le=8192)
    min_new_tokens: int = Field(0, ge=0, le=8192)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0, le=5)
    top_p: float = Field(1.0, gt=0, le=1)
    num_beams: int = Field(1, ge=1, le=16)
    repetition_penalty: float = Field(1.0, ge=1.0, le=3.0)

    def generate_kwargs(self) -> dict:
        kw: dict = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "num_beams": self.num_beams,
            "repetition_penalty": self.repetition_penalty,
        }
        if self.min_new_tokens:
            kw["min_new_tokens"] = self.min_new_tokens
        if self.do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p)
        return kw


class ImagePrep(StrictModel):
    """The CPU operator: decode, fix orientation, resize, bucket by aspect ratio."""

    resize: Literal["bucket", "max_side", "none"] = Field(
        "max_side",
        description="bucket: resize to the aspect bucket's size (same-size batches, no image-token padding "
        "for dynamic-resolution models such as Qwen2.5-VL); max_side: only shrink the longer side; none",
    )
    max_side: int = Field(1024, ge=32, le=8192, description="longest side after resize (max_side mode)")
    bucket_pixels: int = Field(448 * 448, ge=32 * 32, le=4096 * 4096, description="pixels of a bucket-mode image")
    size_multiple: int = Field(28, ge=1, le=256, description="bucket sizes are multiples of this (Qwen2.5-VL: 28)")
    aspect_buckets: list[float] = Field(
        [0.5, 0.67, 0.75, 1.0, 1.33, 1.5, 2.0],
        min_length=1,
        description="width/height ratios; each image goes to the nearest (in log ratio)",
    )

    @field_validator("aspect_buckets")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(r <= 0 for r in v):
            raise ValueError("aspect ratios must be > 0")
        return sorted(v)


class QualityFlags(StrictModel):
    """When a caption gets a quality flag. Flags are counted, stored, never used to drop."""

    min_words: int = Field(50, ge=0, description="fewer words than this: too_short")
    repetition_ngram: int = Field(4, ge=2, le=16)
    repetition_max_fraction: float = Field(
        0.3, gt=0, le=1, description="share of word n-grams that repeat an earlier one above which: repetition"
    )
    repetition_tail_repeats: int = Field(
        3, ge=2, description="a word span repeated this many times at the end: repetition"
    )
    refusal_patterns: list[str] = Field(
        default_factory=lambda: [
            r"\bI(?:'m| am) sorry\b",
            r"\bI (?:can ?not|can't|am unable to|'m unable to)\b",
            r"\bas an AI\b",
            r"\bunable to (?:see|view|describe|provide)\b",
            r"\bno image (?:was|is) (?:provided|attached)\b",
        ],
        description="regular expressions (case-insensitive) looked for in the first refusal_window characters",
    )
    refusal_window: int = Field(300, ge=1)
    language: str | None = Field("en", description="ISO 639-1 code captions should be in; null: no check")
    language_min_score: float = Field(0.5, ge=0, le=1, description="py3langid probability below which: not_english")

    @field_validator("refusal_patterns")
    @classmethod
    def _compiles(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"refusal pattern {p!r} is not a valid regular expression: {exc}") from None
        return v


class SelectPreference(StrictModel):
    """One entry of the selection priority: a model id, a prompt id, or both."""

    model: str | None = None
    prompt: str | None = None


class SelectRule(StrictModel):
    """How the "selected caption" (one per key) is chosen among coexisting captions."""

    prefer: list[SelectPreference] = Field(
        default_factory=lambda: [SelectPreference(prompt="paper")],
        description="in order; a caption matching an earlier entry wins",
    )
    then: Literal["latest", "longest", "fewest_flags"] = Field(
        "fewest_flags", description="tie-break among captions of equal preference"
    )
    exclude_flags: list[str] = Field(
        default_factory=lambda: ["empty", "refusal", "error"], description="captions with any of these never win"
    )


class CaptionResources(StrictModel):
    """Where and how wide captioning runs."""

    executor: Literal["ray", "local"] = Field(
        "ray", description="ray: Ray Data (CPU decode operator + model actor pool); local: one process, a plain loop"
    )
    num_actors: int | None = Field(None, ge=1, description="model actors; null: GPUs x actors_per_gpu (1 on CPU)")
    actors_per_gpu: int = Field(1, ge=1, le=16, description="actors sharing one GPU (each asks for 1/N of it)")
    cpus_per_actor: float = Field(1.0, gt=0)
    decode_cpus: float = Field(1.0, gt=0, description="CPUs per decode task")
    max_decode_tasks: int | None = Field(None, ge=1, description="parallel decode tasks; null: Ray decides")


class CaptionConfig(StrictModel):
    """``caption:``: VLM paragraph captions for the kept set (ParaImage-Big)."""

    images: str | None = Field(None, description="images table; null: <data_root>/images")
    scores: str | None = Field(None, description="scores table (kept set); null: <data_root>/scores")
    output: str | None = Field(None, description="captions table; null: <data_root>/captions")
    captioner: str = Field("cogvlm", description="name of the entry in caption.captioners this run uses")
    captioners: dict[str, CaptionerSpec] = Field(
        default_factory=lambda: {
            "cogvlm": CaptionerSpec(
                type="cogvlm",
                model="THUDM/cogvlm-chat-hf",
                tokenizer="lmsys/vicuna-7b-v1.5",
            )
        }
    )
    prompt: str = Field("paper", description="name of the template in caption.prompts")
    prompts: dict[str, str] = Field(default_factory=lambda: {"paper": PAPER_PROMPT})
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    batch_size: int = Field(16, ge=1, le=4096, description="images per generate call")
    chunk_rows: int = Field(256, ge=1, le=100_000, description="captions per output shard (the commit unit)")
    image: ImagePrep = Field(default_factory=ImagePrep)
    quality: QualityFlags = Field(default_factory=QualityFlags)
    select: SelectRule = Field(default_factory=SelectRule)
    resources: CaptionResources = Field(default_factory=CaptionResources)

    @field_validator("prompts")
    @classmethod
    def _prompt_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name, text in v.items():
            if not _NAME_RE.match(name):
                raise ValueError(f"prompt name {name!r} must match {_NAME_RE.pattern}")
            if not text.strip():
                raise ValueError(f"prompt {name!r} is empty")
        return v

    @model_validator(mode="after")
    def _names_exist(self) -> CaptionConfig:
        if self.captioner not in self.captioners:
            raise ValueError(
                f"caption.captioner = {self.captioner!r} is not in caption.captioners "
                f"(one of: {', '.join(self.captioners) or 'none defined'})"
            )
        spec = self.captioners[self.captioner]
        if spec.type == "openai" and self.generation.num_beams > 1:
            raise ValueError(
                f"caption.generation.num_beams = {self.generation.num_beams}: the OpenAI API has no beam search "
                f"(captioner {self.captioner!r} is type openai); use num_beams: 1"
            )
        if self.prompt not in self.prompts:
            raise ValueError(
                f"caption.prompt = {self.prompt!r} is not in caption.prompts (one of: {', '.join(self.prompts)})"
            )
        return self

    @property
    def spec(self) -> CaptionerSpec:
        return self.captioners[self.captioner]

    @property
    def prompt_text(self) -> str:
        return self.prompts[self.prompt]

    @property
    def effective_batch_size(self) -> int:
        spec = self.spec
        if spec.batch_size is None and spec.server is not None:
            # a served captioner's batch is the requests one actor keeps in flight; the batch waits for its
            # slowest request, so it holds several rounds of the endpoints' concurrency
            return min(4096, max(self.batch_size, 4 * spec.server.concurrency * len(spec.server.endpoints)))
        return spec.batch_size or self.batch_size
