"""Config schemas of the curation stages: the ``download`` and ``filter`` sections of
``pipelines.yaml``. Each class is one section; ``pipelines/config.py`` composes them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from paradiffusion.config import StrictModel

# --------------------------------------------------------------------------- download
#: URL-list formats the download stage reads ("auto": from the file extension).
URL_LIST_FORMATS = ("parquet", "csv", "tsv", "jsonl", "csv.gz", "tsv.gz", "jsonl.gz")


class ListConfig(StrictModel):
    """One denylist: a txt/csv/parquet file (local or fsspec URL) of URLs, domains or image hashes."""

    name: str = Field(..., min_length=1, description="named in the funnel's detail (reason `denylisted`)")
    path: str = Field(..., description="the list file: .txt (one entry a line), .csv or .parquet; local or s3://...")
    kind: Literal["url", "domain", "md5", "sha256", "pdq"] = Field(
        ..., description="what the entries are: URLs (normalised), domains, MD5 / SHA-256 of the bytes, PDQ hashes"
    )
    column: str | None = Field(
        None, description="csv/parquet column; null: the column named like the kind, else the first"
    )
    max_distance: int = Field(31, ge=0, le=256, description="pdq only: Hamming distance (bits) that still matches")


class OptOutListConfig(StrictModel):
    """One opt-out list: URLs or domains whose owners asked not to be used (reason `opted_out`)."""

    name: str = Field(..., min_length=1)
    path: str = Field(..., description="the list file: .txt, .csv or .parquet; local or s3://...")
    kind: Literal["url", "domain"] = Field(..., description="URLs (normalised) or domains (with their subdomains)")
    column: str | None = Field(
        None, description="csv/parquet column; null: the column named like the kind, else the first"
    )


class DownloadConfig(StrictModel):
    """``download``: fetch a URL list into img2dataset parquet shards (the ``images`` table).

    Every key maps onto an ``img2dataset.download`` argument of the same name, except
    ``input``/``output`` (``url_list``/``output_folder``), ``url_col``/``caption_col``
    (auto-detected when null) and ``max_aspect_ratio``/``max_image_area`` (null means
    no limit). The defaults keep original images (ParaImage keeps large images: mean
    short side 771 px in ParaImage-Big, 1,326 px in ParaImage-Small) as the bytes that
    arrived: nothing is decoded at download, and the filter's decode judges every image
    with its own reasons (``decode_error``, ``decompression_bomb``, ``animated``, ...).
    """

    input: str | None = Field(
        None,
        description="URL list: a file, a folder of files, or a glob (local path or fsspec URL). Required to run.",
    )
    input_format: Literal["auto", "parquet", "csv", "tsv", "jsonl", "csv.gz", "tsv.gz", "jsonl.gz"] = Field(
        "auto", description="'auto' reads it from the file extension"
    )
    url_col: str | None = Field(None, description="URL column; null: auto-detect (url, URL, image_url, ...)")
    caption_col: str | None = Field(None, description="alt-text column; null: auto-detect (caption, TEXT, ...)")
    save_additional_columns: list[str] = Field(
        default_factory=list, description="input columns copied into the shards (e.g. LAION's similarity, punsafe)"
    )
    output: str | None = Field(None, description="images table folder; null: <project.data_root>/images")

    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = Field(
        "no", description="'no' keeps the original size (the ParaImage default)"
    )
    image_size: int = Field(1024, ge=16, description="target side for any resize_mode except 'no'")
    resize_only_if_bigger: bool = Field(True, description="never upscale")
    min_image_size: int = Field(0, ge=0, description="reject images whose short side is below this (0: off)")
    max_aspect_ratio: float | None = Field(None, ge=1.0, description="reject long/short above this; null: off")
    max_image_area: float | None = Field(
        100_000_000,
        gt=0,
        description="when the download decodes (re-encoding or resizing): reject width*height above this, read from "
        "the header before anything is decoded; null: OpenCV's own limit (2^30 pixels)",
    )
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=0, le=100, description="jpg/webp quality 0-100; png compression 0-9")
    skip_reencode: bool = Field(True, description="store the downloaded bytes as they are when already encode_format")
    disable_all_reencoding: bool = Field(
        True,
        description="true: store the bytes as downloaded, decode nothing (the filter judges them; no width/height "
        "in the images table, min_image_size/max_aspect_ratio/resize unused). false: img2dataset decodes, checks "
        "and re-encodes (animated images are then stored as downloaded, bombs refused from the header)",
    )
    compute_hash: Literal["md5", "sha256", "sha512"] | None = "sha256"
    extract_exif: bool = True

    denylists: list[ListConfig] = Field(
        default_factory=list,
        description="URL / domain / MD5 / SHA-256 / PDQ lists, applied at download (never fetched, or bytes never "
        "written) and again at filter; reason `denylisted` + the list's name",
    )
    opt_outs: list[OptOutListConfig] = Field(
        default_factory=list, description="URL / domain opt-out lists (reason `opted_out`, like X-Robots-Tag)"
    )
    punsafe_max: float | None = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="rows whose input punsafe (LAION / Re-LAION metadata) is above this are not fetched (reason `nsfw`); "
        "null: off; ignored when the input has no such column",
    )
    pwatermark_max: float | None = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="rows whose input pwatermark is above this are not fetched (reason `watermark`); null: off",
    )
    punsafe_col: str = Field("punsafe", description="input column of the NSFW probability")
    pwatermark_col: str = Field("pwatermark", description="input column of the watermark probability")

    processes_count: int = Field(4, ge=1, description="download processes (or Ray tasks in flight)")
    thread_count: int = Field(64, ge=1, description="download threads per process")
    number_sample_per_shard: int = Field(10000, ge=1, description="URLs per shard; fixed for the life of a folder")
    timeout: float = Field(10, gt=0, description="seconds per HTTP request")
    retries: int = Field(0, ge=0, description="extra tries per URL")
    max_shard_retry: int = Field(1, ge=0, description="retries of a shard that failed as a whole (multiprocessing)")
    user_agent_token: str | None = Field(None, description="identifies the crawler in the User-Agent")
    distributor: Literal["multiprocessing", "ray"] = Field(
        "multiprocessing", description="'ray' runs one Ray task per shard on the cluster named by the ray section"
    )
    incremental_mode: Literal["incremental", "overwrite"] = Field(
        "incremental", description="'incremental' skips shards already complete (resume); 'overwrite' starts over"
    )

    @model_validator(mode="after")
    def _check(self) -> DownloadConfig:
        if self.encode_format == "png" and self.encode_quality > 9:
            raise ValueError(
                f"encode_quality={self.encode_quality} with encode_format='png': for png it is the "
                "compression level, allowed 0-9"
            )
        if self.disable_all_reencoding:
            unused = [
                f"{k}={getattr(self, k)!r}"
                for k, off in (("resize_mode", "no"), ("min_image_size", 0), ("max_aspect_ratio", None))
                if getattr(self, k) != off
            ]
            if unused:
                raise ValueError(
                    f"{', '.join(unused)} with disable_all_reencoding=true: nothing is decoded at download, so this "
                    "would be ignored. Set download.disable_all_reencoding=false to resize or check at download, or "
                    "leave the checks to `make filter` (filter.thresholds)"
                )
        clash = {"key", "url", "caption", "status", "error_message", "width", "height"} & set(
            self.save_additional_columns
        )
        if clash:
            raise ValueError(f"save_additional_columns {sorted(clash)}: img2dataset reserves these names")
        return self


# --------------------------------------------------------------------------- filter
class FilterModelsConfig(StrictModel):
    """``filter.models``: the CLIP model and the aesthetic predictor (Hugging Face id, tag or local path)."""

    clip_model: str = Field(
        "ViT-L-14",
        description="open_clip built-in name (with clip_pretrained), 'hf-hub:org/repo', or a local folder "
        "with open_clip_config.json + weights",
    )
    clip_pretrained: str | None = Field(
        "openai", description="open_clip pretrained tag or checkpoint file for a built-in name; ignored otherwise"
    )
    aesthetic: str | None = Field(
        "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth",
        description="LAION improved aesthetic predictor weights (path or URL; loaded with weights_only); "
        "null: no aesthetic score",
    )
    nsfw: str | None = Field(
        None,
        description="LAION CLIP-based NSFW detector (ViT-L/14 embeddings) converted to safetensors with "
        "`python -m curation.safety.nsfw convert` (path or URL); null: no NSFW score",
    )
    watermark: str | None = Field(
        None,
        description="LAION watermark detector weights (watermark_model_v1.pt: timm efficientnet_b3a + its head; "
        "path or URL, loaded weights-only); null: no watermark score (the CPU default: an EfficientNet per image)",
    )
    device: str = Field("auto", description="'auto' (CUDA when the actor has a GPU, else CPU), 'cpu', 'cuda', ...")
    precision: Literal["fp32", "fp16", "bf16"] = Field(
        "fp16", description="model dtype on GPU; on CPU the models always run in fp32"
    )


class FilterDecodeConfig(StrictModel):
    """``filter.decode``: how image bytes become RGB pixels."""

    max_pixels: int = Field(
        100_000_000, ge=1, description="reject width*height above this (read from the header, before decoding)"
    )
    animated: Literal["reject", "first_frame"] = Field(
        "reject", description="animated GIF/PNG/WebP: reject (reason 'animated') or keep the first frame"
    )
    reduced_jpeg: bool = Field(
        True,
        description="decode JPEGs at 1/2, 1/4 or 1/8 size when the model input is that much smaller (much "
        "faster); width/height are still the original's. The pixel hash is then of the reduced pixels, so "
        "a JPEG and a PNG with the same pixels are not matched as exact duplicates",
    )


class FilterThresholdsConfig(StrictModel):
    """``filter.thresholds``: what a kept image must pass. null turns a check off."""

    min_short_side: int | None = Field(512, ge=1, description="pixels, original image, after EXIF rotation")
    max_aspect_ratio: float | None = Field(3.0, ge=1.0, description="long side / short side")
    caption_min_chars: int | None = Field(5, ge=0, description="alt text, stripped")
    caption_min_words: int | None = Field(2, ge=0)
    caption_max_words: int | None = Field(None, ge=1)
    languages: list[str] = Field(
        default_factory=lambda: ["en"], description="ISO 639-1 codes the alt text may be in; empty: any"
    )
    language_min_score: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="a language outside `languages` rejects only when identified with at least this "
        "probability (short alt texts are often identified wrongly with low confidence)",
    )
    aesthetic_min: float | None = Field(
        5.0, ge=0.0, le=10.0, description="LAION aesthetic scores run 1-10; LAION-Aesthetics V2 used 5, 6 and 6.5"
    )
    clip_score_min: float | None = Field(
        0.2,
        ge=-1.0,
        le=1.0,
        description="a cosine, -1 to 1: cosine(image, alt text). LAION-5B kept ViT-B/32 >= 0.28; ViT-L/14 scores "
        "run lower, so calibrate on your data",
    )
    nsfw_max: float | None = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="NSFW probability (filter.models.nsfw) above this rejects (reason `nsfw`); 0.5 is the detector's "
        "decision boundary, Stable Diffusion 2 trained on punsafe <= 0.1 (stricter); null: off",
    )
    watermark_max: float | None = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="watermark probability (filter.models.watermark) above this rejects (reason `watermark`); "
        "Stable Diffusion 1 trained on pwatermark < 0.5; null: off",
    )
    dedup: Literal["off", "exact", "near"] = Field(
        "exact", description="'exact': same bytes or same decoded pixels; 'near': also embedding cosine >= near_dup_min"
    )
    near_dup_min: float = Field(0.97, gt=0.0, le=1.0, description="cosine of image embeddings for 'near'")


class NearDupConfig(StrictModel):
    """``filter.near_dup``: how ``dedup: near`` searches the image embeddings."""

    search: Literal["auto", "exact", "ann"] = Field(
        "auto",
        description="exact: every pair (blocked matrix products; fine to ~100 k rows) | ann: faiss k-means cells, "
        "pairs compared within cells | auto: exact up to exact_max_rows candidates, ann above",
    )
    exact_max_rows: int = Field(100_000, ge=1, description="auto picks exact up to this many candidate rows")
    nlist: int | None = Field(
        None, ge=1, description="k-means cells; null: about 2 x sqrt(rows), a power of two (1 M rows: 2048)"
    )
    cells_per_row: int = Field(
        2, ge=1, description="each row is compared within its this many nearest cells: more finds more, costs ~n^2"
    )
    storage: Literal["fp32", "fp16"] = Field(
        "fp16",
        description="the embeddings held in memory for the search: fp16 halves it (3.3 M x 768: 4.7 GB) and moves "
        "cosines by ~1e-3",
    )
    train_per_cell: int = Field(40, ge=4, description="k-means training vectors per cell")


class FilterConfig(StrictModel):
    """``filter``: the images table -> the scores table (every image, kept or not, with the reason)."""

    input: str | None = Field(None, description="images table (img2dataset shards); null: <project.data_root>/images")
    output: str | None = Field(None, description="scores table; null: <project.data_root>/scores")
    runner: Literal["ray", "local"] = Field(
        "ray", description="'ray': Ray Data pipeline (local Ray or the cluster in `ray`); 'local': a plain loop"
    )
    models: FilterModelsConfig = Field(default_factory=FilterModelsConfig)
    decode: FilterDecodeConfig = Field(default_factory=FilterDecodeConfig)
    thresholds: FilterThresholdsConfig = Field(default_factory=FilterThresholdsConfig)
    batch_size: int = Field(256, ge=1, description="images per model call (per actor)")
    decode_batch_size: int = Field(64, ge=1, description="images per decode task")
    read_concurrency: int = Field(
        2, ge=1, description="shard readers streaming at once (they hold no CPU, so more only adds processes)"
    )
    num_actors: int = Field(1, ge=1, description="model actors (one per GPU on a GPU cluster)")
    gpus_per_actor: float | None = Field(
        None, ge=0, description="null: 1 when the cluster has GPUs, else 0 (CPU actors)"
    )
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved by each model actor")
    torch_threads: int | None = Field(None, ge=1, description="torch threads in each CPU actor; null: cpus_per_actor")
    save_embeddings: bool = Field(False, description="store image/text embeddings in the scores table")
    near_dup: NearDupConfig = Field(default_factory=NearDupConfig)
    changed_settings: Literal["refuse", "remeasure"] = Field(
        "refuse",
        description="a rerun whose models, decode settings or loosened size/alt-text checks need measuring again "
        "shards already measured: refuse (say which settings changed) or remeasure them. Changes that the stored "
        "measurements can decide (model-score thresholds, stricter checks, dedup) are re-decided without asking",
    )
