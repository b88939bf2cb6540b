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


class LabelStudioConfig(StrictModel):
    """The Label Studio server the annotations go through (``push`` / ``pull``), and the local
    one that ``make labelstudio`` (``paradiffusion annotations serve``) runs."""

    url: str | None = Field(None, description="Server URL; null: the local server, http://127.0.0.1:<port>.")
    token_env: str = Field(
        "LABEL_STUDIO_API_KEY",
        min_length=1,
        description="Environment variable holding the API token (a personal access token, or a legacy token).",
    )
    token_file: str | None = Field(
        None, description="File holding the token when the variable is unset; null: <data_dir>/api_token."
    )
    project: str = Field("ParaImage-Small", min_length=1, description="Project title: found, or created by push.")
    export_type: Literal["JSON", "JSON_MIN"] = Field("JSON", description="Export format a pull asks the server for.")
    storage_path: str | None = Field(
        None,
        description="With image_source=files: the images folder as the server sees it (a Local Files storage); "
        "null: <export_dir>/images.",
    )
    timeout_s: float = Field(120, gt=0, description="HTTP timeout of one API call, seconds.")
    keep_pulls: int = Field(
        20, ge=1, description="Export files a pull keeps under <export_dir>/pulls (the oldest beyond go)."
    )
    # the local server (make labelstudio, the tests)
    venv: str = Field(
        ".venv-labelstudio", description="Virtual environment of its own (its pins conflict with ours, e.g. pyarrow)."
    )
    version: str = Field("1.23.2", description="The label-studio release installed there (tested with 1.23.2).")
    data_dir: str | None = Field(
        None, description="Its SQLite database, media and secrets; null: <data_root>/labelstudio."
    )
    port: int = Field(8080, ge=1, le=65535)
    admin_email: str = Field("admin@example.org", description="The account created on the first start.")
    password_env: str = Field(
        "LABEL_STUDIO_PASSWORD",
        description="Variable with the admin password; unset: one is generated into <data_dir>/admin_password.",
    )
    start_timeout_s: float = Field(600, gt=0, description="How long to wait for /health after starting.")


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
    train_rule: Literal["latest", "each"] = Field(
        "latest",
        description="Stage-3 table: latest = per key the approved text written last; each = every annotator's "
        "approved text as its own row.",
    )
    label_studio: LabelStudioConfig = Field(default_factory=LabelStudioConfig)
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
