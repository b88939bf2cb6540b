"""Arrow schemas of the tables that stages exchange. This file *is* the contract.

Every table has one row per ``key`` (or per key x captioner x prompt for captions,
per key x version for annotations). ``key`` is stable: the download stage derives it
from the URL, so a re-download or a reshard keeps it.

Tables and who writes them:

- ``images``    curation/download   img2dataset's own shards (bytes + metadata),
                                    plus ``key`` = stable id of the URL
- ``scores``    curation/filter     every input image, kept or not, with the reason
- ``captions``  captioning          one row per key x model x prompt
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
        pa.field("flags", pa.list_(pa.string())),
    ]
)

TABLES: dict[str, pa.Schema] = {"scores": SCORES, "captions": CAPTIONS}
