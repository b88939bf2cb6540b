"""`paradiffusion publish`: write the dataset folder (and upload it to the Hub when asked).

Folder (``publish.output``, default ``<data_root>/paraimage``; any fsspec URL)::

    README.md                     the dataset card: Hub YAML (configs list this version's files) + text
    croissant.json                Croissant 1.0 metadata (files with sha256, record sets, fields)
    data/<subset>/train-<input shard>-<chunk>-<digest>.parquet
    webdataset/<subset>/<input shard>-<chunk>-<digest>.tar  (publish.webdataset) + webdataset/index.json
    assets/<plot>-<digest>.png    Table 1's length histogram and the funnel
    _publish/<version>.json       manifest of one version (every file it uses); published.json

Shard names carry a digest of their rows instead of the Hub's ``-of-MMMMM`` count, so a shard whose
rows did not change keeps its name and is not rewritten when the number of shards changes.

Versions: a run writes its new shards beside the old ones, then its manifest, then the pointer
files (croissant.json, webdataset/index.json and, last, README.md: the one ``load_dataset``
reads), each in one atomic write; only then are files no kept version uses removed. A run killed
at any point leaves every pointer naming files that exist: the previous version stays complete.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from paradiffusion.config import ConfigError, RootConfig, config_fingerprint
from paradiffusion.log import get_logger
from paradiffusion.stage import StageSummary, announce, progress
from paradiffusion.storage import duckdb_connect, join
from publish import card as _card
from publish import rows as _rows

log = get_logger("publish")

_VERSION_RE = re.compile(r"<!-- paradiffusion-publish-version: (\S+) -->")


def output_url(cfg: RootConfig) -> str:
    return cfg.publish.output or join(cfg.project.data_root, "paraimage")


class Folder:
    """The output folder: atomic writes (temp + rename locally; one PUT on object stores)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.url)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def p(self, rel: str) -> str:
        return join(self.path, rel)

    def put(self, rel: str, data: bytes) -> None:
        final = self.p(rel)
        if not self.local:
            self.fs.pipe_file(final, data)  # an object appears whole or not at all
            return
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, final)

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.p(rel))

    def read_text(self, rel: str) -> str | None:
        return self.fs.cat_file(self.p(rel)).decode() if self.exists(rel) else None

    def listing(self) -> list[str]:
        if not self.fs.exists(self.path):
            return []
        base = self.path.rstrip("/") + "/"
        return sorted(f[len(base) :] for f in self.fs.find(self.path) if f.startswith(base))


def current_version(folder: Folder) -> str | None:
    text = folder.read_text("README.md")
    m = _VERSION_RE.search(text or "")
    return m.group(1) if m else None


def manifest(folder: Folder, version: str | None) -> dict:
    if version is None:
        return {"files": {}}
    text = folder.read_text(f"_publish/{version}.json")
    return json.loads(text) if text else {"files": {}}


@dataclass
class Written:
    path: str
    rows: int
    bytes: int
    sha256: str
    reused: bool


def _hf_schema(t: pa.Table, with_image: bool) -> pa.Schema:
    """The table's schema with the ``datasets`` features in its metadata (``image``: the Image feature)."""
    return _hf_schema_of(t.schema, with_image)


@functools.lru_cache(maxsize=8)
def _hf_schema_of(schema: pa.Schema, with_image: bool) -> pa.Schema:
    """Computed once per schema: every chunk of a subset has the same one."""
    from datasets import Features, Image

    feats = Features.from_arrow_schema(schema.remove(schema.get_field_index("image")) if with_image else schema)
    if with_image:
        feats["image"] = Image()
    return feats.arrow_schema


def _import_features() -> None:
    import datasets.features  # noqa: F401 - imported ahead by a writer thread (see publish_subset)


