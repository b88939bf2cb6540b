"""The published rows: committed tables in, one Arrow table per output shard out.

Everything is read through the storage contract (``Table.sql_source()``: the committed shards,
listed from their markers) and joined in DuckDB:

- ``big`` (ParaImage-Big): every kept image (``scores``) with a selected caption
  (``captioning.store.selected_captions_sql``, the captioning stage's own rule) and the list of
  every caption it has, each with its source (model, revision, prompt id and hash) and flags.
- ``small`` (ParaImage-Small): the approved hand-written descriptions (``small_train``), the
  annotator and reviewer ids pseudonymised.

Rows are grouped by the input shard they come from (``scores`` / ``small_train``) and cut into
chunks of at most ``publish.shard_rows``: a new caption for an image changes only the chunks
of its input shard, so a republish rewrites only those (:mod:`publish.run`).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from paradiffusion.config import RootConfig
from paradiffusion.images import image_column, image_shards
from paradiffusion.log import get_logger
from paradiffusion.schemas import CAPTIONS, SCORES, SMALL_TRAIN
from paradiffusion.storage import Table, join

log = get_logger("publish")

#: Table -> the command that makes it (named when the table is missing).
MAKERS = {
    "scores": "paradiffusion filter (make filter)",
    "captions": "paradiffusion caption (make caption)",
    "small_train": "paradiffusion annotations export-approved (make annotations-approved)",
    "images": "paradiffusion download (make download)",
}

#: Input columns carried as licence / rights information when the URL list had them.
LICENSE_COLUMNS = ("license", "licence", "LICENSE", "rights", "copyright", "license_url", "attribution")

#: Score columns published when the scores table has them (beyond the ones every scores table has).
OPTIONAL_SCORES = ("nsfw", "punsafe", "nsfw_score", "watermark", "pwatermark", "watermark_score")


class MissingTable(Exception):
    """A table the subset needs has no committed shard; the message names the command that makes it."""


def table_url(cfg: RootConfig, name: str) -> str:
    if name == "small_train" and getattr(cfg, "annotations", None) is not None and cfg.annotations.train_output:
        return cfg.annotations.train_output
    return join(cfg.project.data_root, name)


def committed(cfg: RootConfig, name: str, schema: pa.Schema) -> Table:
    t = Table(table_url(cfg, name), schema)
    if not t.done_shards():
        raise MissingTable(f"{name} table missing (no committed shard at {t.url}): run {MAKERS[name]}")
    return t


def _columns(t: Table) -> list[str]:
    """The union of the committed shards' columns (a column added later is seen)."""
    cols: list[str] = []
    for f in t.files():
        for c in pq.read_schema(f.split("://", 1)[-1] if t.object_store else f, filesystem=t.fs).names:
            if c not in cols:
                cols.append(c)
    return cols


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# --------------------------------------------------------------------------- pseudonyms
def pseudonymizer(cfg: RootConfig):
    """``identity -> "annotator-<12 hex>"``: an HMAC with a secret kept beside the tables (never in
    the published folder), so the same person has the same pseudonym in every published version and
    a reader cannot recover the id by hashing guesses (Label Studio ids are small integers)."""
    secret_url = join(cfg.project.data_root, "_publish_secret")
    import fsspec

    fs, path = fsspec.core.url_to_fs(secret_url)
    if fs.exists(path):
        key = fs.cat_file(path)
    else:
        key = secrets.token_hex(32).encode()
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, key)

    def pseudo(identity: str | None) -> str | None:
        if identity is None:
            return None
        return "annotator-" + hmac.new(key, identity.encode(), hashlib.sha256).hexdigest()[:12]

    return pseudo


# --------------------------------------------------------------------------- queries
@dataclass
class Plan:
    """What one subset reads: its SQL (rows with a ``_unit`` column, ordered by unit and key) and counts."""

    subset: str
    sql: str
    extra_columns: list[str]
    license_columns: list[str]
    route: dict | None = None  # big: the sources publish.stream routes per input shard (sql unused)
    stats: dict = field(default_factory=lambda: {"rows": 0})  # rows the query gave (before image checks)

    def chunks(self, con, shard_rows: int) -> Iterator[tuple[str, pa.Table]]:
        if self.route is not None:
            from publish.stream import iter_big_chunks

            return iter_big_chunks(con, self, shard_rows)
        return iter_chunks(con, self, shard_rows)


#: Fields of each entry of a row's ``captions`` list, in order (``flags``: [] for none).
CAPTION_FIELDS = (
    "caption",
    "model_id",
    "model_revision",
    "prompt_id",
    "prompt_hash",
    "n_words",
    "finish_reason",
    "flags",
)
#: The list's order: by source; ties (a caption set written twice) by time and text, so the bytes are stable.
CAPTION_ORDER = ("model_id", "prompt_id", "prompt_hash", "model_revision", "created_at", "caption", "n_words")


