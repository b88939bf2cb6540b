"""Training data: image shards + the stage's captions, in aspect-ratio buckets, resumable.

How a rank gets its batches, one epoch at a time:

1. *Plan* (cheap, no decoding): read ``key``, the alt text, ``width``/``height`` and
   ``status`` of every complete img2dataset shard; drop rows that failed to
   download, are not in the kept set, or have no caption (each counted by reason);
   assign each row the aspect-ratio bucket nearest to its size; give each rank the
   same number of rows of each bucket (split by rows, not shards: see ``_index``),
   so every rank has the same batches per epoch and none oversamples; shuffle with
   ``(seed, epoch, rank)``; cut windows of ``shuffle_buffer`` rows into same-bucket
   batches. The plan is a pure function of the data, the seed and the epoch.
2. *Read* (a background thread of the training process): the image bytes of a batch's
   rows, from the row groups of each shard that hold this rank's rows (img2dataset
   writes one every 100 images), each read once; or the cached latents.
3. *Load* (``num_workers`` loader processes, a torch ``DataLoader``): decode, resize to
   cover the bucket, crop (centre or random), maybe flip; pick the caption of a key that
   has several (seeded by ``(seed, epoch, key)``); with a text cache, read the caption's
   LLM states. Augmentation randomness is seeded by ``(seed, epoch, row)``. An image that
   does not decode is skipped and counted; the batch is then one smaller. Batches come
   back in plan order, in pinned memory on a GPU machine, ``prefetch`` per process ahead.

The training thread only takes finished batches. The position is ``(epoch, batch
index)`` of the last batch handed out: :meth:`BucketedImageData.state_dict` and
:meth:`load_state_dict` make a resumed run yield exactly the batches the uninterrupted
run would have, whatever ``num_workers`` is. Bucketing, rank splitting and an exact
mid-epoch position are planned here rather than by a ``DataLoader`` sampler because they
must agree with each other; the ``DataLoader`` only runs the loading, in that order.

``format="webdataset"`` reads tar shards instead (a published dataset, ``training/data_wds.py``):
a tar is one "row group", row ``i`` its ``i``-th sample; everything above applies unchanged.
"""

from __future__ import annotations

import gc
import hashlib
import io
import math
import multiprocessing
import queue
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from paradiffusion.images import image_shards, read_image_shard
from paradiffusion.log import get_logger
from paradiffusion.storage import Table
from training import data_wds as _wds

log = get_logger("training.data")

#: A fourth seed word, so caption choice draws from another stream than augmentation.
_CAPTION_STREAM = 7


