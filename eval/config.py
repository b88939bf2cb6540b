"""The ``eval:`` section of ``pipelines.yaml``: prompt sets, models, generation, metrics,
voting and the report."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from paradiffusion.config import StrictModel

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class PromptSetConfig(StrictModel):
    """One prompt file (or folder) and the reader that understands it."""

    kind: Literal["vilg300", "paraprompts", "dpg_bench"] = Field(
        description="reader: vilg300 (ViLG-300.csv), paraprompts (ParaPrompts_400.csv), dpg_bench (a prompts/ folder)"
    )
    path: str = Field(description="CSV file, or the folder of .txt files for dpg_bench")
    limit: int | None = Field(None, ge=1, description="use only the first N prompts (smoke runs)")


class ModelConfig(StrictModel):
    """A text-to-image model to evaluate, loaded by the loader its ``kind`` names."""

    kind: Literal["paradiffusion", "diffusers"] = Field(
        description="paradiffusion: our export or the official weights (training.pipeline); "
        "diffusers: any DiffusionPipeline by Hugging Face id or local path (SDXL, PixArt-Sigma, ...)"
    )
    path: str = Field(description="Hugging Face id or local folder")
    llm: str | None = Field(None, description="paradiffusion only: the Llama folder/id when not inside `path`")
    vae: str | None = Field(None, description="paradiffusion only: a VAE folder/id overriding the one in `path`")
    dtype: Literal["fp32", "fp16", "bf16"] = "fp16"
    height: int = Field(1024, ge=8, multiple_of=8)
    width: int = Field(1024, ge=8, multiple_of=8)
    steps: int = Field(50, ge=1, le=1000, description="num_inference_steps")
    guidance_scale: float = Field(7.5, ge=0)
    negative_prompt: str = ""
    batch_size: int = Field(1, ge=1, description="prompts per pipeline call")


class GenerateConfig(StrictModel):
    """`make eval-generate`: which models on which prompt sets, how many seeded images."""

    models: list[str] | None = Field(None, description="names from eval.models (null: all)")
    prompt_sets: list[str] | None = Field(None, description="names from eval.prompt_sets (null: all)")
    images_per_prompt: int = Field(4, ge=1, le=64)
    seed: int = Field(0, ge=0, description="image i of prompt p uses seed + i (the same for every model)")
    prompts_per_shard: int = Field(
        50, ge=1, description="one committed shard per model x prompt set x this many prompts"
    )
    device: str = Field("auto", description="auto (cuda:LOCAL_RANK when a GPU is there, else cpu), cpu, cuda:N")
    output: str | None = Field(None, description="eval_images table; default <data_root>/eval/images")


class PreferenceConfig(StrictModel):
    """Learned human-preference scorers; each runs only when its package (and weights) are there."""

    imagereward: str | None = Field(
        None, description="ImageReward model name or checkpoint path (pip install image-reward)"
    )
    hpsv2: str | None = Field(None, description="HPSv2 version ('v2.1') or checkpoint path (pip install hpsv2)")
    pickscore: str | None = Field(None, description="PickScore model id/folder (transformers CLIPModel)")
    pickscore_processor: str | None = Field(None, description="processor id/folder (default: same as pickscore)")


class DpgConfig(StrictModel):
    """DPG-Bench scoring: yes/no questions with dependencies asked of a VQA judge (eval/dpg.py)."""

    questions: str | None = Field(
        None,
        description="the official question file dpg_bench.csv (make fetch-benchmarks), or one of yours in its "
        "format; null: DPG-Bench images are not scored",
    )
    judge: str | None = Field(
        None,
        description="the VQA judge: a name from caption.captioners (any VLM the captioner registry loads). "
        "The official judge is mPLUG-large (ModelScope), which this tool does not load",
    )
    prompt_sets: list[str] | None = Field(None, description="prompt sets to score (null: every one of kind dpg_bench)")
    images_per_prompt: int = Field(
        4, ge=1, le=4, description="images judged per prompt: the lowest seeds, as the official 2x2 grid of four"
    )
    question_template: str = Field(
        "{question} Answer yes or no.",
        description="what the judge is asked; {question} is the file's question (mPLUG gets the bare question)",
    )
    max_new_tokens: int = Field(8, ge=1, le=256, description="the answer's token budget (its first word counts)")
    batch_size: int = Field(16, ge=1, description="images per judge call (one question, several images)")
    images_per_shard: int = Field(
        8, ge=1, description="answers are committed every this many images: a kill loses at most these"
    )

    @field_validator("question_template")
    @classmethod
    def _has_question(cls, v: str) -> str:
        if "{question}" not in v:
            raise ValueError("question_template must contain {question}")
        try:
            v.format(question="q")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"question_template may hold only the {{question}} field ({exc})") from None
        return v


class MetricsConfig(StrictModel):
    """`make eval`: automatic metrics per image, then per model x prompt set x category."""

    clip_model: str = Field("ViT-L-14", description="open_clip name, hf-hub: id or local folder")
    clip_pretrained: str | None = Field("openai", description="open_clip pretrained tag (ignored for folders/hf-hub)")
    long_clip_model: str | None = Field(
        None, description="a Long-CLIP model in open_clip layout (context 248); scored beside the chunked CLIP score"
    )
    aesthetic: str | None = Field(None, description="LAION aesthetic MLP weights (needs a ViT-L/14 clip_model)")
    fid_reference: str | None = Field(None, description="folder of reference images for FID (null: no FID)")
    fid_features: Literal["clip", "inception"] = Field(
        "clip",
        description="feature extractor for FID: the CLIP image tower, or Inception-v3 from fid_inception_weights",
    )
    fid_inception_weights: str | None = Field(None, description="torchvision inception_v3 state dict (local file)")
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    dpg: DpgConfig = Field(default_factory=DpgConfig)
    batch_size: int = Field(32, ge=1, description="images per model call; FID decodes one batch at a time")
    device: str = "auto"
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    bootstrap: int = Field(1000, ge=10, le=100000, description="bootstrap resamples (over prompts) for the CIs")
    output: str | None = Field(None, description="metrics table; default <data_root>/eval/metrics")


class VoteConfig(StrictModel):
    """`make vote`: the blind pairwise voting app."""

    folder: str | None = Field(None, description="votes.sqlite and exports; default <data_root>/eval/votes")
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)
    comparisons: list[list[str]] | None = Field(
        None, description="model pairs to compare, e.g. [[paradiffusion, sdxl]]; null: every pair of generated models"
    )
    prompt_sets: list[str] | None = Field(None, description="prompt sets to vote on (null: all generated)")
    seeds_per_prompt: int = Field(1, ge=1, description="how many of the seeded images per prompt become pairs")
    pairs_per_voter: int | None = Field(None, ge=1, description="each voter's quota (null: every pair)")
    size: tuple[int, int] | None = Field(
        None,
        description="the human study's one size [width, height]: every model in the study generates at it and "
        "every image is served at it; null: the one size the study's models share",
    )
    equalise: Literal["none", "crop"] = Field(
        "none",
        description="models or images of different sizes in one study: none (refused: the config is an error and "
        "vote-pairs skips such pairs, counted) or crop (both centre-cropped to the aspect of `size`, no bars)",
    )
    public_url: str | None = Field(
        None,
        pattern=r"^https?://[^/?#\s]+(/[^?#\s]*)?$",
        description="the address voters use (e.g. https://vote.example.org): invite links and redirects are built "
        "from it, never from a request's Host header; null: http://host:port for invites, relative redirects",
    )
    count_revoked: bool = Field(
        False, description="count the votes of voters revoked later in the report (admin votes never count)"
    )
    max_body_bytes: int = Field(4096, ge=256, le=1 << 20, description="larger request bodies get HTTP 413")

    @field_validator("size")
    @classmethod
    def _size(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not all(8 <= x <= 8192 for x in v):
            raise ValueError(f"size is [width, height], each 8 to 8192 pixels, got {list(v)}")
        return v

    @field_validator("comparisons")
    @classmethod
    def _pairs(cls, v: list[list[str]] | None) -> list[list[str]] | None:
        for pair in v or []:
            if len(pair) != 2 or pair[0] == pair[1]:
                raise ValueError(f"each comparison is two different model names, got {pair}")
        return v


class ReportConfig(StrictModel):
    """`make eval-report`: one HTML page."""

    output: str | None = Field(None, description="folder for index.html; default <data_root>/eval/report")
    bootstrap: int = Field(2000, ge=10, le=100000)
    confidence: float = Field(0.95, gt=0.5, lt=1)
    grid_prompts: int = Field(24, ge=0, description="prompts shown as image grids (per prompt set)")
    min_prompts: int = Field(
        10, ge=1, description="rows whose interval rests on fewer prompts than this are flagged on the page"
    )


class EvalConfig(StrictModel):
    """The whole ``eval:`` section."""

    prompt_sets: dict[str, PromptSetConfig] = Field(default_factory=dict)
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    vote: VoteConfig = Field(default_factory=VoteConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)

    @field_validator("prompt_sets", "models")
    @classmethod
    def _names(cls, v: dict) -> dict:
        import re

        for name in v:
            if not re.match(_NAME, name):
                raise ValueError(f"name {name!r} must match {_NAME} (it becomes part of file and shard names)")
        return v

    @model_validator(mode="after")
    def _references(self) -> EvalConfig:
        def check(names: list[str] | None, known: dict, where: str) -> None:
            for n in names or []:
                if n not in known:
                    raise ValueError(f"{where}: {n!r} is not defined; defined: {sorted(known)}")

        check(self.generate.models, self.models, "generate.models")
        check(self.generate.prompt_sets, self.prompt_sets, "generate.prompt_sets")
        check(self.vote.prompt_sets, self.prompt_sets, "vote.prompt_sets")
        check(self.metrics.dpg.prompt_sets, self.prompt_sets, "metrics.dpg.prompt_sets")
        for pair in self.vote.comparisons or []:
            check(pair, self.models, "vote.comparisons")
        self._one_study_size()
        return self

    def study_models(self) -> list[str]:
        """The models of the human study: those of ``vote.comparisons``, else the generated ones."""
        if self.vote.comparisons:
            return sorted({m for pair in self.vote.comparisons for m in pair})
        return list(self.generate.models or self.models)

    def study_size(self) -> tuple[int, int] | None:
        """``vote.size``, else the one size the study's models share (None without models)."""
        if self.vote.size is not None:
            return tuple(self.vote.size)
        sizes = {(self.models[m].width, self.models[m].height) for m in self.study_models() if m in self.models}
        return sizes.pop() if len(sizes) == 1 else None

    def _one_study_size(self) -> None:
        """Same shape by construction: every model of the human study generates at the
        study's size, unless ``vote.equalise`` says how to bring them to one."""
        v = self.vote
        sizes = {m: (self.models[m].width, self.models[m].height) for m in self.study_models() if m in self.models}
        shown = ", ".join(f"{m} {w}x{h}" for m, (w, h) in sorted(sizes.items()))
        if v.size is not None and v.equalise == "none":
            off = sorted(m for m, s in sizes.items() if s != tuple(v.size))
            if off:
                raise ValueError(
                    f"eval.vote.size is {v.size[0]}x{v.size[1]} but eval.models.{off[0]}.width/height differ "
                    f"({shown}): a voter could tell the models apart by shape. Generate every model of the study "
                    "at eval.vote.size, or set eval.vote.equalise: crop (allowed: none, crop)"
                )
        elif v.size is None and len(set(sizes.values())) > 1:
            raise ValueError(
                f"the models of the human study (eval.vote.comparisons) generate at different sizes ({shown}): a "
                "voter could tell them apart by shape. Give them one width/height, or set eval.vote.size and "
                "eval.vote.equalise: crop (allowed: none, crop)"
            )