def _attach_images(t: pa.Table, index: _rows.ImageIndex, rejected: Counter) -> tuple[pa.Table, dict]:
    got = index.fetch(t["key"].to_pylist())
    keep, images, exts = [], [], {}
    for i, k in enumerate(t["key"].to_pylist()):
        data, ext = got.get(k, (None, ""))
        if not _rows.decodes(data):
            rejected["image_missing" if data is None else "image_decode_failed"] += 1
            continue
        keep.append(i)
        images.append({"bytes": data, "path": f"{k}.{ext}"})
        exts[k] = (data, ext)
    t = t.take(pa.array(keep, pa.int64()))
    col = pa.array(images, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    return t.append_column("image", col), exts


def _rechunked(t: pa.Table, rows: int = 8192) -> pa.Table:
    """The rows in chunks of ``rows``: Parquet's bytes depend on how the rows are chunked, and a shard is
    named by the digest of its bytes, so equal rows must give equal bytes however they were read."""
    batches = [b for i in range(0, t.num_rows, rows) for b in t.slice(i, rows).combine_chunks().to_batches()]
    return pa.Table.from_batches(batches, schema=t.schema)


def _wds_tar(t: pa.Table, subset: str, images: dict) -> bytes:
    import webdataset as wds

    buf = io.BytesIO()
    text_col = "caption" if subset == "big" else "description"
    meta_cols = [c for c in t.column_names if c != "image"]
    with wds.TarWriter(buf) as w:
        for row in t.select(meta_cols).to_pylist():
            sample = {"__key__": row["key"], "txt": row[text_col] or "", "json": json.dumps(row, default=str)}
            if row["key"] in images:
                data, ext = images[row["key"]]
                sample["jpg" if ext in ("jpg", "jpeg") else ext] = data
            w.write(sample)
    return buf.getvalue()


def _pseudonymise(t: pa.Table, pseudo) -> pa.Table:
    for c in ("annotator", "reviewer"):
        if c in t.column_names:
            i = t.column_names.index(c)
            t = t.set_column(i, c, pa.array([pseudo(v) for v in t[c].to_pylist()], pa.string()))
    return t


#: Threads that encode and write shards, and chunks waiting for them (each at most ``publish.shard_rows`` rows).
_WRITERS = 2
_AHEAD = 2


def _write_chunk(cfg, folder, plan, old_files, index, pseudo, chunk_id, t):
    """One chunk to its Parquet shard (and tar): ``(parquet Written, tar Written or None, schema, rows in,
    rejected by reason)``; run by a writer thread (the caller adds the counts to the summary)."""
    pc = cfg.publish
    n_in, rejected = t.num_rows, Counter()
    if pseudo is not None:
        t = _pseudonymise(t, pseudo)
    images: dict = {}
    if index is not None:
        t, images = _attach_images(t, index, rejected)
    t = t.cast(_hf_schema(t, index is not None))
    buf = io.BytesIO()
    pq.write_table(_rechunked(t), buf, compression="zstd")
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    d = sha[:16]  # Parquet bytes are a function of the rows (no timestamps): equal rows, equal name
    rel = f"data/{plan.subset}/train-{chunk_id}-{d}.parquet"
    if rel in old_files and folder.exists(rel):
        written = Written(rel, t.num_rows, len(data), sha, True)
    else:
        folder.put(rel, data)
        written = Written(rel, t.num_rows, len(data), sha, False)
    tar = None
    if pc.webdataset:
        trel = f"webdataset/{plan.subset}/{chunk_id}-{d}.tar"
        if trel in old_files and folder.exists(trel):
            o = old_files[trel]
            tar = Written(trel, o["rows"], o["bytes"], o["sha256"], True)
        else:
            data = _wds_tar(t, plan.subset, images)
            folder.put(trel, data)
            tar = Written(trel, t.num_rows, len(data), hashlib.sha256(data).hexdigest(), False)
    return written, tar, t.schema, n_in, rejected


def publish_subset(
    cfg, con, folder, plan, old_files, summary, index, pseudo
) -> tuple[list[Written], list[Written], pa.Schema | None]:
    """Write the subset's shards. Writer threads encode and write the chunks while this thread computes
    the next ones: DuckDB's queries and Arrow's Parquet encoder both release the GIL, and the encoder is
    single-threaded per file, so the work spreads over the cores. At most :data:`_AHEAD` chunks wait for
    the writers, so memory stays bounded by a few chunks; shards are collected in order."""
    import threading
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    parquet, tars, schema = [], [], None
    pending: deque = deque()
    failed = threading.Event()

    def write(*args):
        if failed.is_set():  # an earlier chunk's write failed: this one is not written
            return None
        try:
            return _write_chunk(*args)
        except BaseException:
            failed.set()
            raise

    def collect() -> None:
        nonlocal schema
        written, tar, schema, n_in, rejected = pending.popleft().result()
        parquet.append(written)
        if tar is not None:
            tars.append(tar)
        summary.n_in += n_in
        summary.n_out += written.rows
        for reason, n in rejected.items():
            summary.reject(reason, n)

    pool = ThreadPoolExecutor(_WRITERS, thread_name_prefix="publish-write")
    try:
        pool.submit(_import_features)  # ~1.7 s of imports, done while this thread routes the tables
        chunks = plan.chunks(con, cfg.publish.shard_rows)
        for chunk_id, t in progress(chunks, desc=f"publish {plan.subset}", unit="shard"):
            pending.append(pool.submit(write, cfg, folder, plan, old_files, index, pseudo, chunk_id, t))
            del t
            while len(pending) > _WRITERS + _AHEAD or (pending and pending[0].done()):
                collect()
        while pending:
            collect()
    finally:
        # on an error (a failed write, a kill) the chunks still waiting are not written
        pool.shutdown(wait=True, cancel_futures=True)
    return parquet, tars, schema


def _provenance(cfg, con) -> tuple[list[dict], dict, dict]:
    from paradiffusion.schemas import CAPTIONS, SCORES

    sets, reasons, thresholds = [], {}, {}
    try:
        cap = _rows.committed(cfg, "captions", CAPTIONS)
        for r in con.execute(
            f"SELECT model_id, model_revision, prompt_id, prompt_hash, count(*), min(created_at), max(created_at) "
            f"FROM {cap.sql_source()} WHERE finish_reason IS DISTINCT FROM 'error' GROUP BY ALL ORDER BY ALL"
        ).fetchall():
            sets.append(
                dict(zip(["model_id", "model_revision", "prompt_id", "prompt_hash", "rows"], r[:5], strict=True))
                | {"first": str(r[5])[:10], "last": str(r[6])[:10]}
            )
    except _rows.MissingTable:
        pass
    try:
        sc = _rows.committed(cfg, "scores", SCORES)
        for reason, n in con.execute(
            f"SELECT reject_reason, count(*) FROM {sc.sql_source()} WHERE NOT kept GROUP BY 1 ORDER BY 2 DESC"
        ).fetchall():
            reasons[reason or "unknown"] = n
        import yaml

        raw = sc.fs.cat_file(sc._p("_config.yaml")) if sc.fs.exists(sc._p("_config.yaml")) else None
        doc = yaml.safe_load(raw) if raw else {}
        thresholds = ((doc or {}).get("stage_settings") or {}).get("thresholds") or {}
    except _rows.MissingTable:
        pass
    return sets, reasons, thresholds


def _stats(cfg, folder: Folder) -> tuple[str, list[str]]:
    """Table 1, the length histogram and the funnel: the stats stage's own queries and plots."""
    import tempfile
    from pathlib import Path

    try:
        from stats.queries import bucket_labels, canned_queries
        from stats.run import connect, plot_funnel, plot_histogram, render_markdown, run_query
        from stats.views import find_sources

        sources = find_sources(cfg)
        views = _stats_views(cfg, sources)
        names = {n for n, _ in views}
        con = connect(views)
        md, assets = [], []
        qs = {q.name: q for q in canned_queries(cfg.stats.length_buckets, cfg.stats.keywords, names)}
        with tempfile.TemporaryDirectory() as tmp:
            from stats.run import configure

            # the stats stage's queries under its own bound (stats.memory_limit, stats.threads), spilling in a
            # scratch folder: publish's 256 MB for its rows is too little for them over every row (at 4 M
            # caption rows the histogram ran out of memory under it and the card lost its statistics)
            configure(con, cfg.stats, tmp)
            for name in ("table1", "length_histogram", "funnel"):
                q = qs.get(name)
                if q is None or not q.sql or not set(q.needs) <= names:
                    continue
                res = run_query(con, q)
                md.append(render_markdown(res))
                png = Path(tmp) / f"{name}.png"
                try:
                    if name == "length_histogram" and res.rows:
                        plot_histogram(res, bucket_labels(cfg.stats.length_buckets), png)
                    elif name == "funnel" and res.rows:
                        plot_funnel(res, png)
                except ImportError:
                    continue
                if png.exists():
                    data = png.read_bytes()
                    rel = f"assets/{name}-{hashlib.sha256(data).hexdigest()[:12]}.png"
                    folder.put(rel, data)
                    assets.append(rel)
        con.close()
        return "\n".join(md), assets
    except Exception as exc:  # noqa: BLE001 - the card says the statistics are missing, the data still publishes
        log.warning("statistics for the card failed: %s", exc)
        return "", []


def _stats_views(cfg, sources) -> list[tuple[str, str]]:
    """The stats stage's views for the card's queries: over its per-shard partial aggregates where
    ``make stats`` has made them (only shards committed since are read), else over the tables' rows.
    Publish does not start that cache itself: it reads more per shard than these three queries need
    (words, keywords, key hashes of every table: 124 s against 28 s for the plain queries at 1 M
    caption rows on the loaded 2-core CPU)."""
    from pathlib import Path

    from stats import derived as _derived
    from stats.run import cached_views, stats_dir
    from stats.views import build_views

    out = stats_dir(cfg)
    if not cfg.stats.derived or "://" in out or not _derived.cache_dir(out).exists():  # a local folder only
        return build_views(cfg, sources, {})
    return cached_views(cfg, sources, Path(out))[0]


def _license(cfg, plans) -> tuple[str, str]:
    lic_cols = sorted({c for p in plans for c in p.license_columns})
    if cfg.publish.license:
        note = "Set by the publisher (`publish.license`)."
    else:
        note = "**unknown**: the publisher set no licence (`publish.license`) and it is not guessed."
    if lic_cols:
        note += f" Per-image licence / rights as given by the input: column(s) {', '.join(f'`{c}`' for c in lic_cols)}."
    else:
        note += (
            " The input had no licence or rights column: each image's licence is **unknown**; the images "
            "remain their owners' and only the URLs and the text written for this dataset are shared."
        )
    return cfg.publish.license or "unknown", note


def run_publish(cfg: RootConfig) -> dict:
    """Write the dataset folder; returns the summary document."""
    pc = cfg.publish
    folder = Folder(output_url(cfg))
    data_root = cfg.project.data_root.rstrip("/")
    if (
        folder.url == data_root
        or folder.url.startswith(data_root + "/")
        and folder.url[len(data_root) + 1 :]
        in ("scores", "captions", "images", "small_train", "annotations", "candidates")
    ):
        raise ConfigError(f"publish.output = {folder.url}: must not be one of the stage tables")
    if pc.repo_id:
        check_upload(folder)  # before any work, not after the folder is written
    announce(
        "publish",
        {
            "data": data_root,
            "subsets": ", ".join(pc.subsets),
            "output": folder.url,
            "images": pc.include_images,
            "webdataset": pc.webdataset,
        },
    )
    summary = StageSummary("publish")
    before = current_version(folder)
    old = manifest(folder, before)
    version = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    con = duckdb_connect()
    plans = []
    for s in pc.subsets:
        try:
            plans.append(_rows.big_plan(cfg, con) if s == "big" else _rows.small_plan(cfg, con))
        except _rows.MissingTable as exc:
            raise ConfigError(str(exc)) from None
    index = _rows.ImageIndex(join(data_root, "images")) if pc.include_images else None
    pseudo = _rows.pseudonymizer(cfg) if "small" in pc.subsets else None
    subsets: dict[str, _card.SubsetFacts] = {}
    files: dict[str, dict] = {}
    # the card's statistics (the stats stage's queries over the tables, on a connection of their own)
    # run beside the rows: they read the same committed tables and write only their plots
    from concurrent.futures import ThreadPoolExecutor

    stats_pool = ThreadPoolExecutor(1, thread_name_prefix="publish-stats")
    stats_job = stats_pool.submit(_stats, cfg, folder)
    stats_pool.shutdown(wait=False)
    for plan in plans:
        parquet, tars, schema = publish_subset(cfg, con, folder, plan, old["files"], summary, index, pseudo)
        for w in parquet + tars:
            files[w.path] = {"rows": w.rows, "bytes": w.bytes, "sha256": w.sha256}
        subsets[plan.subset] = _card.SubsetFacts(
            plan.subset, sum(w.rows for w in parquet), [vars(w) for w in parquet], schema, [vars(w) for w in tars]
        )
    big = [p for p in plans if p.subset == "big"]
    counts = _rows.big_counts(cfg, con, big[0]) if big else {}
    if counts.get("no_caption"):
        summary.reject("no_caption", counts["no_caption"])
    written = sum(1 for s in subsets.values() for w in s.files + s.wds_files if not w["reused"])
    reused = sum(1 for s in subsets.values() for w in s.files + s.wds_files if w["reused"])
    sets, reasons, thresholds = _provenance(cfg, con)
    con.close()
    stats_md, assets = stats_job.result()
    lic, note = _license(cfg, plans)
    counts.update(
        {
            "reject_reasons": reasons,
            "images_skipped": sum(summary.rejected.get(r, 0) for r in ("image_missing", "image_decode_failed")),
            "has_nsfw": any(c in p.extra_columns for p in plans for c in ("nsfw", "punsafe", "nsfw_score")),
            "has_watermark": any("watermark" in c for p in plans for c in p.extra_columns),
        }
    )
    from paradiffusion import __version__

    facts = _card.Facts(
        pretty_name=pc.pretty_name,
        license=lic,
        license_note=note,
        language=pc.language,
        version=version,
        written_at=_card.now(),
        toolkit_version=__version__,
        config_fingerprint=config_fingerprint(pc),
        subsets=subsets,
        counts=counts,
        caption_sets=sets,
        prompts=dict(cfg.caption.prompts),
        thresholds=thresholds,
        stats_markdown=stats_md,
        assets=assets,
        url=f"https://huggingface.co/datasets/{pc.repo_id}" if pc.repo_id else "",
    )
    for a in assets:
        files[a] = {}
    # the version's manifest, then the pointers; README.md (what load_dataset reads) last
    files.update({"croissant.json": {}, "README.md": {}})
    if pc.webdataset:
        files["webdataset/index.json"] = {}
    folder.put(
        f"_publish/{version}.json",
        json.dumps({"version": version, "previous": before, "files": files}, indent=1).encode(),
    )
    folder.put("croissant.json", json.dumps(_card.croissant(facts), indent=1).encode())
    if pc.webdataset:
        idx = {
            n: [{"url": w["path"], "rows": w["rows"], "sha256": w["sha256"]} for w in s.wds_files]
            for n, s in subsets.items()
        }
        folder.put("webdataset/index.json", json.dumps({"version": version, "subsets": idx}, indent=1).encode())
    folder.put("README.md", _card_text(facts).encode())
    published = json.loads(folder.read_text("_publish/published.json") or "[]")
    published = [v for v in published if v != version] + [version]
    folder.put("_publish/published.json", json.dumps(published).encode())
    removed = _remove_unused(folder, [version, before] + published[-(pc.keep_versions - 1) :])
    summary.extra.update(
        {
            "version": version,
            "previous": before,
            "shards_written": written,
            "shards_unchanged": reused,
            "files_removed": removed,
            **{f"rows_{n}": s.rows for n, s in subsets.items()},
        }
    )
    summary.finish()
    folder.put("_publish/_summary.json", json.dumps(summary.to_dict(), indent=1, default=str).encode())
    summary.print()
    if pc.repo_id:
        upload(folder, pc.repo_id, pc.private)
    return summary.to_dict()


def _card_text(facts) -> str:
    return _card.card_markdown(facts)


def _remove_unused(folder: Folder, keep_versions: list[str | None]) -> int:
    """Remove data, tars and plots that none of ``keep_versions`` uses (after the switch only)."""
    keep = set()
    for v in {v for v in keep_versions if v}:
        keep |= set(manifest(folder, v)["files"])
    n = 0
    for rel in folder.listing():
        if rel.split("/", 1)[0] in ("data", "webdataset", "assets") and rel not in keep and ".tmp-" not in rel:
            folder.fs.rm(folder.p(rel))
            n += 1
        elif ".tmp-" in rel:  # a write a killed run left
            folder.fs.rm(folder.p(rel))
            n += 1
    return n


def check_upload(folder: Folder) -> None:
    """What ``publish.repo_id`` needs, checked before any work: a local folder and a Hub token."""
    if not folder.local:
        raise ConfigError(f"publish.repo_id: the upload needs a local folder; publish.output is {folder.url}")
    if not (os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")):
        from huggingface_hub import get_token

        if not get_token():
            raise ConfigError(
                "publish.repo_id is set but no Hub token: set HF_TOKEN in the environment (or `hf auth login`)"
            )


def upload(folder: Folder, repo_id: str, private: bool) -> None:
    """``huggingface_hub``'s ``upload_folder`` of a local folder (huggingface_hub 2.x has no
    ``upload_large_folder``: with hf_xet installed, ``upload_folder`` is its resumable upload in
    several commits). The token is read by huggingface_hub from the environment (``HF_TOKEN``) or
    its login only, never from the config."""
    check_upload(folder)
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_folder(
        repo_id=repo_id,
        folder_path=folder.path,
        repo_type="dataset",
        ignore_patterns=["_publish/**", "**/.tmp-*", "*.tmp-*"],
    )
