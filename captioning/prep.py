"""The CPU side of captioning: plan the work, decode and resize images, bucket by aspect ratio.

Work is cut into *chunks*: at most ``caption.chunk_rows`` pending keys from consecutive
Parquet row groups of one input shard (img2dataset writes one every 100 images; a row
group is read by one chunk, two at a chunk boundary, never by all), sorted by aspect bucket (from the width/height the filter stage already
measured, so nothing is decoded to plan). A chunk is the commit unit: it
becomes one output shard whose name encodes the model, the prompt, the input shard
and a hash of the chunk's keys. Batches are cut from bucket-sorted rows, so images in
a batch have similar shapes and pad little (in ``resize: bucket`` mode, the same
shape: no padding of image tokens at all for dynamic-resolution models).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from captioning.config import ImagePrep

_SLUG_RE = re.compile(r"[^A-Za-z0-9_.-]+")


def slug(text: str, max_len: int = 48) -> str:
    """A shard-name-safe rendering of ``text`` (model ids, local paths)."""
    s = _SLUG_RE.sub("-", text.strip("/")).strip("-._") or "x"
    if len(s) > max_len:  # a shard name starts with a letter or digit
        s = s[-max_len:].lstrip("-._") or "x"
    return s


def short_hash(*parts: str, n: int = 10) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:n]


def prompt_hash(prompt: str) -> str:
    """Hash of a prompt's exact text: a changed prompt is a different caption set."""
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def tag_prefix(model_id: str, revision: str | None, phash: str) -> str:
    """Prefix of every output shard of one (model, revision, prompt text): one caption set."""
    return f"{slug(model_id)}.{(revision or 'norev')[:10]}.{phash[:8]}."


def caption_tag(model_id: str, revision: str | None, prompt_id: str, phash: str) -> str:
    """:func:`tag_prefix` plus the prompt's name, for readable shard names."""
    return tag_prefix(model_id, revision, phash) + prompt_id


def nearest_bucket(width: int | None, height: int | None, ratios: list[float]) -> int:
    """Index of the aspect bucket closest (in log ratio) to ``width/height``; -1 when unknown."""
    if not width or not height:
        return -1
    r = math.log(width / height)
    return min(range(len(ratios)), key=lambda i: abs(math.log(ratios[i]) - r))


def bucket_size(ratio: float, pixels: int, multiple: int) -> tuple[int, int]:
    """``(width, height)`` with about ``pixels`` pixels at ``ratio``, each a multiple of ``multiple``."""
    h = math.sqrt(pixels / ratio)
    w = h * ratio
    return (max(multiple, round(w / multiple) * multiple), max(multiple, round(h / multiple) * multiple))


@dataclass
class Chunk:
    """One unit of work and of commit: keys of one input shard, sorted by bucket."""

    name: str  # the output shard name
    input_shard: str
    parquet_url: str
    keys: list[str]
    buckets: list[int] = field(default_factory=list)  # aspect bucket of each key, same order
    row_groups: list[int] | None = None  # the input shard's row groups holding these keys (None: read it all)

    def to_dict(self) -> dict:
        return asdict(self)


def plan_chunks(
    tag: str,
    shard_keys: dict[str, list[tuple[str, int | None, int | None]]],
    shard_urls: dict[str, str],
    prep: ImagePrep,
    chunk_rows: int,
    row_group_of: dict[str, dict[str, int]] | None = None,
) -> list[Chunk]:
    """Cut pending ``(key, width, height)`` rows of each input shard into bucket-sorted chunks.

    With ``row_group_of`` (input shard -> key -> Parquet row group), a chunk takes keys
    from consecutive row groups, so a row group of an input shard is read by one chunk (two
    at a boundary), not by every chunk; keys are sorted by aspect bucket within the chunk.
    Without it, the whole shard is sorted by bucket (each chunk then reads the shard).
    """
    chunks = []
    for shard in sorted(shard_keys):
        rgs = (row_group_of or {}).get(shard)
        rows = [
            (rgs.get(k, -1) if rgs is not None else 0, nearest_bucket(w, h, prep.aspect_buckets), k)
            for k, w, h in shard_keys[shard]
        ]
        rows.sort(key=lambda r: (r[0], r[2]) if rgs is not None else (r[1], r[2]))
        for i in range(0, len(rows), chunk_rows):
            part = sorted(rows[i : i + chunk_rows], key=lambda r: (r[1], r[2]))
            keys = [k for _, _, k in part]
            name = f"{tag}--{slug(shard, 40)}--{short_hash(*sorted(keys))}"
            groups = sorted({g for g, _, _ in part if g >= 0}) if rgs is not None else None
            chunks.append(Chunk(name, shard, shard_urls[shard], keys, [b for _, b, _ in part], groups))
    return chunks


def resize(img, prep: ImagePrep, bucket: int):
    """Resize a PIL image as ``prep`` says (Lanczos; only ever shrinks in ``max_side`` mode)."""
    from PIL import Image

    if prep.resize == "none":
        return img
    if prep.resize == "bucket":
        b = bucket if bucket >= 0 else nearest_bucket(img.width, img.height, prep.aspect_buckets)
        size = bucket_size(prep.aspect_buckets[b], prep.bucket_pixels, prep.size_multiple)
        return img if img.size == size else img.resize(size, Image.Resampling.LANCZOS)
    longest = max(img.size)
    if longest <= prep.max_side:
        return img
    scale = prep.max_side / longest
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.LANCZOS)


def decode_chunk(chunk: dict, prep: ImagePrep) -> Iterator[dict]:
    """The CPU operator: read a chunk's image bytes, decode, resize; one row per key, in order.

    A key whose bytes are missing or do not decode still yields a row, with
    ``error`` set (counted and stored as an ``error`` caption, never dropped).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from curation.decode import decode_image
    from paradiffusion.images import read_image_shard
    from paradiffusion.storage_errors import describe_failure

    keys = list(chunk["keys"])
    buckets = list(chunk.get("buckets") or [-1] * len(keys))
    try:
        t = read_image_shard(chunk["parquet_url"], ["key", "image"], chunk.get("row_groups"))
        t = t.filter(pc.is_in(t["key"], value_set=pa.array(keys, pa.string())))
        data = dict(zip(t["key"].to_pylist(), t["image"].to_pylist(), strict=True))
        read_error = None
    except Exception as exc:  # noqa: BLE001 - a broken input shard becomes errors on its keys
        if describe_failure(exc) is not None:  # the store failed, not the shard: the run stops (one line)
            raise
        data, read_error = {}, f"read_error: cannot read {chunk['parquet_url']}: {type(exc).__name__}: {exc}"[:300]
    draft = prep.max_side if prep.resize == "max_side" else int(math.sqrt(prep.bucket_pixels))
    for key, bucket in zip(keys, buckets, strict=True):
        row = {"key": key, "chunk": chunk["name"], "image": None, "error": None}
        if key not in data:
            row["error"] = read_error or "missing_image: key not in its images shard"
        else:
            dec = decode_image(data[key], animated="first_frame", draft_size=draft if prep.resize != "none" else None)
            if dec.image is None:
                row["error"] = f"{dec.reason}: {dec.detail}"
            else:
                row["image"] = np.asarray(resize(dec.image, prep, bucket), dtype=np.uint8)
        yield row


def error_kind(error: str) -> str:
    """The counter name of an error message (the part before the first colon)."""
    head = error.split(":", 1)[0].strip()
    return head if re.fullmatch(r"[a-z_]+", head) else "model_error"