def big_sql(cap_src: str, sc_src: str, lic_src: str | None, extra: list[str], lic: list[str], rule) -> str:
    """ParaImage-Big's rows from the sources given, ordered by key: kept ``scores`` rows (``sc_src``) joined
    to their selected caption (the captioning stage's rule over ``cap_src``) and the licence columns
    (``lic_src``: key + ``lic``). The ``captions`` column (every caption of the key with its source) is
    added after ``caption_flags`` by :func:`caption_lists`."""
    from captioning.store import selected_captions_sql

    extra_sel = "".join(f", s.{_q(c)}" for c in extra)
    lic_join = ""
    lic_sel = ""
    if lic and lic_src:
        lic_sel = "".join(f", l.{_q(c)}" for c in lic)
        lic_join = f" LEFT JOIN {lic_src} l ON l.key = s.key"
    return f"""
WITH s AS (SELECT * FROM {sc_src} WHERE kept),
sel AS ({selected_captions_sql(cap_src, rule)})
SELECT s.key, s.url, s.caption AS alt_text, sel.caption AS caption,
  sel.model_id AS caption_model, sel.model_revision AS caption_model_revision,
  sel.prompt_id AS caption_prompt_id, sel.prompt_hash AS caption_prompt_hash,
  coalesce(sel.flags, []::VARCHAR[]) AS caption_flags,
  s.width, s.height, s.aesthetic, s.clip_score{extra_sel}{lic_sel}
FROM s JOIN sel ON sel.key = s.key{lic_join}
ORDER BY s.key"""


def caption_lists(captions: pa.Table, keys: pa.Array) -> pa.Array:
    """For each of ``keys``: the list of its usable ``captions`` rows (error rows and empty captions left
    out by the caller) as structs of :data:`CAPTION_FIELDS` in :data:`CAPTION_ORDER`; null for a key
    without any. Arrow sorts once and cuts the list offsets where the key changes: DuckDB's ordered
    ``list(... ORDER BY ...)`` aggregate did the same at ~30x the time (a sort per group)."""
    item = pa.struct(
        [
            pa.field(c, pa.list_(pa.field("l", pa.string())) if c == "flags" else captions.schema.field(c).type)
            for c in CAPTION_FIELDS
        ]
    )
    typ = pa.list_(pa.field("l", item))
    if not captions.num_rows:
        return pa.nulls(len(keys), typ)
    order = pc.sort_indices(captions, sort_keys=[("key", "ascending")] + [(c, "ascending") for c in CAPTION_ORDER])
    c = captions.select(["key", *CAPTION_FIELDS]).take(order).combine_chunks()
    flags = c["flags"].chunk(0).cast(item.field("flags").type)
    flags = pc.fill_null(flags, pa.scalar([], flags.type))
    fields = [c[f].chunk(0) if f != "flags" else flags for f in CAPTION_FIELDS]
    structs = pa.StructArray.from_arrays(fields, fields=list(item))
    k = c["key"].chunk(0)
    # groups: runs of one key in the sorted rows
    starts = pc.indices_nonzero(pc.not_equal(k[1:], k[:-1])).to_numpy() + 1 if len(k) > 1 else []
    import numpy as np

    offsets = np.concatenate([[0], starts, [len(k)]]).astype(np.int32)
    group_keys = k.take(pa.array(offsets[:-1]))
    lists = pa.ListArray.from_arrays(pa.array(offsets), structs, type=typ)
    keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    if group_keys.equals(keys):  # the usual case: every key has captions, in key order (no copy of the text)
        return lists
    return lists.take(pc.index_in(keys, value_set=group_keys))


def big_plan(cfg: RootConfig, con) -> Plan:
    """ParaImage-Big: the sources :func:`publish.stream.iter_big_chunks` routes to each input shard."""
    scores = committed(cfg, "scores", SCORES)
    captions = committed(cfg, "captions", CAPTIONS)
    have = _columns(scores)
    extra = [c for c in OPTIONAL_SCORES if c in have]
    lic = license_columns(cfg, con)
    route = {
        "scores": scores.sql_source()[:-1] + ", filename = true)",
        "unit": "regexp_extract(filename, 'part-(.*)\\.parquet$', 1)",
        "captions": captions.sql_source(),
        "license": _license_sql(cfg, lic) if lic else None,
        "rule": cfg.caption.select,
    }
    return Plan("big", "", extra, lic, route)


def big_counts(cfg: RootConfig, con, plan: Plan) -> dict[str, int]:
    """Kept images, and those without any usable caption (left out of ParaImage-Big, counted): the kept
    rows less the rows the publish found a selected caption for (``plan.stats``, after its chunks ran)."""
    scores = committed(cfg, "scores", SCORES)
    kept, not_kept = con.execute(
        f"SELECT count(*) FILTER (WHERE kept), count(*) FILTER (WHERE NOT kept) FROM {scores.sql_source()}"
    ).fetchall()[0]
    return {"kept": kept, "not_kept": not_kept, "no_caption": kept - plan.stats["rows"]}