def make_buckets(resolution: int, step: int, max_ratio: float) -> list[tuple[int, int]]:
    """(width, height) buckets of about ``resolution**2`` pixels, sides multiple of ``step``."""
    area = resolution * resolution
    out = set()
    w = step
    while w <= resolution * max_ratio + step:
        h = max(step, int(area / w) // step * step)
        if max(w, h) / min(w, h) <= max_ratio + 1e-6:
            out.add((w, h))
        w += step
    out.add((resolution // step * step, resolution // step * step))
    return sorted(out, key=lambda b: b[0] / b[1])


def nearest_bucket(buckets: list[tuple[int, int]], width: int, height: int) -> int:
    ratio = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - ratio))


def load_caption_map(
    source: str, captions_url: str | None, model_id: str | None = None, prompt_id: str | None = None
) -> dict[str, list[str]] | None:
    """``key -> captions`` for the ``captions`` and ``table`` sources (None for alt text).

    ``captions``: the captions table (schemas.CAPTIONS); rows of ``model_id`` /
    ``prompt_id`` when set, one per key: the earliest ``created_at``. ``table``: any
    Parquet table (a Table folder with commit markers, a folder of Parquet files or
    one file) with ``key`` and ``caption`` columns, e.g. the approved ParaImage-Small;
    every distinct non-empty caption of a key is kept (``annotations.train_rule: each``
    writes one row per approved text), sorted, and training picks one per epoch
    (:func:`choose_caption`).
    """
    if source in ("alt_text", "txt"):  # from the input itself: images.caption / the sample's .txt
        return None
    if not captions_url:
        raise FileNotFoundError(f"caption_source={source!r} needs data.captions (a table folder or Parquet file)")
    if not Table(captions_url).exists():
        hint = "run `make caption`" if source == "captions" else "run `make annotations-approved`"
        raise FileNotFoundError(
            f"caption_source={source!r}: no caption table at {captions_url}; {hint}, or set the stage's "
            "data.captions to a table with key + caption"
        )
    t = _read_any_table(captions_url)
    missing = {"key", "caption"} - set(t.column_names)
    if missing:
        raise ValueError(f"{captions_url}: no column(s) {sorted(missing)}; have {t.column_names}")
    if source == "captions":
        if model_id and "model_id" in t.column_names:
            t = t.filter(pc.equal(t["model_id"], model_id))
        if prompt_id and "prompt_id" in t.column_names:
            t = t.filter(pc.equal(t["prompt_id"], prompt_id))
        if "created_at" in t.column_names:
            t = t.sort_by([("key", "ascending"), ("created_at", "ascending")])
    every = source == "table"
    found: dict[str, set[str] | str] = {}
    for k, c in zip(t["key"].to_pylist(), t["caption"].to_pylist(), strict=True):
        if k is None or c is None or not c.strip():
            continue
        if every:
            found.setdefault(k, set()).add(c)
        elif k not in found:
            found[k] = c
    out = {k: sorted(v) if every else [v] for k, v in found.items()}
    if not out:
        log.warning("%s: no usable captions (model_id=%s, prompt_id=%s)", captions_url, model_id, prompt_id)
    return out


def _read_any_table(url: str) -> pa.Table:
    table = Table(url)
    if table.looks_like_table():  # one of ours: the committed shards only, never a glob
        if not table.done_shards():
            raise FileNotFoundError(f"{url}: no committed shard (its writer has not finished one)")
        return table.read()
    import pyarrow.dataset as ds

    fs, path = table.fs, table.path
    if fs.isdir(path):
        files = sorted(f for f in fs.glob(path.rstrip("/") + "/**/*.parquet") if "/.tmp/" not in f)
        return ds.dataset(files, filesystem=fs, format="parquet").to_table()
    return pq.read_table(path, filesystem=fs)


@dataclass(frozen=True)
class Row:
    shard: int  # index into the shard list
    row: int  # row in that shard
    key: str
    captions: tuple[str, ...]  # one, or several (a key with several approved texts)
    bucket: int

    @property
    def caption(self) -> str:
        return self.captions[0]


def _key_word(key: str) -> int:
    """A stable 64-bit number for a key (Python's ``hash`` differs between processes)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")


def choose_caption(row: Row, seed: int, epoch: int) -> str:
    """The caption ``row`` trains with in ``epoch``: its only one, or one of several drawn
    from ``(seed, epoch, key)``, so each epoch may show another and a resumed run the same."""
    if len(row.captions) == 1:
        return row.captions[0]
    rng = np.random.default_rng([seed, epoch, _key_word(row.key), _CAPTION_STREAM])
    return row.captions[int(rng.integers(len(row.captions)))]


class BucketedImageData:
    """Batches of ``{"pixel_values" | "latent_moments", "captions", "keys"}`` (+ ``"text_states"``,
    ``"text_lengths"`` with a text cache) for one rank, forever (epoch after epoch).

    ``pixel_values`` is a uint8 ``(B, 3, H, W)`` tensor; :func:`to_model_range` maps it to [-1, 1].
    ``text_states`` ``(B, L, hidden)`` are the cached LLM states of the chosen captions
    (L = max_length with release conditioning, else the batch's longest, zero-padded) and
    ``text_lengths`` their token counts.
    """

    def __init__(
        self,
        images_url: str | list[str],
        batch_size: int,
        resolution: int,
        *,
        caption_source: str = "alt_text",
        captions_url: str | None = None,
        caption_model_id: str | None = None,
        caption_prompt_id: str | None = None,
        scores_url: str | None = None,
        bucket_step: int = 64,
        max_aspect_ratio: float = 2.0,
        random_crop: bool = False,
        random_flip: bool = True,
        shuffle_buffer: int = 256,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 4,
        prefetch: int = 2,
        latents_url: str | None = None,
        text_cache=None,
        pin_memory: bool = False,
        format: str = "parquet",
        subset: str = "big",
    ):
        self.batch_size = batch_size
        self.buckets = make_buckets(resolution, bucket_step, max_aspect_ratio)
        self.random_crop, self.random_flip = random_crop, random_flip
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.prefetch = num_workers, max(1, prefetch)
        self.text_cache = text_cache  # training.text_cache.TextCache or None
        self.pin_memory = pin_memory
        self.counts: Counter = Counter()  # rows skipped by reason (planning: first epoch only) + decode errors
        self.epoch, self.batch_index = 0, 0
        self.format, self.caption_source = format, caption_source
        if format == "webdataset":  # tar shards (training/data_wds.py): same plan, reads and positions
            self.wds_shards = _wds.resolve_shards(images_url, subset)
            self.shards = [s.url for s in self.wds_shards]
        elif format == "parquet":
            self.shards = [url for _, url in image_shards(images_url)]
        else:
            raise ValueError(f"data.format {format!r}: allowed parquet, webdataset")
        if not self.shards:
            raise FileNotFoundError(f"no complete image shards (<shard>.parquet + <shard>_stats.json) in {images_url}")
        captions = load_caption_map(caption_source, captions_url, caption_model_id, caption_prompt_id)
        kept = None
        if scores_url and Table(scores_url).exists():
            st = Table(scores_url).read(columns=["key", "kept"])
            kept = set(st.filter(pc.field("kept"))["key"].to_pylist())
        self.latents: dict[str, tuple[list[int], bytes]] | None = None
        if latents_url:  # cached VAE moments (make cache-latents): read into memory, key -> (shape, float16 bytes)
            lt = Table(latents_url).read(columns=["key", "shape", "moments"])
            if lt.num_rows == 0:
                raise FileNotFoundError(f"no cached latents in {latents_url}; run `make cache-latents` first")
            cols = (lt["key"].to_pylist(), lt["shape"].to_pylist(), lt["moments"].to_pylist())
            self.latents = {k: (shape, m) for k, shape, m in zip(*cols, strict=True)}
        self._row_groups: dict[int, np.ndarray] = {}  # shard -> first row of each row group (+ the end)
        self.rows = self._index(captions, kept)
        if not self.rows:
            hint = ""
            if self.counts["skipped: missing image"] == self.counts["rows"]:  # a URL dataset (LAION's way)
                hint = "; the tars hold no images: publish with publish.include_images: true"
            raise ValueError(f"no trainable rows in {images_url} for this rank; skipped: {dict(self.counts)}{hint}")
        self._plans: dict[int, list[list[Row]]] = {}
        self._groups_of_rank: dict[int, list[int]] | None = None
        self._wds_rows: dict[int, dict[int, str]] | None = None  # tars: this rank's rows of each shard (row -> key)
        self._cache: OrderedDict[int, tuple[pa.Table, dict[int, int]]] = OrderedDict()

    def __getstate__(self) -> dict:
        """What a loader process needs (pickled only where processes are spawned, not forked)."""
        state = dict(self.__dict__)
        state["_cache"], state["_plans"] = OrderedDict(), {}
        for k in ("_held", "_held_epoch", "_batch_of", "_rows_of"):  # the reader thread's, rebuilt where used
            state.pop(k, None)
        return state

    # ------------------------------------------------------------------ planning
    def _index(self, captions: dict[str, list[str]] | None, kept: set[str] | None) -> list[Row]:
        """This rank's rows. Every rank reads the metadata columns of every shard (not the
        images) and takes the same share of each bucket: ``usable_b // world_size`` rows of
        bucket b, a contiguous run in (shard, row) order (so a rank reads few shards' images).
        Ranks therefore hold equal rows with equal bucket counts, which gives them the same
        number and sizes of batches each epoch: they stay in step, and none goes round its
        rows more often than another. The ``usable_b % world_size`` rows left over (fewer than
        world_size per bucket) are not trained on and are counted. Skips are counted by the
        rank ``row number % world_size``, so the sums over ranks are the table's counts."""
        usable: list[Row] = []
        n_seen = 0
        for si, url in enumerate(self.shards):
            d = self._shard_meta(si, url)
            none = [None] * len(d["key"])
            for i, key in enumerate(d["key"]):
                counts = n_seen % self.world_size == self.rank  # this rank counts this row's fate
                n_seen += 1
                reason, caps = None, None
                if d.get("skip") and d["skip"][i]:  # found bad while planning (WebDataset members)
                    reason = d["skip"][i]
                elif "status" in d and d["status"][i] not in (None, "success"):
                    reason = "not downloaded"
                elif kept is not None and key not in kept:
                    reason = "not kept"
                else:
                    if captions is None:
                        alt = (d.get("caption") or none)[i]
                        caps = (str(alt),) if alt is not None and str(alt).strip() else None
                    else:
                        caps = tuple(captions.get(key) or ()) or None
                    if caps is None:
                        reason = "missing caption"
                if reason is None:
                    w, h = d.get("width", none)[i], d.get("height", none)[i]
                    if not w or not h:
                        w, h = _size_of(d["image"][i]) if "image" in d else (None, None)
                    if not w or not h:
                        reason = "decode error"
                    elif self.latents is not None and key not in self.latents:
                        reason = "no cached latent"
                if counts:
                    self.counts["rows"] += 1
                    if reason is not None:
                        self.counts[f"skipped: {reason}"] += 1
                if reason is None:
                    usable.append(Row(si, i, key, caps, nearest_bucket(self.buckets, int(w), int(h))))
        by_bucket: dict[int, list[Row]] = {}
        for r in usable:
            by_bucket.setdefault(r.bucket, []).append(r)
        rows: list[Row] = []
        left_over = 0
        for members in by_bucket.values():
            share = len(members) // self.world_size
            rows.extend(members[self.rank * share : (self.rank + 1) * share])
            left_over += len(members) - share * self.world_size
        if left_over and self.rank == 0:
            self.counts["skipped: uneven split across ranks"] += left_over
        rows.sort(key=lambda r: (r.shard, r.row))
        self.counts["usable"] = len(rows)
        return rows

    def _shard_meta(self, si: int, url: str) -> dict[str, list]:
        """The plan's columns of one shard (key, caption, width, height, status | skip; image when
        the sizes must come from the headers), and its row-group bounds."""
        if self.format == "webdataset":
            d, lost, broken = _wds.shard_meta(self.wds_shards[si], self.caption_source, _size_of)
            self._row_groups[si] = np.array([0, len(d["key"])], dtype=np.int64)  # a tar: one "group"
            if lost and self.rank == 0:  # counted once over ranks, as rows and as skipped
                self.counts["rows"] += lost
                self.counts["skipped: corrupt tar"] += lost
            return d
        fs, path = fsspec.core.url_to_fs(url)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            fs_schema = pf.schema_arrow
            sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
        self._row_groups[si] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        cols = [c for c in ("key", "caption", "width", "height", "status") if c in fs_schema.names]
        meta = read_image_shard(url, cols + (["image"] if not {"width", "height"} <= set(cols) else []))
        d = meta.to_pydict()
        if "image" not in d and (None in d["width"] or None in d["height"]):
            # img2dataset leaves the sizes null when it stores the bytes as downloaded (no re-encoding,
            # the download default): read them from the image headers instead
            d["image"] = read_image_shard(url, ["image"]).column("image").to_pylist()
        return d

    def plan(self, epoch: int) -> list[list[Row]]:
        """The epoch's batches for this rank: shuffled, bucketed; deterministic."""
        if epoch in self._plans:
            return self._plans[epoch]
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        by_shard: dict[int, list[Row]] = {}
        for r in self.rows:
            by_shard.setdefault(r.shard, []).append(r)
        order: list[Row] = []
        for s in rng.permutation(sorted(by_shard)):  # shard order, then rows within a shard
            rows = by_shard[int(s)]
            order.extend(rows[i] for i in rng.permutation(len(rows)))
        batches: list[list[Row]] = []
        pending: dict[int, list[Row]] = {}
        for start in range(0, len(order), self.shuffle_buffer):
            for r in order[start : start + self.shuffle_buffer]:
                pending.setdefault(r.bucket, []).append(r)
                if len(pending[r.bucket]) == self.batch_size:
                    batches.append(pending.pop(r.bucket))
        batches.extend(pending[b] for b in sorted(pending))  # the epoch's partial batches, not dropped
        self._plans = {e: b for e, b in self._plans.items() if e >= epoch - 1}  # the reader may look one epoch ahead
        self._plans[epoch] = batches
        return batches

    def captions_in_use(self) -> set[str]:
        """Every caption this rank can train with (all captions of a key that has several)."""
        return {c for r in self.rows for c in r.captions}

    # ------------------------------------------------------------------ position
    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batch_index": self.batch_index,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        if (state.get("seed"), state.get("world_size")) != (self.seed, self.world_size):
            log.warning(
                "data position saved with seed %s / world size %s, now %s / %s: the order will differ",
                state.get("seed"),
                state.get("world_size"),
                self.seed,
                self.world_size,
            )
        self.epoch, self.batch_index = int(state["epoch"]), int(state["batch_index"])

    # ------------------------------------------------------------------ reading (one thread of the training process)
    def _shard_table(self, si: int) -> tuple[pa.Table, dict[int, int]]:
        """This rank's rows of shard ``si``: the row groups that hold them (not the whole shard),
        and ``row -> position`` in that table. The last two shards read are kept."""
        if si not in self._cache and self.format == "webdataset":  # stream the tar once, keep this rank's rows
            if self._wds_rows is None:  # once: this rank's rows of each shard (row -> key)
                self._wds_rows = {}
                for r in self.rows:
                    self._wds_rows.setdefault(r.shard, {})[r.row] = r.key
            wanted = self._wds_rows.get(si, {})
            got = _wds.read_images(self.shards[si], wanted)
            rows = sorted(wanted)
            table = pa.table(
                {"key": [wanted[i] for i in rows], "image": pa.array([got.get(i) for i in rows], pa.binary())}
            )
            self._cache[si] = (table, {row: pos for pos, row in enumerate(rows)})
            while len(self._cache) > 2:
                self._cache.popitem(last=False)
        if si not in self._cache:
            bounds = self._row_groups[si]
            if self._groups_of_rank is None:  # once: the row groups holding this rank's rows, per shard
                groups: dict[int, set[int]] = {}
                for r in self.rows:
                    groups.setdefault(r.shard, set()).add(
                        int(np.searchsorted(self._row_groups[r.shard], r.row, "right")) - 1
                    )
                self._groups_of_rank = {s: sorted(g) for s, g in groups.items()}
            mine = self._groups_of_rank.get(si, [])
            table = read_image_shard(self.shards[si], ["key", "image"], row_groups=mine)
            where, pos = {}, 0
            for g in mine:
                for row in range(int(bounds[g]), int(bounds[g + 1])):
                    where[row] = pos
                    pos += 1
            self._cache[si] = (table, where)
            while len(self._cache) > 2:
                self._cache.popitem(last=False)
        self._cache.move_to_end(si)
        return self._cache[si]

    def _bytes(self, r: Row) -> bytes | None:
        if self.latents is not None:
            return self.latents[r.key][1]
        table, where = self._shard_table(r.shard)
        return table["image"][where[r.row]].as_py()

    def _payloads(self, epoch: int, index: int) -> Iterator[tuple]:
        """``(epoch, batch index, rows, raw bytes)`` from a position on, forever: the plan and the reads."""
        ep, idx = epoch, index
        while True:
            batches = self.plan(ep)
            if idx >= len(batches):
                ep, idx = ep + 1, 0
                continue
            rows = batches[idx]
            if self.format == "webdataset" and self.latents is None:
                yield ep, idx, rows, self._tar_bytes(ep, idx, rows)
            else:
                yield ep, idx, rows, [self._bytes(r) for r in rows]
            idx += 1

    def _tar_bytes(self, epoch: int, index: int, rows: list[Row]) -> list[bytes | None]:
        """The image bytes of batch ``index`` of ``epoch`` from tar shards, each tar streamed once an
        epoch: the first batch that needs a shard streams it and keeps the bytes of this rank's rows
        that batches from ``index`` on use; each is dropped when its batch takes it. (A tar cannot be
        read in parts as a Parquet row group can, and a bucket's batch may gather rows of shards read
        long before: the held rows are those, at most a shard's share plus the partly filled buckets.)"""
        if getattr(self, "_held_epoch", None) != epoch:
            plan = self.plan(epoch)
            self._held_epoch, self._held = epoch, {}
            self._batch_of = {(r.shard, r.row): b for b, batch in enumerate(plan) for r in batch}
            self._rows_of: dict[int, list[Row]] = {}
            for r in self.rows:
                self._rows_of.setdefault(r.shard, []).append(r)
        out = []
        for r in rows:
            if (r.shard, r.row) not in self._held:
                need = {x.row: x.key for x in self._rows_of[r.shard] if self._batch_of[(x.shard, x.row)] >= index}
                got = _wds.read_images(self.shards[r.shard], need)
                self._held.update({(r.shard, row): got.get(row) for row in need})
            out.append(self._held.pop((r.shard, r.row)))
        return out

    # ------------------------------------------------------------------ loading (loader processes)
    def load(self, r: Row, epoch: int) -> torch.Tensor | None:
        """The row's image as a (3, H, W) uint8 tensor at its bucket size; None if it does not decode."""
        x = self._decode(r, self._bytes(r), epoch)
        if x is None:
            self.counts["skipped: decode error"] += 1
        return x

    def _cached(self, r: Row, data: bytes) -> torch.Tensor:
        shape = self.latents[r.key][0]
        return torch.frombuffer(bytearray(data), dtype=torch.float16).reshape(shape).float()

    def _decode(self, r: Row, data: bytes | None, epoch: int) -> torch.Tensor | None:
        """Decode, resize to cover the bucket, crop, flip. Pure: the same bytes, row and epoch
        give the same pixels in any process."""
        from PIL import Image

        bw, bh = self.buckets[r.bucket]
        try:
            img = Image.open(io.BytesIO(data or b""))
            # JPEG: decode at 1/2, 1/4 or 1/8 scale when the bucket is that much smaller (DCT scaling;
            # several times faster than a full decode). Conservative in both orientations (EXIF rotation).
            need = max(bw, bh) / max(1, min(img.size))
            if img.format == "JPEG" and need <= 0.5:
                img.draft("RGB", (math.ceil(img.size[0] * need), math.ceil(img.size[1] * need)))
            img = _to_rgb(img)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a counted skip
            log.debug("%s: %s", r.key, exc)
            return None
        rng = np.random.default_rng([self.seed, epoch, r.shard, r.row])
        scale = max(bw / img.width, bh / img.height)
        nw, nh = max(bw, round(img.width * scale)), max(bh, round(img.height * scale))
        img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
        if self.random_crop:
            x0, y0 = int(rng.integers(0, nw - bw + 1)), int(rng.integers(0, nh - bh + 1))
        else:
            x0, y0 = (nw - bw) // 2, (nh - bh) // 2
        img = img.crop((x0, y0, x0 + bw, y0 + bh))
        if self.random_flip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        # uint8 (a quarter of float32's bytes to copy and to ship): the trainer scales to [-1, 1] on its device
        return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)

    def load_batch(self, payload: tuple) -> dict:
        """One batch from ``(epoch, index, rows, bytes)``: decoded images (or cached latents), the
        captions chosen for the epoch and, with a text cache, their LLM states. Pure (runs in a
        loader process); ``position`` and ``decode_errors`` go back to the training process."""
        ep, idx, rows, blobs = payload
        if self.latents is not None:
            loaded = [(r, self._cached(r, b)) for r, b in zip(rows, blobs, strict=True)]
        else:
            loaded = [(r, self._decode(r, b, ep)) for r, b in zip(rows, blobs, strict=True)]
        ok = [(r, x) for r, x in loaded if x is not None]
        batch = {"position": (ep, idx), "decode_errors": len(loaded) - len(ok), "keys": [r.key for r, _ in ok]}
        if not ok:
            return batch
        batch["captions"] = [choose_caption(r, self.seed, ep) for r, _ in ok]
        batch["latent_moments" if self.latents is not None else "pixel_values"] = torch.stack([x for _, x in ok])
        if self.text_cache is not None:
            batch["text_states"], batch["text_lengths"] = self.text_cache.batch(batch["captions"])
        return batch

    def __iter__(self) -> Iterator[dict]:
        """Batches from the current position on. With ``num_workers`` > 0 a reader thread reads
        the bytes and loader processes decode ``prefetch`` batches each ahead of the training
        step; with 0 all of it runs here, in the loop. The position advances only when a batch
        is handed out, so :meth:`state_dict` never counts a prefetched batch."""
        start = (self.epoch, self.batch_index)
        if self.num_workers == 0:
            source: Iterator[dict] = (self.load_batch(p) for p in self._payloads(*start))
        else:
            methods = multiprocessing.get_all_start_methods()
            loader = torch.utils.data.DataLoader(
                _Batches(self),
                sampler=_ReadAhead(self, start, depth=self.num_workers * self.prefetch + 2),
                batch_size=None,
                collate_fn=_as_is,
                num_workers=self.num_workers,
                prefetch_factor=self.prefetch,
                pin_memory=self.pin_memory,
                multiprocessing_context="fork" if "fork" in methods else None,
            )
            # Forked loader processes share this process's memory (the rows, the plan) until written;
            # freezing the collector keeps it from touching (and so copying) every object in them.
            gc.freeze()
            try:
                source = iter(loader)
            finally:
                gc.unfreeze()
        for batch in source:
            ep, idx = batch.pop("position")
            self.epoch, self.batch_index = ep, idx + 1
            self.counts["skipped: decode error"] += batch.pop("decode_errors")
            if not batch["keys"]:
                continue
            if self.num_workers == 0 and self.pin_memory:
                batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            yield batch


class _Batches(torch.utils.data.Dataset):
    """The ``DataLoader``'s dataset: its 'index' is a payload from :class:`_ReadAhead`."""

    def __init__(self, data: BucketedImageData):
        self.data = data

    def __getitem__(self, payload: tuple) -> dict:
        return self.data.load_batch(payload)


class _ReadAhead(torch.utils.data.Sampler):
    """The ``DataLoader``'s sampler: payloads (position, rows, bytes) in plan order, read by a
    background thread ``depth`` batches ahead, so no shard read happens on the training thread.
    The thread starts on the first request, after the loader processes have forked."""

    def __init__(self, data: BucketedImageData, start: tuple[int, int], depth: int):
        self.data, self.start, self.depth = data, start, depth

    def __iter__(self) -> Iterator[tuple]:
        q: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def read() -> None:
            try:
                for payload in self.data._payloads(*self.start):
                    while not stop.is_set():
                        try:
                            q.put(payload, timeout=0.5)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread, raised there
                q.put(exc)

        thread = threading.Thread(target=read, name="train-data-reader", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()


def _as_is(batch):
    return batch


def to_model_range(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels -> [-1, 1] in ``dtype`` (run it on the training device)."""
    return pixels.to(dtype).div(127.5).sub(1.0)


def _size_of(data: bytes | None) -> tuple[int | None, int | None]:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data or b"")) as img:
            w, h = img.size
            if img.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientation with a quarter turn: as decoded
                w, h = h, w
            return w, h
    except Exception:  # noqa: BLE001
        return None, None


def _to_rgb(img):
    """Decode fully (so truncated files fail here), honour EXIF rotation, flatten alpha on white."""
    from PIL import Image, ImageOps

    img.load()
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        bg = Image.new("RGB", img.size, (255, 255, 255))
        bg.paste(img, mask=img.getchannel("A"))
        return bg
    if img.mode == "I;16" or img.mode == "I":
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB")
