"""`make filter`: the ``images`` table -> the ``scores`` table and the kept set.

Two passes, because duplicates need every shard at once while everything else is
per image:

1. **Measure** (per input shard; Ray Data, or a plain loop with ``runner: local``).
   Operator 1, CPU tasks (:func:`preprocess_batch`): decode robustly, measure size,
   hash bytes and pixels, identify the alt text's language, apply the cheap filters,
   and resize survivors to the model's input as uint8. Operator 2, an actor pool
   (:class:`Scorer`, model loaded once per actor, a GPU each when the cluster has
   GPUs): CLIP image and text embeddings, CLIP score, aesthetic score, the score
   filters. The driver gathers rows by input shard and writes each complete shard to
   the work table ``<scores>/_measure/`` with :meth:`Table.write_shard` (same shard
   name as the input). A rerun measures only shards without a commit marker there.
2. **Decide** (driver, cheap): read hashes (and embeddings for ``dedup: near``) of
   all measured shards, decide duplicates globally (lowest key kept, see
   :func:`curation.filters.decide_duplicates`), and write each final ``scores``
   shard. A final shard whose decisions are unchanged since it was written (a digest
   in its marker) is not rewritten, so a rerun after a kill, or after new input
   shards arrive, redoes only what changed.

A SIGKILL at any point loses at most the shards in flight: every write is atomic and
committed by its marker, and both passes skip what is committed. Every input row
gets exactly one row in ``scores``: failed downloads (``download_failed``) and
undecodable bytes included; pass 2 checks the counts against the input shards.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.config import FilterConfig
from curation.decode import decode_image, one_line, resize_center_crop
from curation.filters import (
    REJECT_DOWNLOAD,
    DuplicateDecision,
    cheap_filters,
    exact_duplicates,
    first_rejection,
    identify_language,
    model_filters,
    near_duplicate_decisions,
)
from curation.models import clip_tokenizer
from curation.safety import SAFETY_REASONS
from curation.safety.lists import SafetyLists, load_lists
from paradiffusion.config import ConfigError, RootConfig
from paradiffusion.images import image_column, image_shards
from paradiffusion.log import get_logger, stage_log_path, third_party_output_to
from paradiffusion.schemas import REJECT_DECODE, SCORES
from paradiffusion.stage import StageSummary, announce, progress
from paradiffusion.storage import Table, join

log = get_logger("curation.filter")

STAGE = "filter"
WORK_SUBDIR = "_measure"
#: Columns of a measured batch besides the SCORES ones: what operator 1 hands to operator 2.
_PIXELS = "pixels"
_NEEDS_MODEL = "needs_model"
_TOKENS = "tokens"
_WM_PIXELS = "watermark_pixels"  # (N, 256, 256, 3) uint8 when filter.models.watermark is set
_INPUT_COLUMNS = ("key", "url", "caption", "status", "error_message")


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Paths:
    """Where the stage reads and writes."""

    images: str
    scores: str

    @property
    def work(self) -> str:
        return join(self.scores, WORK_SUBDIR)


def resolve_paths(cfg: RootConfig) -> Paths:
    root = cfg.project.data_root
    f = cfg.filter
    return Paths(images=f.input or join(root, "images"), scores=f.output or join(root, "scores"))


def validate(cfg: RootConfig) -> None:
    """Checks that need more than the schema: models that exist, thresholds with a model."""
    from curation.models import is_known_clip

    m, t = cfg.filter.models, cfg.filter.thresholds
    if not is_known_clip(m.clip_model):
        raise ConfigError(
            f"filter.models.clip_model = {m.clip_model!r}: not an open_clip built-in name, an 'hf-hub:' id or a "
            "folder with open_clip_config.json (allowed: e.g. ViT-L-14, hf-hub:laion/CLIP-ViT-L-14-laion2B-s32B-b82K, "
            "/models/clip)"
        )
    builtin = not m.clip_model.startswith(("hf-hub:", "local-dir:")) and not os.path.isdir(m.clip_model)
    if builtin and m.clip_pretrained and not os.path.isfile(m.clip_pretrained):
        import open_clip

        tags = open_clip.list_pretrained_tags_by_model(m.clip_model)
        if m.clip_pretrained not in tags:
            raise ConfigError(
                f"filter.models.clip_pretrained = {m.clip_pretrained!r}: not a checkpoint file nor a pretrained tag of "
                f"{m.clip_model} (allowed: {', '.join(tags) or 'a checkpoint file'})"
            )
    if m.aesthetic is None and t.aesthetic_min is not None:
        raise ConfigError(
            f"filter.thresholds.aesthetic_min = {t.aesthetic_min} needs filter.models.aesthetic "
            "(allowed: a weights path/URL, or set aesthetic_min to null)"
        )
    for name, allowed in (
        ("aesthetic", "a local .pth/.safetensors file, an http(s) or fsspec URL, or null"),
        ("nsfw", "converted weights, see `python -m curation.safety.nsfw convert`, an http(s) or fsspec URL, or null"),
        ("watermark", "watermark_model_v1.pt as a path, an http(s) or fsspec URL, or null"),
    ):
        path = getattr(m, name)
        if path is not None and "://" not in path and not os.path.isfile(path):
            raise ConfigError(f"filter.models.{name} = {path!r}: file not found (allowed: {allowed})")
    if m.device not in ("auto", "cpu") and not m.device.startswith(("cuda", "mps", "xpu")):
        raise ConfigError(f"filter.models.device = {m.device!r}: allowed 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'")


# --------------------------------------------------------------------------- operator 1: CPU
def preprocess_batch(
    batch: dict[str, np.ndarray], fcfg: dict, image_size: int, safety: SafetyLists | None = None
) -> dict[str, np.ndarray]:
    """Decode, measure and cheap-filter a batch of input rows; resize survivors to uint8.

    ``batch`` has ``key, url, caption, status, error_message, image, shard`` (numpy
    columns, as Ray Data hands them and :func:`measure_table` builds them). Returns the
    SCORES measurement columns plus ``pixels`` (N, S, S, 3) uint8 and ``needs_model``.
    ``safety``: the denylists and opt-out lists, checked on the URL and the stored bytes
    before anything is decoded.
    """
    cfg = FilterConfig.model_validate(fcfg)
    filters = cheap_filters(cfg.thresholds)
    d = cfg.decode
    wm = cfg.models.watermark is not None
    if wm:
        from curation.safety.watermark import SIZE as WM_SIZE
        from curation.safety.watermark import watermark_pixels
    draft = (max(image_size, WM_SIZE) if wm else image_size) if d.reduced_jpeg else None
    n = len(batch["key"])
    out: dict[str, list] = defaultdict(list)
    pixels = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    wm_pixels = np.zeros((n, WM_SIZE, WM_SIZE, 3) if wm else (n, 1, 1, 3), dtype=np.uint8)
    for i in range(n):
        caption = batch["caption"][i]
        caption = None if _missing(caption) else str(caption)
        status = batch["status"][i] if "status" in batch else "success"
        row: dict[str, Any] = {
            "key": str(batch["key"][i]),
            "shard": str(batch["shard"][i]),
            "url": None if _missing(batch["url"][i]) else str(batch["url"][i]),
            "caption": caption,
            "width": None,
            "height": None,
            "sha256": None,
            "pixel_hash": None,
            "language": None,
            "language_score": None,
            "reject_reason": None,
            "reject_detail": None,
        }
        needs_model = False
        data = batch["image"][i]
        if status != "success" or _missing(data):
            from curation.download import failure_line

            row["reject_reason"] = REJECT_DOWNLOAD
            msg = batch["error_message"][i] if "error_message" in batch else None
            msg = None if _missing(msg) else str(msg)
            # "http_404: HTTP Error 404: Not Found": the download's reason and one line of
            # its message (the raw text stays in the images table's error_message)
            row["reject_detail"] = failure_line(msg) if msg else f"{status or 'no image bytes'}"
            if msg and msg.split(":", 1)[0] in SAFETY_REASONS:  # refused at download: its own reason
                row["reject_reason"], _, detail = msg.partition(":")
                row["reject_detail"] = detail.strip()
        elif safety and (found := safety.check_url(row["url"]) or safety.check_bytes(bytes(data))) is not None:
            # a list that grew since the download: these bytes are never decoded
            row["reject_reason"], row["reject_detail"] = found
        else:
            try:
                dec = decode_image(bytes(data), max_pixels=d.max_pixels, animated=d.animated, draft_size=draft)
                row.update(width=dec.width, height=dec.height, sha256=dec.sha256, pixel_hash=dec.pixel_hash)
                row["language"], row["language_score"] = identify_language(caption)
                if dec.reason is not None:
                    row["reject_reason"], row["reject_detail"] = dec.reason, dec.detail
                else:
                    rej = first_rejection(filters, row)
                    if rej is not None:
                        row["reject_reason"], row["reject_detail"] = rej
                    else:
                        pixels[i] = resize_center_crop(dec.image, image_size)
                        if wm:  # the same decoded image, the detector's own geometry
                            wm_pixels[i] = watermark_pixels(dec.image)
                        needs_model = True
            except Exception as exc:  # noqa: BLE001 - one odd image must not stop the shard
                row["reject_reason"] = REJECT_DECODE
                row["reject_detail"] = one_line(f"unexpected {type(exc).__name__}: {exc}")
                log.warning("key %s: %s", row["key"], row["reject_detail"])
        for k, v in row.items():
            out[k].append(v)
        out[_NEEDS_MODEL].append(needs_model)
    res = {k: np.array(v, dtype=object) for k, v in out.items()}
    for k in ("width", "height"):
        res[k] = np.array([-1 if v is None else v for v in out[k]], dtype=np.int32)
    res["language_score"] = np.array([np.nan if v is None else v for v in out["language_score"]], np.float32)
    res[_NEEDS_MODEL] = np.array(out[_NEEDS_MODEL], dtype=bool)
    res[_PIXELS] = pixels
    res[_WM_PIXELS] = wm_pixels
    # Tokenise here, on the CPU workers: open_clip's tokenizer is Python and would cost
    # the model actor about a millisecond per caption.
    tokenizer = clip_tokenizer(cfg.models.clip_model)
    texts = [c or "" if ok else "" for c, ok in zip(out["caption"], out[_NEEDS_MODEL], strict=True)]
    res[_TOKENS] = tokenizer(texts).numpy().astype(np.int32) if n else np.zeros((0, 77), np.int32)
    return res


# --------------------------------------------------------------------------- operator 2: models
class Scorer:
    """CLIP + aesthetic on the rows that passed the cheap filters; one per actor.

    Loads the models once (in ``__init__``), on the GPU Ray gave the actor, else CPU.
    """

    def __init__(self, fcfg: dict, keep_embeddings: bool, torch_threads: int | None = None):
        import torch

        from curation.models import load_aesthetic, load_clip, resolve_device

        cfg = FilterConfig.model_validate(fcfg)
        if torch_threads:
            torch.set_num_threads(torch_threads)
        m = cfg.models
        device = resolve_device(m.device)
        precision = m.precision if device.type != "cpu" else "fp32"
        self.clip = load_clip(m.clip_model, m.clip_pretrained, device=str(device), precision=precision)
        self.aesthetic = load_aesthetic(m.aesthetic, device=str(device)) if m.aesthetic else None
        from curation.safety.nsfw import load_nsfw

        self.nsfw = load_nsfw(m.nsfw, device=str(device)) if m.nsfw else None
        from curation.safety.watermark import load_watermark

        self.watermark = load_watermark(m.watermark, str(device), precision) if m.watermark else None
        self.filters = model_filters(cfg.thresholds)
        self.keep_embeddings = keep_embeddings
        self.batch_size = cfg.batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from curation.models import clip_scores

        n = len(batch["key"])
        idx = np.nonzero(batch[_NEEDS_MODEL])[0]
        dim = self.clip.embed_dim
        img_emb = np.full((n, dim), np.nan, np.float32)
        txt_emb = np.full((n, dim), np.nan, np.float32)
        aesthetic = np.full(n, np.nan, np.float32)
        clip = np.full(n, np.nan, np.float32)
        nsfw = np.full(n, np.nan, np.float32)
        watermark = np.full(n, np.nan, np.float32)
        for s in range(0, len(idx), self.batch_size):
            part = idx[s : s + self.batch_size]
            ie = self.clip.encode_images(batch[_PIXELS][part])
            te = self.clip.encode_tokens(batch[_TOKENS][part])
            img_emb[part], txt_emb[part] = ie, te
            clip[part] = clip_scores(ie, te)
            if self.aesthetic is not None:
                aesthetic[part] = self.aesthetic.score(ie)
            if self.nsfw is not None:  # the same image embedding: a 768x64 MLP more
                nsfw[part] = self.nsfw.score(ie)
            if self.watermark is not None:
                watermark[part] = self.watermark.score(batch[_WM_PIXELS][part])
        reasons, details = _objects(batch["reject_reason"]), _objects(batch["reject_detail"])
        for i in idx:
            rej = first_rejection(
                self.filters,
                {
                    "aesthetic": float(aesthetic[i]) if self.aesthetic else None,
                    "clip_score": float(clip[i]),
                    "nsfw": float(nsfw[i]) if self.nsfw is not None else None,
                    "watermark": float(watermark[i]) if self.watermark is not None else None,
                },
            )
            if rej is not None:
                reasons[i], details[i] = rej
        out = {k: v for k, v in batch.items() if k not in (_PIXELS, _TOKENS, _WM_PIXELS)}
        out.update(reject_reason=reasons, reject_detail=details, aesthetic=aesthetic, clip_score=clip, nsfw=nsfw)
        out["watermark"] = watermark
        if self.keep_embeddings:
            out["image_embedding"], out["text_embedding"] = img_emb, txt_emb
        return out


# --------------------------------------------------------------------------- batches -> table
def _missing(v: Any) -> bool:
    # Ray Data hands an all-None object column back as a float32 column of NaN.
    return v is None or (isinstance(v, (float, np.floating)) and v != v)


def _objects(values: np.ndarray) -> np.ndarray:
    """A string column as an object array with None for missing values."""
    return np.array([None if _missing(v) else v for v in values], dtype=object)


def _nullable(values: np.ndarray, missing: Any) -> list:
    if values.dtype.kind == "f":
        return [None if not np.isfinite(v) else float(v) for v in values]
    return [None if v == missing else int(v) for v in values]


def batch_to_table(batch: dict[str, np.ndarray]) -> pa.Table:
    """A scored batch as a SCORES-schema table (``kept`` = passed every per-image filter)."""
    cols: dict[str, Any] = {}
    for name in (
        "key",
        "shard",
        "url",
        "caption",
        "sha256",
        "pixel_hash",
        "language",
        "reject_reason",
        "reject_detail",
    ):
        cols[name] = [None if _missing(v) else str(v) for v in batch[name]]
    cols["width"] = _nullable(batch["width"], -1)
    cols["height"] = _nullable(batch["height"], -1)
    for name in ("language_score", "aesthetic", "clip_score", "nsfw", "watermark"):
        if name in batch:  # the optional models' columns may be absent from a hand-made batch
            cols[name] = _nullable(np.asarray(batch[name], np.float32), None)
    cols["kept"] = [r is None for r in cols["reject_reason"]]
    for name in ("image_embedding", "text_embedding"):
        if name in batch:
            emb = np.asarray(batch[name], np.float32)
            cols[name] = [None if not np.isfinite(e).all() else e.tolist() for e in emb]
    t = pa.table({k: pa.array(v, type=SCORES.field(k).type) for k, v in cols.items()})
    from paradiffusion.storage import conform

    return conform(t, SCORES)


def iter_input_batches(shard: str, url: str, batch_rows: int) -> Iterator[dict[str, np.ndarray]]:
    """Stream an img2dataset shard as numpy batches of ``batch_rows`` (image column -> ``image``)."""
    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        col = image_column(pf.schema_arrow)
        want = [c for c in _INPUT_COLUMNS if c in pf.schema_arrow.names] + [col]
        for rb in pf.iter_batches(batch_size=batch_rows, columns=want):
            out = {("image" if c == col else c): rb.column(c).to_numpy(zero_copy_only=False) for c in want}
            out["shard"] = np.array([shard] * rb.num_rows, dtype=object)
            yield out


def _read_shard_batches(
    items: dict[str, np.ndarray], batch_rows: int, storage: dict | None = None
) -> Iterator[dict[str, np.ndarray]]:
    if storage:  # a Ray worker, maybe on another node: the driver's endpoint and credentials, handed over
        from paradiffusion.storage import apply_storage_options

        apply_storage_options(storage)
    for shard, url in zip(items["shard"], items["url"], strict=True):
        yield from iter_input_batches(str(shard), str(url), batch_rows)


def measure_table(
    shard: str, url: str, fcfg: dict, image_size: int, scorer: Scorer, chunk: int, safety: SafetyLists | None = None
) -> pa.Table:
    """Pass 1 for one shard as a plain loop (the same functions the Ray operators run)."""
    parts = [
        batch_to_table(scorer(preprocess_batch(b, fcfg, image_size, safety)))
        for b in iter_input_batches(shard, url, chunk)
    ]
    return pa.concat_tables(parts) if parts else SCORES.empty_table()


def _shard_rows(url: str) -> int:
    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "rb") as fh:
        return pq.ParquetFile(fh).metadata.num_rows


# --------------------------------------------------------------------------- pass 1 runners
def measure_local(
    pending: list[tuple[str, str]],
    work: Table,
    cfg: RootConfig,
    image_size: int,
    meta: dict,
    console: Any,
    safety: SafetyLists | None = None,
) -> str:
    """Pass 1 in this process, shard by shard."""
    f = cfg.filter
    keep_emb = f.save_embeddings or f.thresholds.dedup == "near"
    scorer = Scorer(f.model_dump(mode="json"), keep_emb, f.torch_threads)
    total = sum(_shard_rows(u) for _, u in pending)
    bar = progress(None, total=total, desc="filter: measure", unit="img", file=console)
    for shard, url in pending:
        t = measure_table(shard, url, f.model_dump(mode="json"), image_size, scorer, f.decode_batch_size, safety)
        work.write_shard(shard, t, meta={**meta, "input": url})
        bar.update(t.num_rows)
    bar.close()
    return "plain loop in this process"


def measure_ray(
    pending: list[tuple[str, str]],
    work: Table,
    cfg: RootConfig,
    image_size: int,
    meta: dict,
    console: Any,
    safety: SafetyLists | None = None,
) -> str:
    """Pass 1 as a Ray Data pipeline: CPU decode tasks -> model actor pool -> shard writer."""
    import ray
    import ray.data

    from paradiffusion.raycluster import init_ray
    from paradiffusion.storage import worker_storage_options

    where = init_ray(cfg.ray, extra="curation")
    f = cfg.filter
    fcfg = f.model_dump(mode="json")
    keep_emb = f.save_embeddings or f.thresholds.dedup == "near"
    gpus = f.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    threads = f.torch_threads or max(1, int(f.cpus_per_actor))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own bar counts images; Ray's per-operator bars go to the log
    ctx.execution_options.preserve_order = False
    expected = {shard: _shard_rows(url) for shard, url in pending}
    # One read task per input shard, streaming record batches of decode_batch_size
    # (bounded memory even for shards of full-size originals). Hand-written rather than
    # ray.data.read_parquet so the shard name travels with each row and any fsspec URL
    # pyarrow can open works.
    items = [{"shard": s, "url": u} for s, u in pending]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        _read_shard_batches,
        fn_kwargs={"batch_rows": f.decode_batch_size, "storage": worker_storage_options()},
        batch_size=1,
        batch_format="numpy",
        num_cpus=0,  # streaming I/O: must not wait for a CPU that the model actors hold (CPU-only runs)
        # ...but zero-CPU tasks are otherwise unbounded: Ray starts a worker process per
        # pending shard (28 for 32 shards on 2 cores in bench/filter_cpu.py), which costs
        # more than the reading. A couple of streaming readers keep the actors fed.
        compute=ray.data.TaskPoolStrategy(size=min(f.read_concurrency, len(items))),
    )
    ds = ds.map_batches(
        preprocess_batch,
        fn_kwargs={"fcfg": fcfg, "image_size": image_size, "safety": safety if safety else None},
        batch_size=f.decode_batch_size,
        batch_format="numpy",
        num_cpus=1,
    )
    ds = ds.map_batches(
        Scorer,
        fn_constructor_kwargs={"fcfg": fcfg, "keep_embeddings": keep_emb, "torch_threads": threads},
        batch_size=f.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=f.num_actors),
        num_gpus=gpus,
        num_cpus=f.cpus_per_actor,
    )
    buffers: dict[str, list[pa.Table]] = defaultdict(list)
    counts: Counter = Counter()
    bar = progress(None, total=sum(expected.values()), desc="filter: measure", unit="img", file=console)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        t = batch_to_table(batch)
        for shard in set(t["shard"].to_pylist()):
            part = t.filter(pc.equal(t["shard"], shard))
            buffers[shard].append(part)
            counts[shard] += part.num_rows
            if counts[shard] == expected[shard]:
                work.write_shard(shard, pa.concat_tables(buffers.pop(shard)), meta=meta)
        bar.update(t.num_rows)
    bar.close()
    missing = {s: (counts[s], n) for s, n in expected.items() if counts[s] != n}
    if missing:
        raise RuntimeError(f"rows per shard do not add up (got, expected): {missing}")
    return where


RUNNERS = {"local": measure_local, "ray": measure_ray}


# --------------------------------------------------------------------------- settings on record
from curation.filter_settings import (  # noqa: E402 - re-exported: the stage's settings API lives there
    _CHECK_COLUMNS,
    _refuse,
    check_settings,
    decision_settings,
    measure_settings,
    plan_measured,
    read_measured,
    recheck,
)


# --------------------------------------------------------------------------- pass 2
def _digest(items: list[tuple]) -> str:
    return hashlib.sha256(json.dumps(sorted(items), default=str).encode()).hexdigest()[:16]


@dataclass
class _Measured:
    """What pass 2 keeps of one measured shard while deciding."""

    reasons: list | None  # re-decided reasons (None: the stored ones stand)
    details: list | None


def _near_chunks(work: Table, sorted_keys: pa.Array):
    """Yield ``(positions, normalised embeddings)`` of the candidate rows, shard by shard."""

    def chunks():
        for shard in sorted(work.done_shards()):
            t = pq.read_table(work.shard_file(shard), filesystem=work.fs, columns=["key", "image_embedding"])
            pos = pc.index_in(t["key"], value_set=sorted_keys)
            mask = pc.and_(pc.is_valid(pos), pc.is_valid(t["image_embedding"]))
            if not pc.any(mask).as_py():
                continue
            t, pos = t.filter(mask), pos.filter(mask)
            emb = t["image_embedding"].combine_chunks()
            vec = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(emb), -1)
            ok = np.isfinite(vec).all(axis=1)
            vec = vec[ok] / np.maximum(np.linalg.norm(vec[ok], axis=1, keepdims=True), 1e-12)
            yield pos.to_numpy(zero_copy_only=False)[ok].astype(np.int64), vec

    return chunks


def near_duplicates(work: Table, sorted_keys: list[str], cfg: RootConfig) -> tuple[dict, str]:
    """Near-duplicate decisions over the candidates' embeddings; also says which search ran."""
    from curation.neardup import ann_pairs, exact_pairs

    t, nd = cfg.filter.thresholds, cfg.filter.near_dup
    keys = pa.array(sorted_keys, pa.string())
    chunks = _near_chunks(work, keys)
    n = len(sorted_keys)
    method = nd.search if nd.search != "auto" else ("exact" if n <= nd.exact_max_rows else "ann")
    if method == "exact" or n == 0:
        parts = list(chunks())
        dim = parts[0][1].shape[1] if parts else 1
        emb = np.full((n, dim), np.nan, np.float32)
        for pos, vec in parts:
            emb[pos] = vec
        valid = np.flatnonzero(np.isfinite(emb).all(axis=1))
        pairs = exact_pairs(emb[valid], t.near_dup_min)
        pairs.i, pairs.j = valid[pairs.i], valid[pairs.j]
        return near_duplicate_decisions(sorted_keys, pairs, t.near_dup_min), f"exact ({n:,} rows)"
    dim = next((vec.shape[1] for _, vec in chunks()), 1)
    pairs = ann_pairs(
        chunks,
        n,
        dim,
        t.near_dup_min,
        nd.nlist,
        nd.cells_per_row,
        nd.storage,
        nd.train_per_cell,
        seed=cfg.project.seed + 1234,
    )
    return (
        near_duplicate_decisions(sorted_keys, pairs, t.near_dup_min),
        f"k-means cells ({n:,} rows, {nd.cells_per_row} cells a row, {nd.storage})",
    )


