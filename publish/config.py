"""The ``publish`` config section."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from paradiffusion.config import StrictModel, check_storage_url


class PublishConfig(StrictModel):
    """What `paradiffusion publish` writes: a dataset folder (Parquet, card, Croissant, WebDataset)."""

    output: str | None = Field(None, description="Dataset folder or fsspec URL; default <data_root>/paraimage.")
    subsets: list[Literal["big", "small"]] = Field(
        ["big", "small"],
        description="big: every kept image with a selected caption (ParaImage-Big); small: the approved "
        "hand-written descriptions (ParaImage-Small, the small_train table).",
    )
    shard_rows: int = Field(50_000, ge=1, le=10_000_000, description="At most this many rows per Parquet/tar shard.")
    include_images: bool = Field(
        False, description="Embed the image bytes (the datasets Image feature); default: a URL dataset, as LAION."
    )
    webdataset: bool = Field(False, description="Also write WebDataset tar shards ({key}.jpg|png, .txt, .json).")
    license: str | None = Field(
        None,
        description="The dataset's licence id for the card (e.g. cc-by-4.0); null: 'unknown' unless set here "
        "(per-image licence columns of the input are published as they are).",
    )
    pretty_name: str = Field("ParaImage", description="The card's title.")
    language: list[str] = Field(["en"], description="Languages of the captions (ISO 639-1).")
    repo_id: str | None = Field(
        None, description="Upload the folder to this Hub dataset repo (huggingface_hub upload_folder)."
    )
    private: bool = Field(True, description="Create the Hub repo private when it does not exist.")
    keep_versions: int = Field(2, ge=2, le=100, description="Published versions whose files are kept (>= 2).")

    @field_validator("output")
    @classmethod
    def _output(cls, v: str | None) -> str | None:
        return None if v is None else check_storage_url(v)

    @field_validator("subsets")
    @classmethod
    def _subsets(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError("subsets must name big and/or small once each, e.g. [big, small]")
        return v

    @field_validator("repo_id")
    @classmethod
    def _repo(cls, v: str | None) -> str | None:
        if v is not None and (v.count("/") != 1 or not all(v.split("/"))):
            raise ValueError(f"repo_id {v!r} must be <owner>/<name>, e.g. my-org/paraimage")
        return v


#: Kept for readers of the schema: the Hub's ``license`` when the input says nothing.
UNKNOWN_LICENSE: Literal["unknown"] = "unknown"
