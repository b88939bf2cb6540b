"""Reading the ``images`` table: what the download stage (img2dataset) wrote.

The ``images`` table is img2dataset's own output folder with ``output_format:
parquet``: ``<data_root>/images/<shard>.parquet`` (one row per input URL, with
``key``, ``url``, ``caption`` (alt text), the image bytes in a column named after the
encode format (``jpg``, ``png`` or ``webp``), ``status`` (``success`` or the failure),
``error_message``, ``width``, ``height``, ``original_width``, ``original_height``,
``sha256``, ...) and ``<shard>_stats.json``, which img2dataset writes when the shard
is complete; a shard without it is still being written and is not read.

``key`` is img2dataset's key (shard index + position), stable for a given URL list and
shard size; every later table joins on it.
"""

from __future__ import annotations

from collections.abc import Iterator

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from paradiffusion.storage import Table, join

IMAGE_COLUMNS = ("jpg", "png", "webp")


def image_shards(images_url: str) -> list[tuple[str, str]]:
    """Complete img2dataset shards as ``(shard, parquet_url)``, sorted by shard."""
    fs, path = fsspec.core.url_to_fs(images_url)
    if not fs.exists(path):
        return []
    proto = images_url.split("://", 1)[0] + "://" if "://" in images_url else ""
    out = []
    for f in fs.glob(join(path, "*.parquet")):
        name = f.rsplit("/", 1)[-1][: -len(".parquet")]
        if fs.exists(join(path, f"{name}_stats.json")):
            out.append((name, proto + f if proto else f))
    return sorted(out)


def image_column(schema: pa.Schema) -> str:
    """The column holding the image bytes in an img2dataset parquet shard."""
    for c in IMAGE_COLUMNS:
        if c in schema.names:
            return c
    raise ValueError(f"no image column ({', '.join(IMAGE_COLUMNS)}) in {schema.names}")


def read_image_shard(
    parquet_url: str, columns: list[str] | None = None, row_groups: list[int] | None = None
) -> pa.Table:
    """One img2dataset shard (or only some of its row groups); the image column is renamed to ``image``.

    img2dataset writes a row group every 100 images, so ``row_groups`` reads a part of a
    shard without decompressing the image bytes of the rest.
    """
    fs, path = fsspec.core.url_to_fs(parquet_url)
    # Opened through fsspec, not pyarrow's ``filesystem=`` wrapper: that one reports any failure
    # of the store (refused, forbidden) as a FileNotFoundError without its cause, so a storage
    # failure would pass for a missing shard (paradiffusion.storage_errors reads the cause).
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        col = image_column(pf.schema_arrow)
        want = None
        if columns is not None:
            want = [col if c == "image" else c for c in columns]
        if row_groups is None:
            t = pf.read(columns=want)
        else:
            t = pf.read_row_groups(sorted(row_groups), columns=want)
    return t.rename_columns(["image" if c == col else c for c in t.column_names])


def key_row_groups(parquet_url: str) -> dict[str, int]:
    """``key -> row group`` of one img2dataset shard (reads only the key column)."""
    fs, path = fsspec.core.url_to_fs(parquet_url)
    out: dict[str, int] = {}
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        for rg in range(pf.metadata.num_row_groups):
            for k in pf.read_row_group(rg, columns=["key"])["key"].to_pylist():
                out[k] = rg
    return out


def kept_keys(scores_url: str) -> pa.Table:
    """``key`` (and the scores) of the kept rows of a ``scores`` table."""
    t = Table(scores_url).read()
    if t.num_rows == 0:
        return t
    return t.filter(pc.field("kept"))


def iter_kept_images(
    images_url: str,
    scores_url: str,
    columns: tuple[str, ...] = ("key", "image", "caption", "url"),
    keys: set[str] | None = None,
) -> Iterator[tuple[str, pa.Table]]:
    """Yield ``(shard, table)`` of kept images with their bytes, shard by shard.

    ``keys`` further restricts the rows (e.g. to the ones a resumed run still needs).
    """
    kept = kept_keys(scores_url)
    kept_set = set(kept["key"].to_pylist()) if kept.num_rows else set()
    if keys is not None:
        kept_set &= set(keys)
    for shard, url in image_shards(images_url):
        t = read_image_shard(url, list(columns))
        mask = pc.is_in(t["key"], value_set=pa.array(sorted(kept_set), pa.string()))
        t = t.filter(mask)
        if t.num_rows:
            yield shard, t
