"""The ``stats`` config section."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from paradiffusion.config import StrictModel


class StatsConfig(StrictModel):
    """What `paradiffusion stats` reads and writes."""

    output: str | None = Field(None, description="Report folder; default <data_root>/stats (local path).")
    images: str | None = Field(None, description="img2dataset shards folder; default <data_root>/images.")
    write_duckdb: bool = Field(True, description="Also write stats.duckdb holding only the views.")
    nouns: Literal["auto", "off"] = Field(
        "auto", description="auto: count nouns with TextBlob's bundled tagger when installed; off: never."
    )
    noun_sample: int = Field(
        500, ge=1, description="Mean nouns is measured on a seeded sample of this many captions per source."
    )
    length_buckets: list[int] = Field(
        [25, 50, 100, 150, 200, 250], description="Word-count bucket edges of the caption-length histogram."
    )
    keywords: list[str] = Field(
        ["left", "right", "background", "foreground", "person"],
        description="Words whose share of captions the keyword query reports (reads the caption text).",
    )
    plots: bool = Field(True, description="Write PNG plots (needs matplotlib).")
    derived: bool = Field(
        True,
        description="Read each shard's caption text once into <output>/derived (word counts, keyword flags); "
        "false: the word and keyword views read the text on every query.",
    )

    memory_limit: str = Field(
        "4GB",
        pattern=r"^[0-9]+(\.[0-9]+)?\s*(MB|GB|MiB|GiB)$",
        description="DuckDB's memory limit for every connection of the run (e.g. 4GB, 512MB); past it DuckDB "
        "spills to <output>/.duckdb_tmp or stops with an out-of-memory error instead of growing.",
    )
    threads: int | None = Field(None, ge=1, le=256, description="DuckDB threads; null: one per core.")
    partials: bool = Field(
        True,
        description="Answer the canned queries from per-shard partial aggregates merged at query time "
        "(needs derived: true); false: scan the raw views every time.",
    )

    @field_validator("nouns", mode="before")
    @classmethod
    def _yaml_off(cls, v):
        # YAML 1.1 (PyYAML) reads a bare `off` as false: `nouns: off` in a file or `--set stats.nouns=off`
        # means the word the user typed, not a boolean
        return "off" if v is False else v

    @field_validator("length_buckets")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if not v or any(b <= a for a, b in zip(v, v[1:], strict=False)) or v[0] <= 0:
            raise ValueError("length_buckets must be positive and strictly increasing, e.g. [25, 50, 100]")
        return v
