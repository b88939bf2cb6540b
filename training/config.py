"""The ``train:`` and ``generate:`` sections of pipelines.yaml.

One small config class per component (model, LoRA, data, optimiser, DeepSpeed,
checkpoints, logging, launch), composed into one :class:`StageConfig` per training
stage, torchtitan style. Every model forbids unknown keys and bounds its numbers, so
a typo or a bad value stops at load time with the key named.

Paths left ``null`` are derived from ``project.data_root`` by :func:`resolve_paths`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from paradiffusion.config import StrictModel

# The release's UNet: SD-style (no SDXL added time ids or pooled text), the layout of
# SDXL-base's UNet (320/640/1280 channels, transformer depth 1/2/10, head dims 5/10/20,
# linear projections) with cross_attention_dim 4096 = Llama-2-7B's hidden size, because
# the release's pipeline feeds the Llama states to the UNet as they are. The released
# unet/config.json could not be read when this was written (see docs/release_parity.md;
# `scripts/release_parity.py unet-config <release>/unet/config.json` compares it). 2.90 B
# parameters (2.56 B at cross-attention 2048). For the projection variant set text_projection: linear and e.g.
# cross_attention_dim: 2048 (the previous default).
DEFAULT_UNET: dict = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 4096,
    "use_linear_projection": True,
}

#: Keys that moved out of ``train.model`` into every stage block.
MOVED_MODEL_KEYS = {
    "unet_gradient_checkpointing": "gradient_checkpointing.unet",
    "llm_gradient_checkpointing": "gradient_checkpointing.llm",
}


class ModelConfig(StrictModel):
    """Where each part of the model comes from (Hugging Face id or local path) and how they connect."""

    llm: str = Field("meta-llama/Llama-2-7b-hf", description="LlamaModel + tokenizer: HF id or local folder.")
    llm_revision: str | None = None
    unet: str | None = Field(None, description="Folder or HF id of a UNet2DConditionModel; null builds `unet_config`.")
    unet_subfolder: str | None = Field(None, description="Subfolder of `unet` holding the UNet (e.g. 'unet').")
    unet_config: dict = Field(
        default_factory=lambda: dict(DEFAULT_UNET),
        description="UNet2DConditionModel kwargs when `unet` is null (random init).",
    )
    text_projection: Literal["none", "linear"] = Field(
        "none",
        description="none: the UNet reads the LLM states directly (the release; cross_attention_dim = LLM width); "
        "linear: a trainable Linear(LLM width -> cross_attention_dim) in between",
    )
    conditioning: Literal["release", "masked"] = Field(
        "release",
        description="release: captions EOS-padded to the stage's max_length, no mask for the UNet (what the official "
        "weights were trained with); masked: padded to the longest caption, mask passed to the UNet",
    )
    llm_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="the dtype the LLM computes text states in, the same in training (its frozen weights stay in it "
        "under bf16 DeepSpeed), in cache-text and in generate (the export's paradiffusion.json records it); float32: "
        "what the release samples with; bfloat16 halves the LLM's memory",
    )
    vae: str = Field("madebyollin/sdxl-vae-fp16-fix", description="AutoencoderKL: HF id or local folder.")
    scheduler: str | None = Field(None, description="Folder with a DDPM scheduler config; null: the SD schedule.")
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data):
        """The gradient-checkpointing switches moved to each stage; an old config says where."""
        if isinstance(data, dict):
            for old, new in MOVED_MODEL_KEYS.items():
                if old in data:
                    raise ValueError(
                        f"train.model.{old} moved to each stage: set train.stage1/2/3.{new} (default true) and "
                        f"remove train.model.{old}"
                    )
        return data


class LoraConfig(StrictModel):
    """LoRA on the LLM (stage 2), with peft."""

    rank: int = Field(64, ge=1, le=1024)
    alpha: float = Field(64.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)


class DataConfig(StrictModel):
    """What a stage reads: images (img2dataset shards, or a published dataset's WebDataset tars) and its captions."""

    format: Literal["parquet", "webdataset"] = Field(
        "parquet",
        description="parquet: the images table (img2dataset shards, data.images); webdataset: tar shards "
        "({key}.jpg|png, .txt, .json) of a dataset written by `paradiffusion publish` (data.path)",
    )
    path: str | list[str] | None = Field(
        None,
        description="format webdataset: the published folder (its webdataset/index.json), an index.json, or tar "
        "shard URLs (a list, or a brace pattern shard-{000..009}.tar); local or any fsspec URL",
    )
    subset: Literal["big", "small"] = Field(
        "big", description="format webdataset: the index's subset (big: ParaImage-Big, small: ParaImage-Small)"
    )
    images: str | None = Field(None, description="images table folder; null: <data_root>/images")
    scores: str | None = Field(
        None, description="scores table; when set (or found at <data_root>/scores) only kept images"
    )
    caption_source: Literal["alt_text", "captions", "table", "txt"] = Field(
        "alt_text",
        description="alt_text: images.caption (webdataset: the .json's alt_text); captions: the captions table; "
        "table: any key+caption table; txt (webdataset only): each sample's .txt, the published caption",
    )
    captions: str | None = Field(
        None,
        description="null: <data_root>/captions (captions) or <data_root>/small_train (table: any key+caption table)",
    )
    caption_model_id: str | None = Field(None, description="captions table: use rows of this model_id (null: any)")
    caption_prompt_id: str | None = Field(None, description="captions table: use rows of this prompt_id (null: any)")
    resolution: int = Field(1024, ge=8, description="pixel area of a bucket is about resolution^2")
    bucket_step: int = Field(64, ge=1, description="bucket sides are multiples of this (VAE x UNet downsampling)")
    max_aspect_ratio: float = Field(2.0, ge=1.0, description="buckets from 1/r to r (long/short side)")
    random_crop: bool = False
    random_flip: bool = True
    shuffle_buffer: int = Field(256, ge=1, description="samples gathered to fill buckets before yielding")
    latents: str | None = Field(
        None, description="cached VAE latents (make cache-latents); when set, trains on them instead of decoding images"
    )
    text_cache: str | None = Field(
        None,
        description="cached LLM states of the stage's captions (make cache-text); when set, stages with a frozen LLM "
        "(1, 3) train on them and do not load the LLM",
    )
    num_workers: int = Field(
        4, ge=0, description="loader processes per rank (read, decode, crop; text states); 0: all in the training loop"
    )
    prefetch: int = Field(
        2, ge=1, description="batches each loader process prepares ahead (DataLoader prefetch_factor)"
    )

    @model_validator(mode="after")
    def _format(self) -> DataConfig:
        if self.format == "webdataset":
            if not self.path:
                raise ValueError(
                    "data.path: format webdataset needs the published folder, its index.json or tar shard URLs"
                )
            if self.images:
                raise ValueError("data.images is the parquet input; with format webdataset set data.path only")
        else:
            if self.path:
                raise ValueError(
                    f"data.path is read by format webdataset only (format is {self.format}); set data.images "
                    "for the images table or data.format: webdataset"
                )
            if self.caption_source == "txt":
                raise ValueError(
                    "data.caption_source txt (a sample's .txt) needs data.format: webdataset; allowed for parquet: "
                    "alt_text, captions, table"
                )
        return self


class OptimConfig(StrictModel):
    """AdamW and its learning-rate schedule."""

    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(500, ge=0)
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    max_skipped_steps: int = Field(
        3,
        ge=0,
        description="optimizer steps DeepSpeed may skip in a row (non-finite gradients with a finite loss) before "
        "the run stops; every skipped step is counted in metrics.jsonl and the summary either way",
    )


class DeepSpeedConfig(StrictModel):
    """The DeepSpeed engine (the JSON config is built from these)."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    gradient_clipping: float = Field(1.0, ge=0)
    check_grad_overflow: bool = Field(
        True,
        description="bf16: DeepSpeed checks the gradients every step and skips a step whose gradients are not "
        "finite (counted; optim.max_skipped_steps); false: 2 fewer host syncs per step, and a non-finite gradient "
        "is applied instead, then stops the run at the next read (logging.every_steps) with nothing saved from it",
    )
    offload_optimizer: bool = Field(False, description="ZeRO-Offload of optimizer states to CPU")
    overlap_comm: bool = True


class CheckpointConfig(StrictModel):
    """How often to checkpoint and how many to keep."""

    every_steps: int = Field(1000, ge=1)
    keep_last: int = Field(3, ge=1)
    resume: bool = Field(True, description="resume from the newest committed checkpoint in the output folder")


class LoggingConfig(StrictModel):
    """TensorBoard scalars and validation images."""

    every_steps: int = Field(10, ge=1)
    validation_every_steps: int = Field(1000, ge=1)
    validation_prompts: list[str] = Field(
        default_factory=lambda: [
            "A red fox sitting in fresh snow at dawn, its breath visible in the cold air.",
            "A cosy reading nook by a rainy window, a cup of tea on the sill and a cat asleep on a blanket.",
        ]
    )
    validation_steps: int = Field(30, ge=1, description="sampling steps for validation images")
    validation_size: tuple[int, int] = Field((512, 512), description="(height, width) of validation images")
    guidance_scale: float = Field(7.5, ge=1.0)


class LaunchConfig(StrictModel):
    """How `paradiffusion train` starts processes."""

    launcher: Literal["auto", "deepspeed", "none"] = Field(
        "auto", description="auto: deepspeed launcher when GPUs/hostfile are configured, else one plain process"
    )
    num_gpus: int | None = Field(None, ge=1, description="GPUs per node (null: all visible)")
    num_nodes: int | None = Field(None, ge=1)
    hostfile: str | None = Field(None, description="deepspeed hostfile for multi-node ('host slots=8' per line)")
    master_port: int = Field(29500, ge=1024, le=65535)
    cpu_threads: int | None = Field(
        None, ge=1, description="torch threads per rank when training on CPU (null: default)"
    )


class EmaConfig(StrictModel):
    """Exponential moving average of every trained parameter (UNet, projection, LoRA), in fp32.

    Kept from DeepSpeed's fp32 master weights, each rank its own piece (4 bytes x trained
    parameters / ranks); see training/ema.py. The decay of update n is diffusers' EMAModel's:
    ``warmup: ratio`` min(decay, (1 + k) / (10 + k)) with k = n - 1 (EMAModel's default),
    ``power`` min(decay, 1 - (1 + k / inv_gamma) ** -power) (its use_ema_warmup), ``none`` decay.
    """

    enabled: bool = True
    decay: float = Field(0.9999, gt=0, lt=1, description="the largest decay (reached after the warmup)")
    warmup: Literal["ratio", "power", "none"] = Field(
        "ratio", description="ratio: (1+k)/(10+k) (diffusers' default); power: 1-(1+k/inv_gamma)^-power; none"
    )
    inv_gamma: float = Field(1.0, gt=0, description="warmup: power")
    power: float = Field(2 / 3, gt=0, description="warmup: power (2/3 for ~1M steps, 3/4 for shorter runs)")
    device: Literal["accelerator", "cpu"] = Field(
        "accelerator", description="where this rank's EMA lives: beside the master weights, or in CPU memory"
    )
    export: bool = Field(True, description="export the EMA weights (else the raw fp32 master weights)")


class GradientCheckpointingConfig(StrictModel):
    """Recompute activations in the backward pass instead of keeping them: less memory, about a third more compute."""

    unet: bool = Field(True, description="the UNet's blocks (diffusers enable_gradient_checkpointing)")
    llm: bool = Field(True, description="the LLM's layers, when it trains (stage 2's LoRA)")


class CompileConfig(StrictModel):
    """``torch.compile`` of the UNet and the LLM (``nn.Module.compile``: parameter names, checkpoints and exports
    unchanged). The first steps of each new bucket shape compile; later ones reuse the graphs."""

    unet: bool = Field(False, description="compile the UNet's forward (and so its backward)")
    llm: bool = Field(
        False,
        description="compile the LLM's forward when it is loaded: stage 2 (with its LoRA, trained) or a frozen "
        "stage without a text cache",
    )
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode"
    )
    backend: str = Field("inductor", description="torch.compile backend (inductor; aot_eager or eager to debug)")
    dynamic: bool | None = Field(
        None, description="torch.compile dynamic: null lets torch mark shapes dynamic once a second bucket shape shows"
    )


class StageConfig(StrictModel):
    """One training stage."""

    output: str | None = Field(
        None,
        description="run folder (local path or URL: a URL is mirrored from a local staging folder, see "
        "train.staging_dir); null: <data_root>/train/stage<N>",
    )
    init_from: str | None = Field(
        None, description="export folder of the previous stage (unet/, text_projection/, ...); local path or URL"
    )
    train_lora: bool = Field(False, description="LoRA on the LLM (stage 2)")
    max_length: int = Field(
        256,
        ge=8,
        le=4096,
        description="LLM tokens per caption (paper: 256 stage 1, 512 stages 2-3; the release samples with 256). "
        "With release conditioning every caption is padded to it; the export records it",
    )
    max_steps: int = Field(10000, ge=1)
    micro_batch_size: int = Field(8, ge=1, description="per GPU")
    gradient_accumulation: int = Field(1, ge=1)
    caption_dropout: float = Field(0.1, ge=0, le=1, description="probability a caption becomes '' (for CFG)")
    min_snr_gamma: float | None = Field(5.0, gt=0, description="min-SNR loss weighting; null: plain MSE")
    noise_offset: float = Field(0.0, ge=0)
    gradient_checkpointing: GradientCheckpointingConfig = Field(default_factory=GradientCheckpointingConfig)
    compile: CompileConfig = Field(default_factory=CompileConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    ema: EmaConfig = Field(default_factory=EmaConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)


#: What differs between the stages by default: (stage keys, data keys).
STAGE_DEFAULTS: dict[str, tuple[dict, dict]] = {
    "stage1": ({"max_length": 256, "train_lora": False}, {"caption_source": "alt_text"}),
    "stage2": ({"max_length": 512, "train_lora": True}, {"caption_source": "captions"}),
    "stage3": ({"max_length": 512, "train_lora": False}, {"caption_source": "table", "subset": "small"}),
}


def _stage(name: str) -> StageConfig:
    defaults, data = STAGE_DEFAULTS[name]
    return StageConfig(data=DataConfig(**data), **defaults)


class TrainConfig(StrictModel):
    """The ``train:`` section: shared model/LoRA/DeepSpeed/launch settings plus one block per stage."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    stage1: StageConfig = Field(default_factory=lambda: _stage("stage1"))
    stage2: StageConfig = Field(default_factory=lambda: _stage("stage2"))
    stage3: StageConfig = Field(default_factory=lambda: _stage("stage3"))
    staging_dir: str | None = Field(
        None,
        description="local folder where a stage whose output is a URL (s3://...) runs: DeepSpeed writes its "
        "checkpoints to a file system, and each committed checkpoint and the export are then copied to the URL "
        "(marker last); a URL init_from is fetched here. null: ~/.cache/paradiffusion/train-staging",
    )

    @model_validator(mode="before")
    @classmethod
    def _stage_defaults(cls, data):
        """A stage block given in YAML keeps its stage's own defaults for keys it leaves out."""
        if isinstance(data, dict):
            data = dict(data)
            for name, (defaults, data_defaults) in STAGE_DEFAULTS.items():
                block = data.get(name)
                if isinstance(block, dict):
                    block = {**defaults, **block}
                    block["data"] = {**data_defaults, **(block.get("data") or {})}
                    data[name] = block
        return data

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.stage3.train_lora:
            raise ValueError("train.stage3.train_lora: stage 3 keeps the LLM frozen (stage-2 LoRA merged); set false")
        for n in (1, 2, 3):
            sc = self.stage(n)
            if sc.train_lora and sc.data.text_cache:
                raise ValueError(
                    f"train.stage{n}.data.text_cache: this stage trains the LLM's LoRA, so its text states change "
                    "every step and cannot be cached; set it to null"
                )
        return self

    def stage(self, n: int) -> StageConfig:
        return {1: self.stage1, 2: self.stage2, 3: self.stage3}[n]


class GenerateConfig(StrictModel):
    """The ``generate:`` section: text to image with an export or the official weights."""

    preset: Literal["default", "release"] = Field(
        "default",
        description="release: sample as the release's demo does, so the official weights give its image: UNet and "
        "VAE in fp16 on a GPU (dtype: auto), seed 45 for every prompt (seed left unset), the noise drawn on the "
        "pipeline's device (a CUDA generator on a GPU) in the UNet's dtype and the latents stepped in it; "
        "default: ours (fp32 noise from a CPU generator, seed + prompt index, bf16 on GPU)",
    )
    model: str | None = Field(None, description="export folder or HF id (weijiawu/ParaDiffusion); null: stage-3 export")
    llm: str | None = Field(None, description="override the LLM id/path the export names")
    vae: str | None = Field(None, description="override the VAE id/path the export names")
    output: str | None = Field(None, description="folder for PNGs; null: <data_root>/generated")
    width: int = Field(1024, ge=8, description="the release samples 1024 wide x 640 high; a multiple of 8")
    height: int = Field(640, ge=8, description="a multiple of 8 (the VAE's downsampling), as the release accepts")
    num_inference_steps: int = Field(100, ge=1)
    guidance_scale: float = Field(7.5, ge=1.0)
    negative_prompt: str = ""
    seed: int | None = Field(None, ge=0, description="null: 0 (prompt i: seed + i), or 45 with preset release")
    max_length: int | None = Field(
        None,
        ge=8,
        le=4096,
        description="tokens per prompt; null: the export's (paradiffusion.json), 256 for the release",
    )
    conditioning: Literal["release", "masked"] | None = Field(
        None, description="null: as the model was trained (paradiffusion.json; release for the official weights)"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="UNet and VAE; auto: bf16 on GPU (preset release: fp16), fp32 on CPU"
    )
    llm_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None,
        description="the text encoder's dtype; null: the one the model was trained with (paradiffusion.json's "
        "llm_dtype; float32 for the release and for exports that do not record it)",
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