def small_plan(cfg: RootConfig, con) -> Plan:
    small = committed(cfg, "small_train", SMALL_TRAIN)
    src = small.sql_source()[:-1] + ", filename = true)"
    try:
        scores = committed(cfg, "scores", SCORES)
        join_scores = f" LEFT JOIN {scores.sql_source()} s ON s.key = a.key"
        cols = "s.url, s.caption AS alt_text, s.width, s.height"
    except MissingTable:
        join_scores = ""
        cols = "NULL::VARCHAR AS url, NULL::VARCHAR AS alt_text, NULL::INTEGER AS width, NULL::INTEGER AS height"
    sql = f"""
SELECT regexp_extract(a.filename, 'part-(.*)\\.parquet$', 1) AS _unit, a.key, {cols},
  a.caption AS description, a.n_words, a.version, a.annotator, a.reviewer
FROM {src} a{join_scores}
ORDER BY _unit, a.key, a.annotator"""
    return Plan("small", sql, [], [])


def license_columns(cfg: RootConfig, con) -> list[str]:
    """Licence / rights columns the downloaded shards carry (img2dataset's additional columns)."""
    shards = image_shards(join(cfg.project.data_root, "images"))
    if not shards:
        return []
    import fsspec

    fs, path = fsspec.core.url_to_fs(shards[0][1])
    names = pq.read_schema(path, filesystem=fs).names
    return [c for c in LICENSE_COLUMNS if c in names]


def _license_sql(cfg: RootConfig, cols: list[str]) -> str:
    files = ", ".join("'" + u.replace("'", "''") + "'" for _, u in image_shards(join(cfg.project.data_root, "images")))
    sel = ", ".join(f"any_value(CAST({_q(c)} AS VARCHAR)) AS {_q(c)}" for c in cols)
    return f"SELECT key, {sel} FROM read_parquet([{files}], union_by_name = true) GROUP BY key"


def iter_chunks(con, plan: Plan, shard_rows: int, batch_rows: int = 8192) -> Iterator[tuple[str, pa.Table]]:
    """``(chunk id, rows)``: the rows of each input shard in chunks of at most ``shard_rows``,
    ``chunk id`` = ``<input shard>-<n>``. Streams record batches; holds one chunk at a time."""
    reader = con.sql(plan.sql).to_arrow_reader(batch_rows)
    unit, n, buf, size = None, 0, [], 0

    def flush():
        t = pa.Table.from_batches(buf).drop_columns(["_unit"])
        return f"{unit}-{n:03d}", t

    for batch in reader:
        units = batch.column(batch.schema.get_field_index("_unit"))
        # split the batch where the unit changes (rows are ordered by unit)
        start = 0
        vals = units.to_pylist()
        for i in range(1, len(vals) + 1):
            if i < len(vals) and vals[i] == vals[start]:
                continue
            piece = batch.slice(start, i - start)
            u = vals[start]
            while piece.num_rows:
                if unit is not None and (u != unit or size >= shard_rows):
                    yield flush()
                    n = 0 if u != unit else n + 1
                    buf, size = [], 0
                unit = u
                take = min(piece.num_rows, shard_rows - size)
                buf.append(piece.slice(0, take))
                size += take
                piece = piece.slice(take)
            start = i
    if unit is not None and size:
        yield flush()


# --------------------------------------------------------------------------- images
class ImageIndex:
    """``key -> complete img2dataset shard`` (reads only the key column), to embed image bytes."""

    def __init__(self, images_url: str):
        self.shards = image_shards(images_url)
        if not self.shards:
            raise MissingTable(f"images table missing (no complete shard at {images_url}): run {MAKERS['images']}")
        self.where: dict[str, str] = {}
        import fsspec

        for _, url in self.shards:
            fs, path = fsspec.core.url_to_fs(url)
            keys = pq.read_table(path, filesystem=fs, columns=["key"])["key"].to_pylist()
            for k in keys:
                self.where.setdefault(k, url)

    def fetch(self, keys: list[str]) -> dict[str, tuple[bytes | None, str]]:
        """``key -> (bytes, extension)`` for the keys that have bytes."""
        import fsspec

        by_url: dict[str, list[str]] = {}
        for k in keys:
            if k in self.where:
                by_url.setdefault(self.where[k], []).append(k)
        out: dict[str, tuple[bytes | None, str]] = {}
        for url, ks in by_url.items():
            fs, path = fsspec.core.url_to_fs(url)
            col = image_column(pq.read_schema(path, filesystem=fs))
            t = pq.read_table(path, filesystem=fs, columns=["key", col])
            t = t.filter(pc.is_in(t["key"], value_set=pa.array(ks, pa.string())))
            for k, b in zip(t["key"].to_pylist(), t[col].to_pylist(), strict=True):
                out[k] = (b, col)
        return out


def decodes(data: bytes | None) -> bool:
    """Whether Pillow can decode the bytes (the published Image feature must open)."""
    if not data:
        return False
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 - any decoder failure is a counted skip
        return False
