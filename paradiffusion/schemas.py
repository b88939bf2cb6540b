"""Arrow schemas of the tables that stages exchange. This file *is* the contract.

Every table has one row per ``key`` (or per key x captioner x prompt for captions,
per key x version for annotations). ``key`` is img2dataset's key (shard number +
position in the URL list): stable for a given URL list and shard size, which the
download stage refuses to change on a resumed run. ``url`` travels with it into
``scores`` for joins across separately downloaded sets.

Tables and who writes them:

- ``images``    curation/download   img2dataset's own shards (bytes + metadata),
                                    read through paradiffusion/images.py
- ``scores``    curation/filter     every input image, kept or not, with the reason
- ``captions``  captioning          one row per key x model x prompt
- ``candidates``  captioning/small  ParaImage-Small candidates, with why each was chosen
- ``annotations`` captioning/small  append-only versions of hand-written descriptions + review
- ``small_train`` captioning/small  approved descriptions: the stage-3 training table
"""

from __future__ import annotations

import pyarrow as pa

#: Reasons a row can carry; stages add their own strings, but these are shared.
REJECT_DECODE = "decode_error"

SCORES = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),  # input shard it came from
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),  # the alt text
        pa.field("width", pa.int32()),  # after EXIF rotation; null when undecodable
        pa.field("height", pa.int32()),
        pa.field("sha256", pa.string()),  # of the stored bytes
        pa.field("pixel_hash", pa.string()),  # of the decoded pixels
        pa.field("language", pa.string()),
        pa.field("language_score", pa.float32()),
        pa.field("aesthetic", pa.float32()),
        pa.field("clip_score", pa.float32()),
        pa.field("nsfw", pa.float32()),  # LAION NSFW detector on the CLIP embedding, 0..1 (null: off)
        pa.field("watermark", pa.float32()),  # LAION watermark detector, 0..1 (null: off)
        pa.field("kept", pa.bool_(), nullable=False),
        pa.field("reject_reason", pa.string()),  # null when kept
        pa.field("reject_detail", pa.string()),  # human-readable detail (the decoder's message, ...)
        pa.field("duplicate_of", pa.string()),  # key of the kept image this one duplicates
        pa.field("image_embedding", pa.list_(pa.float32())),  # optional (filter.save_embeddings)
        pa.field("text_embedding", pa.list_(pa.float32())),
    ]
)

CAPTIONS = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("n_words", pa.int32()),
        pa.field("n_tokens", pa.int32()),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("model_revision", pa.string()),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt_hash", pa.string(), nullable=False),
        pa.field("generation", pa.string()),  # JSON of the generation settings
        pa.field("finish_reason", pa.string()),  # "stop" | "length" | "error"
        pa.field("seconds", pa.float32()),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
        pa.field("flags", pa.list_(pa.string())),  # quality flags (captioning/quality.py)
        pa.field("error", pa.string()),  # why there is no caption (finish_reason "error"); null otherwise
        pa.field("engine", pa.string()),  # the serving engine ("vllm 0.32.0") of a type openai captioner; else null
    ]
)

CANDIDATES = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("short_side", pa.int32()),
        pa.field("aesthetic", pa.float32()),
        pa.field("clip_score", pa.float32()),
        pa.field("cluster", pa.int32()),  # k-means cluster of the CLIP image embedding (-1: no clustering)
        pa.field("cluster_size", pa.int32()),  # eligible images in that cluster
        pa.field("rank_in_cluster", pa.int32()),  # 1 = best aesthetic score of its cluster
        pa.field("selection_rank", pa.int32(), nullable=False),  # order of selection, 1-based
        pa.field("reason", pa.string()),  # human-readable: why this image was chosen
    ]
)

#: Review states of an annotation version; see captioning/small/annotations.py for the transitions.
ANNOTATION_STATES = ("draft", "submitted", "approved", "rejected", "withdrawn")  # withdrawn: no text

ANNOTATIONS = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("version", pa.int32(), nullable=False),  # 1, 2, ... per key; every change appends one
        pa.field("text", pa.string()),
        pa.field("annotator", pa.string()),  # identity: "labelstudio:<user id>", or the name a CSV/JSONL gave
        pa.field("created_at", pa.timestamp("us", tz="UTC")),  # when the annotator wrote (or updated) it
        pa.field("source_file", pa.string()),  # file it was imported from
        pa.field("source_ref", pa.string()),  # line / task / annotation id in that file
        pa.field("content_hash", pa.string(), nullable=False),  # sha256 of key + annotator identity + text
        pa.field("state", pa.string(), nullable=False),  # one of ANNOTATION_STATES
        pa.field("parent_version", pa.int32()),  # the version a review row decides on
        pa.field("reviewer", pa.string()),
        pa.field("review_comment", pa.string()),
        pa.field("reviewed_at", pa.timestamp("us", tz="UTC")),
        pa.field("recorded_at", pa.timestamp("us", tz="UTC"), nullable=False),  # when this row was appended
        pa.field("annotator_email", pa.string()),  # display only, never part of the identity or the hash
    ]
)

SMALL_TRAIN = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),  # the approved hand-written description
        pa.field("annotator", pa.string()),
        pa.field("version", pa.int32(), nullable=False),
        pa.field("reviewer", pa.string()),
        pa.field("n_words", pa.int32()),
    ]
)

TABLES: dict[str, pa.Schema] = {
    "scores": SCORES,
    "captions": CAPTIONS,
    "candidates": CANDIDATES,
    "annotations": ANNOTATIONS,
    "small_train": SMALL_TRAIN,
}
