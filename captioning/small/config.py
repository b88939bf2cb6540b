"""Config sections of ParaImage-Small: ``select_small`` and ``annotations``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from paradiffusion.config import StrictModel


class SelectSmallConfig(StrictModel):
    """How candidates for ParaImage-Small are chosen from the kept set.

    Eligible: kept, ``aesthetic >= min_aesthetic`` and short side ``>= min_short_side``. The
    ``max_pool`` best of those by aesthetic score are clustered (k-means on the normalised CLIP
    image embeddings); candidates are then taken round-robin over the clusters, best first, so
    every cluster gives its best image before any gives its second.
    """

    output: str | None = Field(None, description="Candidates table; default <data_root>/candidates.")
    n_candidates: int = Field(3100, ge=1, description="How many candidates to select (the paper has ~3.1 k).")
    min_aesthetic: float | None = Field(6.0, le=10, description="Minimum aesthetic score (null: no minimum).")
    min_short_side: int = Field(1024, ge=1, description="Minimum short side in pixels (paper's mean: 1,326 px).")
    diversity: Literal["kmeans", "none"] = Field(
        "kmeans", description="kmeans: cluster CLIP image embeddings (needs filter embeddings); none: top by score."
    )
    n_clusters: int | None = Field(None, ge=1, description="k for k-means; null = n_candidates (one per cluster).")
    max_pool: int = Field(200_000, ge=1, description="Only the best this many eligible images are clustered.")
    kmeans_iters: int = Field(50, ge=1, le=1000)


class AnnotationsConfig(StrictModel):
    """Annotation round trip (Label Studio) and review of hand-written descriptions."""

    output: str | None = Field(None, description="Annotations table; default <data_root>/annotations.")
    export_dir: str | None = Field(None, description="Where tasks are exported; default <data_root>/annotation_tasks.")
    train_output: str | None = Field(None, description="Approved stage-3 table; default <data_root>/small_train.")
    image_source: Literal["url", "files"] = Field(
        "url", description="url: tasks point at the original URL; files: image bytes are written beside the tasks."
    )
    image_url_prefix: str = Field(
        "/data/local-files/?d=images/",
        description="With image_source=files: prefix Label Studio serves the written files under.",
    )
    from_name: str = Field("caption", min_length=1, description="Name of the TextArea in the labeling config.")
    import_state: Literal["draft", "submitted"] = Field("submitted", description="State of imported annotations.")
    min_words: int = Field(50, ge=1, description="Guideline: fewest words in a description.")
    max_words: int = Field(200, ge=1, description="Guideline: most words in a description.")
    language: str | None = Field("en", description="Guideline: expected language (ISO 639-1); null = not checked.")
    vague_phrases: list[str] = Field(
        default_factory=lambda: [
            "nice picture",
            "nice image",
            "nice photo",
            "beautiful picture",
            "beautiful image",
            "good picture",
            "good photo",
            "great photo",
            "lovely picture",
            "this is a picture",
            "an image of something",
            "etc.",
            "and so on",
            "stuff",
        ],
        description="Guideline: phrases flagged as vague (case-insensitive substring match).",
    )

    @model_validator(mode="after")
    def _range(self) -> AnnotationsConfig:
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) must be <= max_words ({self.max_words})")
        return self