def decide(
    work: Table,
    out: Table,
    cfg: RootConfig,
    expected_rows: dict[str, int],
    run_id: str,
    image_size: int,
    recheck_shards: set[str] | None = None,
    console: Any = None,
    lists: dict | None = None,
) -> tuple[int, dict]:
    """Pass 2: re-apply changed checks, decide duplicates over every measured shard, write
    the final shards whose decisions changed; returns (shards written, facts for the summary)."""
    f = cfg.filter
    t = f.thresholds
    settings = decision_settings(f, image_size, lists)
    settings_fp = _digest([("settings", json.dumps(settings, sort_keys=True))])
    redo = recheck_shards or set()
    measured: dict[str, _Measured] = {}
    cand_keys: list[str] = []
    cand_sha: list[str | None] = []
    cand_px: list[str | None] = []
    key_shard: dict[str, str] = {}
    for shard in sorted(work.done_shards()):
        cols = (
            _CHECK_COLUMNS + ["sha256", "pixel_hash"]
            if shard in redo
            else ["key", "reject_reason", "sha256", "pixel_hash"]
        )
        rows = read_measured(work, shard, cols)
        if shard in redo:
            reasons, details, _ = recheck(rows, f)
            measured[shard] = _Measured(reasons, details)
        else:
            reasons = rows["reject_reason"].to_pylist()
        if t.dedup == "off":
            continue
        keep = [r is None for r in reasons]
        if not any(keep):
            continue
        mask = pa.array(keep)
        keys = rows["key"].filter(mask).to_pylist()
        cand_keys += keys
        cand_sha += rows["sha256"].filter(mask).to_pylist()
        cand_px += rows["pixel_hash"].filter(mask).to_pylist()
        key_shard.update(dict.fromkeys(keys, shard))
    facts: dict = {}
    decisions: dict[str, DuplicateDecision] = {}
    if t.dedup != "off":
        decisions = exact_duplicates(cand_keys, cand_sha, cand_px)
        if t.dedup == "near":
            remaining = sorted(k for k in cand_keys if k not in decisions)
            near, facts["near_dup_search"] = near_duplicates(work, remaining, cfg)
            decisions.update(near)
    del cand_sha, cand_px
    per_shard: dict[str, list[tuple]] = defaultdict(list)
    for key, d in decisions.items():
        per_shard[key_shard[key]].append((key, d.reason, d.duplicate_of, d.detail))
    written = 0
    markers = work.markers()
    for shard in progress(sorted(markers), desc="filter: decide", unit="shard", file=console):
        wm = markers[shard]
        digest = _digest(
            per_shard.get(shard, []) + [("measured", wm["written_at"], wm.get("run_id", "")), ("settings", settings_fp)]
        )
        if out.is_done(shard) and out.marker(shard).get("decision_digest") == digest:
            continue
        names = [n for n in SCORES.names if f.save_embeddings or n not in ("image_embedding", "text_embedding")]
        rows = read_measured(work, shard, names)
        if shard in expected_rows and rows.num_rows != expected_rows[shard]:
            raise RuntimeError(f"shard {shard}: {rows.num_rows} measured rows for {expected_rows[shard]} input rows")
        m = measured.get(shard)
        reason = m.reasons if m else rows["reject_reason"].to_pylist()
        detail = m.details if m else rows["reject_detail"].to_pylist()
        dup_of = [None] * rows.num_rows
        dups = {k: (r, of, det) for k, r, of, det in per_shard.get(shard, [])}
        if dups:
            for i, k in enumerate(rows["key"].to_pylist()):
                if k in dups:
                    reason[i], dup_of[i], detail[i] = dups[k]
        for name, values in (("reject_reason", reason), ("reject_detail", detail), ("duplicate_of", dup_of)):
            rows = rows.set_column(rows.schema.get_field_index(name), name, pa.array(values, pa.string()))
        rows = rows.set_column(rows.schema.get_field_index("kept"), "kept", pc.is_null(rows["reject_reason"]))
        out.write_shard(shard, rows, meta={"decision_digest": digest, "run_id": run_id, "settings": settings})
        written += 1
    return written, facts


