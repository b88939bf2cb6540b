"""`make caption`: paragraph captions for the kept set, written to the ``captions`` table.

Flow::

    scores (kept, width, height) ─▶ plan: pending keys, bucket-sorted chunks  (driver)
    chunk ─▶ read bytes, decode, resize (CPU operator, Ray tasks)
          ─▶ caption batches (model actor pool: one model load per actor, num_gpus = 1/actors_per_gpu)
          ─▶ the driver collects rows by chunk; a complete chunk is one atomic, committed shard

The same operators run as a plain loop with ``resources.executor: local`` (tests, the
benchmark, a single machine without Ray). A rerun skips keys already captioned by
the same (model, revision, prompt text); ``--recaption`` redoes them and the newer
row replaces the older one. A kill loses at most the chunks in flight.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from captioning.config import CaptionConfig
from captioning.prep import Chunk, caption_tag, decode_chunk, error_kind, plan_chunks, prompt_hash, tag_prefix
from captioning.quality import caption_flags, words
from captioning.store import dedupe, done_keys, read_state
from paradiffusion.config import ConfigError, RootConfig
from paradiffusion.log import get_logger
from paradiffusion.schemas import CAPTIONS
from paradiffusion.stage import StageSummary, announce, progress
from paradiffusion.storage import Table, join, rows_to_table

log = get_logger("captioning")

_PLACEHOLDER = np.zeros((1, 1, 3), np.uint8)  # image slot of a row that failed to decode


class CaptionWorker:
    """The model operator: loads the captioner once, then captions batches of rows.

    Input batch columns: ``key``, ``chunk``, ``image`` (HxWx3 uint8), ``error``
    (decode error or None). Output columns: ``key``, ``chunk``, ``caption``,
    ``n_tokens``, ``finish_reason``, ``seconds``, ``error``. Rows with a decode error
    pass through with ``finish_reason = "error"``.
    """

    def __init__(self, spec: dict, generation: dict, prompt: str):
        from captioning.captioners import load_captioner
        from captioning.config import CaptionerSpec, GenerationSettings

        self.captioner = load_captioner(
            CaptionerSpec.model_validate(spec), GenerationSettings.model_validate(generation)
        )
        self.prompt = prompt

    def __call__(self, batch: dict) -> dict:
        from PIL import Image

        n = len(batch["key"])
        errors = [e if isinstance(e, str) and e else None for e in batch["error"]]
        ok = [i for i in range(n) if errors[i] is None]
        t0 = time.perf_counter()
        results = self.captioner.caption([Image.fromarray(np.asarray(batch["image"][i])) for i in ok], self.prompt)
        per_image = (time.perf_counter() - t0) / max(1, len(ok))
        out = {
            "key": [str(k) for k in batch["key"]],
            "chunk": [str(c) for c in batch["chunk"]],
            "caption": [None] * n,
            "n_tokens": [0] * n,
            "finish_reason": ["error"] * n,
            "seconds": [0.0] * n,
            "error": errors,
        }
        for i, r in zip(ok, results, strict=True):
            out["caption"][i], out["n_tokens"][i], out["finish_reason"][i] = r.caption, r.n_tokens, r.finish_reason
            out["seconds"][i], out["error"][i] = per_image, r.error
        return out


def _rows(columns: dict) -> Iterator[dict]:
    names = list(columns)
    for values in zip(*(columns[c] for c in names), strict=True):
        yield dict(zip(names, values, strict=True))


def _decoded_rows(chunk: dict, prep, storage: dict | None = None) -> Iterator[dict]:
    if storage:  # a Ray worker, maybe on another node: the driver's endpoint and credentials, handed over
        from paradiffusion.storage import apply_storage_options

        apply_storage_options(storage)
    for row in decode_chunk(chunk, prep):
        if row["image"] is None:
            row["image"] = _PLACEHOLDER
        yield row


def _batches(rows: list[dict], size: int) -> Iterator[dict]:
    for i in range(0, len(rows), size):
        part = rows[i : i + size]
        yield {c: [r[c] for r in part] for c in ("key", "chunk", "image", "error")}


# --------------------------------------------------------------------------- executors
def run_local(chunks: list[Chunk], c: CaptionConfig, cfg: RootConfig, info: dict) -> Iterator[dict]:
    """Decode and caption in this process, chunk by chunk (tests, benchmarks, no Ray)."""
    info["ran_on"] = "this process (executor: local)"
    worker = CaptionWorker(worker_spec(c, 1), c.generation.model_dump(mode="json"), c.prompt_text)
    for ch in chunks:
        rows = list(_decoded_rows(ch.to_dict(), c.image))
        for batch in _batches(rows, c.effective_batch_size):
            yield from _rows(worker(batch))


def actor_pool_size(cluster_gpus: float, c: CaptionConfig) -> tuple[int, float]:
    """``(actors, GPUs per actor)``: by default one actor per GPU slot (``actors_per_gpu`` slots a GPU,
    each asking for ``1/actors_per_gpu`` of it); one CPU actor when there is no GPU or the model is on CPU."""
    r = c.resources
    use_gpu = cluster_gpus > 0 and c.spec.device != "cpu" and c.spec.type != "openai"  # a served model: no GPU here
    num_gpus = 1.0 / r.actors_per_gpu if use_gpu else 0.0
    actors = r.num_actors or (max(1, int(cluster_gpus * r.actors_per_gpu)) if use_gpu else 1)
    return actors, num_gpus


def worker_spec(c: CaptionConfig, actors: int) -> dict:
    """The captioner settings each actor gets (a served captioner's concurrency is shared by the actors)."""
    spec = c.spec.model_dump(mode="json")
    if spec.get("server"):
        spec["server"]["concurrency"] = max(1, -(-spec["server"]["concurrency"] // actors))
    return spec


def run_ray(chunks: list[Chunk], c: CaptionConfig, cfg: RootConfig, info: dict) -> Iterator[dict]:
    """Ray Data: decode tasks on CPUs feed a pool of model actors; rows stream back to the driver."""
    from paradiffusion.raycluster import init_ray

    where = init_ray(cfg.ray, extra="captioning")  # says what to install when Ray is missing
    import ray

    if where == "already initialised":
        where = f"Ray at {ray.get_runtime_context().gcs_address} ({len(ray.nodes())} node(s))"
    info["ran_on"] = where

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the stage shows one bar, in captions
    r = c.resources
    actors, num_gpus = actor_pool_size(float(ray.cluster_resources().get("GPU", 0)), c)
    log.info(
        "%s: %d model actor(s), %g GPU and %g CPU each, batch %d",
        where,
        actors,
        num_gpus,
        r.cpus_per_actor,
        c.effective_batch_size,
    )
    spec = worker_spec(c, actors)
    ds = ray.data.from_items([ch.to_dict() for ch in chunks], override_num_blocks=max(1, len(chunks)))
    decode_compute = ray.data.TaskPoolStrategy(size=r.max_decode_tasks) if r.max_decode_tasks else None
    from paradiffusion.storage import worker_storage_options

    ds = ds.flat_map(
        _decoded_rows,
        fn_kwargs={"prep": c.image, "storage": worker_storage_options()},
        num_cpus=r.decode_cpus,
        compute=decode_compute,
    )
    ds = ds.map_batches(
        CaptionWorker,
        fn_constructor_kwargs={
            "spec": spec,
            "generation": c.generation.model_dump(mode="json"),
            "prompt": c.prompt_text,
        },
        batch_size=c.effective_batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=num_gpus,
        num_cpus=r.cpus_per_actor,
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        yield from _rows({k: list(v) for k, v in batch.items()})


#: ``caption.resources.executor`` -> the function that runs the two operators.
EXECUTORS = {"local": run_local, "ray": run_ray}


# --------------------------------------------------------------------------- writer
class ChunkWriter:
    """Collects caption rows by chunk; a complete chunk becomes one committed shard."""

    def __init__(self, table: Table, chunks: list[Chunk], c: CaptionConfig, summary: StageSummary, ident: SetIdentity):
        self.table, self.c, self.summary = table, c, summary
        self.expected = {ch.name: len(ch.keys) for ch in chunks}
        self.pending: dict[str, list[dict]] = defaultdict(list)
        self.common = {
            "model_id": ident.model_id,
            "model_revision": ident.revision,
            "engine": ident.engine,
            "prompt_id": c.prompt,
            "prompt_hash": prompt_hash(c.prompt_text),
            "generation": json.dumps(c.generation.model_dump(mode="json"), sort_keys=True),
        }
        self.written = 0
        self.rows_written = 0
        self.tokens = 0

    def add(self, row: dict) -> None:
        name = str(row["chunk"])
        self.pending[name].append(row)
        if len(self.pending[name]) == self.expected[name]:
            self.flush(name)

    def flush(self, name: str) -> None:
        now = _dt.datetime.now(_dt.timezone.utc)
        out = []
        for r in self.pending.pop(name):
            reason = str(r["finish_reason"])
            text = r["caption"] if isinstance(r["caption"], str) else None
            flags = caption_flags(text, reason, self.c.quality)
            if reason == "error":
                self.summary.reject(error_kind(str(r["error"] or "model_error")))
                log.warning("no caption for %s: %s", r["key"], r["error"])
            else:
                self.summary.n_out += 1
                self.tokens += int(r["n_tokens"])
            for f in flags:
                if f != "error":
                    self.summary.flag(f)
            out.append(
                {
                    "key": str(r["key"]),
                    "caption": text,
                    "n_words": len(words(text)) if text is not None else None,
                    "n_tokens": int(r["n_tokens"]),
                    "finish_reason": reason,
                    "seconds": float(r["seconds"]),
                    "created_at": now,
                    "flags": flags,
                    "error": r["error"] if reason == "error" else None,
                    **self.common,
                }
            )
        self.table.write_shard(
            name, rows_to_table(out, CAPTIONS), meta={"model_id": self.common["model_id"], "prompt_id": self.c.prompt}
        )
        self.written += 1
        self.rows_written += len(out)

    def unfinished(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.pending.items()}


# --------------------------------------------------------------------------- the stage
@dataclass(frozen=True)
class SetIdentity:
    """Who made the captions: the model id and revision the rows record (and the engine of a served model)."""

    model_id: str
    revision: str | None
    engine: str | None = None
    tag: str = ""  # what shard names start with (the model id; a served model's ends with its engine)

    @property
    def shard_tag(self) -> str:
        return self.tag or self.model_id


def set_identity(name: str, c: CaptionConfig) -> SetIdentity:
    """The configured model; for ``type: openai``, what the endpoints report (checked before any work)."""
    spec = c.spec
    if spec.type != "openai":
        return SetIdentity(spec.model, spec.revision)
    from captioning.openai_client import EndpointError, probe_endpoints

    try:
        served = probe_endpoints(spec, f"caption.captioners.{name}")
    except EndpointError as exc:
        raise ConfigError(str(exc)) from None
    log.info("endpoints serve %s @ %s (%s)", served.model_id, served.revision or "-", served.engine)
    # shard names keep the end of a long id: the engine goes last so a served set never shares a native set's prefix
    tag = f"{served.model_id.split(':', 1)[1]}-{served.model_id.split(':', 1)[0]}"
    return SetIdentity(served.model_id, served.revision, served.engine, tag)


def _stopped_reason(exc: BaseException) -> str | None:
    """The message of an :class:`EndpointsFailing` raised by a worker (maybe wrapped by Ray), else None."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__name__ == "EndpointsFailing":
            return str(e)
        for line in str(e).splitlines():
            if "EndpointsFailing: " in line:
                return line.split("EndpointsFailing: ", 1)[1].strip()
        e = e.__cause__ or e.__context__
    return None


def _plan(
    c: CaptionConfig,
    ident: SetIdentity,
    images_url: str,
    scores_url: str,
    done: set[str],
    recaption: bool,
    limit: int | None,
    summary: StageSummary,
) -> list[Chunk]:
    from paradiffusion.images import image_shards, kept_keys, key_row_groups

    kept = kept_keys(scores_url)
    if kept.num_rows == 0:
        log.warning("no kept images in %s (run `make filter` first)", scores_url)
        return []
    shard_urls = dict(image_shards(images_url))
    rows = zip(
        kept["key"].to_pylist(),
        kept["shard"].to_pylist(),
        kept["width"].to_pylist(),
        kept["height"].to_pylist(),
        strict=True,
    )
    by_shard: dict[str, list] = defaultdict(list)
    missing = Counter()
    n_pending = 0
    for key, shard, w, h in rows:
        summary.n_in += 1
        if key in done and not recaption:
            summary.skipped_done += 1
            continue
        if shard not in shard_urls:
            missing[shard] += 1
            continue
        if limit is not None and n_pending >= limit:
            continue
        by_shard[shard].append((key, w, h))
        n_pending += 1
    if missing:
        summary.reject("missing_image_shard", sum(missing.values()))
        log.warning(
            "%d kept key(s) point at image shards that are not in %s: %s",
            sum(missing.values()),
            images_url,
            ", ".join(sorted(missing)[:5]),
        )
    if limit is not None:
        summary.extra["limit"] = limit
    row_group_of = {}
    for shard in by_shard:
        try:
            row_group_of[shard] = key_row_groups(shard_urls[shard])
        except Exception as exc:  # noqa: BLE001 - the decode step reports the unreadable shard per key
            log.warning("cannot index %s (%s); its chunks will read the whole shard", shard_urls[shard], exc)
    tag = caption_tag(ident.shard_tag, ident.revision, c.prompt, prompt_hash(c.prompt_text))
    return plan_chunks(tag, by_shard, shard_urls, c.image, c.chunk_rows, row_group_of)


def run_caption(cfg: RootConfig, recaption: bool = False, limit: int | None = None) -> StageSummary:
    """Caption the kept set with ``cfg.caption``'s captioner and prompt; returns the summary."""
    c: CaptionConfig | None = getattr(cfg, "caption", None)
    if c is None:
        raise ConfigError("pipelines.yaml has no caption: section")
    root = cfg.project.data_root
    images_url = c.images or join(root, "images")
    scores_url = c.scores or join(root, "scores")
    out_url = c.output or join(root, "captions")
    from captioning.captioners import pin_to_resolved

    c = pin_to_resolved(c)  # the commits the models resolved to: in every row, shard name and actor
    spec = c.spec
    phash = prompt_hash(c.prompt_text)
    summary = StageSummary("caption")
    announce(
        "caption",
        {
            "kept set": f"{scores_url} (images: {images_url})",
            "output": out_url,
            "captioner": f"{c.captioner}: {spec.type} {spec.model} @ {spec.revision or 'unpinned'}"
            + (f", {spec.quantization}" if spec.quantization != "none" else ""),
            "prompt": f"{c.prompt} ({phash[:8]}): {c.prompt_text[:70]}{'...' if len(c.prompt_text) > 70 else ''}",
            "generation": json.dumps(c.generation.model_dump(mode="json")),
            "batching": f"batch {c.effective_batch_size}, {c.chunk_rows} captions a shard, resize {c.image.resize}",
            "executor": c.resources.executor,
            "mode": "recaption (redo keys already captioned)" if recaption else "skip keys already captioned",
        },
    )
    from captioning.captioners import check_pinned, is_local

    try:
        check_pinned(spec)
    except ValueError as exc:
        raise ConfigError(f"caption.captioners.{c.captioner}: {exc}") from None
    if spec.type == "cogvlm" and is_local(spec.model):
        # a broken checkpoint folder stops here, named, before any actor loads it (a Hub id is checked
        # by each actor after its download)
        from pathlib import Path

        from captioning.cogvlm.loading import CheckpointError, check_checkpoint, read_config

        folder = Path(spec.model).expanduser()
        try:
            check_checkpoint(folder, read_config(folder))
        except CheckpointError as exc:
            raise ConfigError(f"caption.captioners.{c.captioner}.model: {exc}") from None
    ident = set_identity(c.captioner, c)  # an unreachable endpoint or another model stops here, before any work
    table = Table(out_url, CAPTIONS)
    table.clean_tmp()  # logs its own one line with the count
    prefix = tag_prefix(ident.shard_tag, ident.revision, phash)
    dedupe(table, prefix)
    done = done_keys(read_state(table, prefix), ident.model_id, ident.revision, phash)
    chunks = _plan(c, ident, images_url, scores_url, done, recaption, limit, summary)
    n_todo = sum(len(ch.keys) for ch in chunks)
    # No stage fingerprint: several models, prompts and settings legitimately share this table.
    table.save_config(cfg, "caption")
    log.info(
        "%d kept, %d already captioned, %d to caption in %d chunk(s)",
        summary.n_in,
        summary.skipped_done,
        n_todo,
        len(chunks),
    )
    writer = ChunkWriter(table, chunks, c, summary, ident)
    info: dict = {}
    stopped = None
    t0 = time.perf_counter()
    if chunks:
        rows = EXECUTORS[c.resources.executor](chunks, c, cfg, info)
        try:
            for row in progress(rows, total=n_todo, desc="caption", unit="img"):
                writer.add(row)
        except Exception as exc:
            stopped = _stopped_reason(exc)
            if stopped is None:
                raise
            log.error("stopped: %s", stopped)
    gen_s = time.perf_counter() - t0
    left = writer.unfinished()
    if stopped:  # the endpoints failed: what was not committed stays pending for the next run
        summary.extra["stopped"] = stopped
        summary.extra["pending"] = n_todo - writer.rows_written
    elif left:  # would be a bug: every chunk row comes back; never let it pass silently
        summary.reject("lost_in_pipeline", sum(left.values()))
        log.error("chunks with missing rows were not written: %s", left)
    dedupe(table, prefix)  # a retried error or a recaption replaces the older row of its key
    summary.extra.update(
        {
            "captioner": f"{ident.model_id}@{ident.revision or '-'}" + (f" ({ident.engine})" if ident.engine else ""),
            "prompt": c.prompt,
            "captioned": summary.n_out,
            "shards_written": writer.written,
            "ran_on": info.get("ran_on", "nothing to do"),
            "captions_per_s": round(summary.n_out / gen_s, 3) if summary.n_out and gen_s > 0 else 0.0,
            "new_tokens_per_s": round(writer.tokens / gen_s, 1) if writer.tokens and gen_s > 0 else 0.0,
        }
    )
    summary.finish()
    table.save_json("_summary.json", summary.to_dict())
    summary.print()
    return summary