def funnel(out: Table, summary: StageSummary) -> None:
    """Fill ``summary`` from the whole scores table: in, rejected per reason, kept."""
    t = out.read(columns=["kept", "reject_reason"])
    summary.n_in = t.num_rows
    summary.n_out = int(pc.sum(t["kept"]).as_py() or 0) if t.num_rows else 0
    for reason, n in Counter(r for r in t["reject_reason"].to_pylist() if r is not None).most_common():
        summary.reject(reason, n)


# --------------------------------------------------------------------------- the stage
def run_filter(cfg: RootConfig, args: argparse.Namespace | None = None) -> int:
    """The ``filter`` command: check settings on record, measure pending shards, decide, write the funnel."""
    from curation.models import clip_input_size

    f = cfg.filter
    paths = resolve_paths(cfg)
    validate(cfg)
    # the download's denylists and opt-out lists, applied again here: a list that cannot be read stops the run now
    safety = load_lists(cfg.download.denylists, cfg.download.opt_outs)
    lists = safety.fingerprint()
    shards = image_shards(paths.images)
    if not shards:
        raise ConfigError(
            f"filter.input = {paths.images!r}: no complete img2dataset shards (<shard>.parquet with "
            "<shard>_stats.json); run `make download` first or point filter.input at the images table"
        )
    out = Table(paths.scores, SCORES)
    work = Table(paths.work, SCORES)
    cleaned = out.clean_tmp() + work.clean_tmp()
    if cleaned:
        log.info("removed %d leftover file(s) of an interrupted run", cleaned)
    image_size = clip_input_size(f.models.clip_model)
    inputs = dict(shards)
    plan = plan_measured(work, cfg, image_size, lists)
    if plan.stale and f.changed_settings == "refuse":
        raise _refuse(plan, len(work.done_shards()), work)
    done = work.done_shards() - set(plan.stale)
    pending = [(s, u) for s, u in shards if s not in done]
    lost = sorted(set(plan.stale) - set(inputs))
    if lost:
        raise ConfigError(
            f"shards {lost[:5]} must be measured again but their input is gone from {paths.images}; "
            "write to a new filter.output"
        )
    is_local = f.models.clip_model.startswith(("hf-hub:", "local-dir:")) or os.path.isdir(f.models.clip_model)
    t = f.thresholds
    log_path = stage_log_path(paths.scores, STAGE)
    remeasure = f", {len(plan.stale)} of them again (changed settings)" if plan.stale else ""
    announce(
        STAGE,
        {
            "input": f"{paths.images} ({len(shards)} shards: {len(pending)} to measure{remeasure}, "
            f"{len(shards) - len(pending)} done)",
            "output": paths.scores,
            "runner": f.runner if f.runner == "local" else "Ray Data (decode tasks -> model actor pool)",
            "CLIP": f"{f.models.clip_model}{'' if is_local else f' ({f.models.clip_pretrained})'}, input {image_size}px",
            "aesthetic": f.models.aesthetic or "off",
            "NSFW": f"{f.models.nsfw}, reject above {t.nsfw_max}" if f.models.nsfw else "off (filter.models.nsfw)",
            "watermark": f"{f.models.watermark}, reject above {t.watermark_max}"
            if f.models.watermark
            else "off (filter.models.watermark)",
            "safety": f"lists: {safety.describe()} (download.denylists / opt_outs)",
            "thresholds": (
                f"short side >= {t.min_short_side}, aspect <= {t.max_aspect_ratio}, alt text >= "
                f"{t.caption_min_chars} chars / {t.caption_min_words} words, language in {t.languages or 'any'}, "
                f"aesthetic >= {t.aesthetic_min}, CLIP score >= {t.clip_score_min}, dedup {t.dedup}"
            ),
            **(
                {"re-decide": f"{len(plan.recheck)} measured shard(s) with this run's thresholds (no model work)"}
                if plan.recheck
                else {}
            ),
            "log": f"{log_path} (Ray's and other libraries' output)",
        },
    )
    summary = StageSummary(STAGE, skipped_unit="shards")
    summary.skipped_done = len(shards) - len(pending)
    run_id = uuid.uuid4().hex[:12]
    meta = {
        "run_id": run_id,
        "settings": {"measure": measure_settings(f, image_size, lists), "checks": check_settings(f)},
    }
    t0 = time.time()
    where = "nothing to measure"
    with third_party_output_to(log_path) as console:
        if pending:
            where = RUNNERS[f.runner](pending, work, cfg, image_size, meta, console, safety)
        measured_s = time.time() - t0
        expected = {s: _shard_rows(u) for s, u in shards}
        settings = decision_settings(f, image_size, lists)
        out.save_config(cfg, STAGE, settings)  # names the shards this run has not rewritten yet
        written, facts = decide(work, out, cfg, expected, run_id, image_size, plan.recheck, console, lists)
    out.save_config(cfg, STAGE, settings)  # every shard is now this run's
    funnel(out, summary)
    summary.extra.update(
        {
            "kept_fraction": round(summary.n_out / summary.n_in, 4) if summary.n_in else 0.0,
            "shards": len(shards),
            "shards_measured_this_run": len(pending),
            "shards_redecided_this_run": len(plan.recheck),
            "shards_written_this_run": written,
            "measure_seconds": round(measured_s, 2),
            "ran_on": where,
            **facts,
            "log": log_path,
        }
    )
    summary.finish()
    out.save_json("_summary.json", summary.to_dict())
    summary.print()
    return 0
