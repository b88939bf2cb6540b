"""The storage contract between stages.

A *table* is a folder (local path or any fsspec URL) of Parquet shards::

    <table>/
      part-<shard>.parquet     complete shards, one row per image (or per key x ...)
      _done/<shard>.json       commit marker: row count, bytes, time, config fingerprint; written last
      _config.yaml             the resolved config of the last run, and which shards other settings made
      _configs/<fp>.yaml       the resolved config of every run, by its stage settings' fingerprint
      _summary.json            the last run's summary (counts in/out/rejected, time)
      .tmp/                    shards being written; never read

Writing a shard: the Parquet file goes to ``.tmp/`` first, is moved to its final
name when complete, and only then is the ``_done`` marker written. A reader (and a
resuming writer) trusts only shards with a marker, so a killed run never leaves a
shard that looks complete but is not, and rewriting a shard of the same name
replaces it: a rerun duplicates nothing. On object stores (S3, GCS, Azure), where a move
is a copy and a delete but one PUT is all-or-nothing, the shard is written under its final
name directly; the marker, written after it, is the commit point either way. Leftovers of
a killed run (``.tmp/`` files, shards without a marker) are ignored by readers and removed
by the next writer (:meth:`Table.clean_tmp`), on local disk and object stores alike.

One way to read a table: the committed shard list, from the markers (:meth:`Table.files`,
:meth:`Table.read`, :meth:`Table.sql_source` for DuckDB). Nothing globs ``part-*``: a glob
would also see a shard whose marker never came (or was removed).

A stage never edits another stage's files: it writes its own table, joined by ``key``.

Provenance: once :meth:`Table.save_config` has been called with the stage's settings,
every marker records their fingerprint (``config_fingerprint``) and ``_configs/<fp>.yaml``
holds them, so each shard's settings can be looked up. ``_config.yaml`` names the shards
that other settings made (``shards_with_other_settings``) instead of claiming them.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import io
import json
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel

from paradiffusion.config import (
    SECRET_OPTION_KEYS,
    ConfigError,
    StorageConfig,
    config_fingerprint,
    resolved_config_document,
    storage_url_problem,
)
from paradiffusion.log import add_secret, get_logger
from paradiffusion.storage_errors import StorageError, describe_failure  # noqa: F401 - StorageError re-exported

log = get_logger("storage")

_SHARD_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=-]*$")


# --------------------------------------------------------------------------- storage options
# fsspec's own mechanism for default storage options: ``fsspec.config.conf[protocol]`` is
# applied by every ``url_to_fs`` / ``fsspec.open`` / ``fsspec.filesystem`` in the process,
# including the calls inside img2dataset, pyarrow's fsspec wrapper and Ray Data, so the
# settings need not be threaded through every call. Child processes get them from the
# ``FSSPEC_<PROTOCOL>`` environment variable (read when fsspec is imported); Ray workers,
# which may run on other machines, get them as an argument (:func:`worker_storage_options`).
_CONFIGURED: dict[str, dict[str, Any]] = {}


def resolve_storage_options(cfg: StorageConfig | None, environ: dict[str, str] | None = None) -> dict[str, dict]:
    """fsspec storage options by protocol from the ``storage`` section, else the usual AWS variables.

    Only settings that are given (in the section or the environment) are listed, so
    botocore's own chain (instance roles, config files) still applies where none is.
    ``use_listings_cache`` is off for S3: commit markers written by other processes (Ray
    workers, other nodes, a rerun) must be seen, not an earlier listing.
    """
    cfg = cfg or StorageConfig()
    env = os.environ if environ is None else environ

    def secret(v) -> str | None:
        return v.get_secret_value() if v is not None else None

    s3: dict[str, Any] = {"use_listings_cache": False}
    endpoint = cfg.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        s3["endpoint_url"] = endpoint
    region = cfg.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        s3["client_kwargs"] = {"region_name": region}
    profile = cfg.profile or env.get("AWS_PROFILE")
    if profile:
        s3["profile"] = profile
    key = secret(cfg.key) or (None if cfg.profile else env.get("AWS_ACCESS_KEY_ID"))
    sec = secret(cfg.secret) or (None if cfg.profile else env.get("AWS_SECRET_ACCESS_KEY"))
    tok = secret(cfg.token) or (None if cfg.profile else env.get("AWS_SESSION_TOKEN"))
    if key and sec:
        s3["key"], s3["secret"] = key, sec
        if tok:
            s3["token"] = tok
    out: dict[str, dict[str, Any]] = {"s3": s3}
    for proto, opts in cfg.options.items():
        base = out.setdefault(proto, {})
        for k, v in opts.items():
            if isinstance(v, dict) and isinstance(base.get(k), dict):
                base[k] = {**base[k], **v}
            else:
                base[k] = v
    return out


def _register_secrets(opts: dict[str, Any]) -> None:
    for k, v in opts.items():
        if isinstance(v, dict):
            _register_secrets(v)
        elif k in SECRET_OPTION_KEYS and isinstance(v, str):
            add_secret(v)


def apply_storage_options(options: dict[str, dict[str, Any]]) -> None:
    """Make ``options`` (protocol -> fsspec storage options) this process's defaults.

    Also exported as ``FSSPEC_<PROTOCOL>`` so processes started from here (DataLoader
    workers, img2dataset's, DeepSpeed ranks) use them, and their credentials are
    registered with :func:`paradiffusion.log.redact`. A Ray task or actor calls it with
    what :func:`worker_storage_options` gave the driver.
    """
    for proto, opts in options.items():
        _register_secrets(opts)
        previous = _CONFIGURED.get(proto, {})
        conf = fsspec.config.conf.setdefault(proto, {})
        for k in previous:  # drop what an earlier call set, keep what the user's fsspec config has
            conf.pop(k, None)
        conf.update(copy.deepcopy(opts))
        _CONFIGURED[proto] = copy.deepcopy(opts)
        os.environ[f"FSSPEC_{proto.upper()}"] = json.dumps(opts)
    for secret_env in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        add_secret(os.environ.get(secret_env))


def configure_storage(cfg: StorageConfig | None) -> dict[str, dict[str, Any]]:
    """Resolve the ``storage`` section (and the AWS variables) and apply it to this process; returns the options."""
    options = resolve_storage_options(cfg)
    apply_storage_options(options)
    return options


def worker_storage_options() -> dict[str, dict[str, Any]]:
    """The options this process applied, to hand to a Ray task or actor (which calls
    :func:`apply_storage_options` with them): workers on other nodes do not share the
    driver's environment. Holds credentials: pass it as an argument, never log it."""
    return copy.deepcopy(_CONFIGURED)


def duckdb_connect(database: str = ":memory:"):
    """A DuckDB connection that reads and writes URLs the way the rest of the run does.

    The fsspec filesystem of each configured protocol (``s3`` always, others named in
    ``storage.options``) is registered with the connection, so ``read_parquet('s3://...')``
    and ``COPY ... TO 's3://...'`` go through s3fs with this run's endpoint and credentials.
    Hand-wired rather than DuckDB's own ``httpfs`` extension: that one is downloaded at first
    use (not possible offline) and reads only AWS-style settings of its own.
    """
    import duckdb

    con = duckdb.connect(database)
    for proto in sorted(_CONFIGURED):
        if proto in ("file", "local", "memory"):
            continue
        try:
            con.register_filesystem(fsspec.filesystem(proto))
        except ImportError:  # a protocol in storage.options whose package is not installed
            log.warning(
                "storage.options names %r but its fsspec package is not installed: DuckDB cannot read it", proto
            )
    return con


def storage_filesystem(url: str) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem (with this process's storage options) for a URL or local path."""
    return fsspec.core.url_to_fs(url)[0]


def is_url(path: str) -> bool:
    """Whether ``path`` names a remote store (``s3://``, ``gs://``, ...) rather than this machine's files."""
    return "://" in str(path) and not str(path).startswith("file://")


def upload_folder(local: str | os.PathLike, url: str, last: str | None = None, skip: tuple[str, ...] = ()) -> int:
    """Copy a local folder to ``url`` (object storage), ``last`` (a marker, relative path) after every
    other file, so a reader that trusts the marker never sees a half-copied folder. Top-level
    entries named in ``skip`` are left out. Returns the number of files copied."""
    import pathlib

    src = pathlib.Path(local)
    fs, root = fsspec.core.url_to_fs(url)
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.relative_to(src).parts[0] not in skip)
    marker = src / last if last else None
    n = 0
    for p in files:
        if p != marker:
            fs.put_file(str(p), join(root, p.relative_to(src).as_posix()))
            n += 1
    if marker is not None and marker.is_file():
        fs.put_file(str(marker), join(root, last))
        n += 1
    return n


def download_folder(url: str, local: str | os.PathLike, marker: str) -> bool:
    """Copy a committed folder (one that holds ``marker``) from ``url`` to ``local``, replacing it
    atomically (a temp folder renamed). Returns False when there is no committed folder at ``url``."""
    import pathlib
    import shutil

    fs, root = fsspec.core.url_to_fs(url)
    if not fs.exists(join(root, marker)):
        return False
    dest = pathlib.Path(local)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    for f in fs.find(root):
        rel = f[len(root.rstrip("/")) + 1 :]
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(f, str(target))
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)
    return True


#: fsspec protocols of object stores: a PUT is atomic, there is no rename (a move is copy + delete)
OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"}


def join(root: str, *parts: str) -> str:
    """Join path parts for local paths and URLs alike."""
    out = root.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


class Table:
    """One stage's output table: a folder of Parquet shards with commit markers."""

    def __init__(self, url: str, schema: pa.Schema | None = None):
        problem = storage_url_problem(str(url))
        if problem:  # never a local folder named "s3:" or a protocol fsspec reads another way
            raise ConfigError(f"table location {problem}")
        self.url = str(url).rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.url)
        self.schema = schema
        self.config_fingerprint: str | None = None  # recorded in every marker once save_config set it

    def __repr__(self) -> str:
        return f"Table({self.url!r})"

    # -- paths
    def _p(self, *parts: str) -> str:
        return join(self.path, *parts)

    def shard_file(self, shard: str) -> str:
        return self._p(f"part-{shard}.parquet")

    def marker_file(self, shard: str) -> str:
        return self._p("_done", f"{shard}.json")

    def sql_source(self, union_by_name: bool = True) -> str:
        """A DuckDB ``FROM`` source over the committed shards: ``read_parquet([<files>])``, the list
        from the markers (never a glob, which would see uncommitted shards). With no committed
        shard: an empty relation with the table's schema (or an error without one). A snapshot:
        build it again to see shards committed later. Object store URLs need a connection from
        :func:`duckdb_connect`."""
        files = self.files()
        if files:
            listed = ", ".join(_sql_literal(f) for f in files)
            return f"read_parquet([{listed}]{', union_by_name = true' if union_by_name else ''})"
        if self.schema is None:
            raise FileNotFoundError(f"{self.url}: no committed shard")
        return _empty_sql(self.schema)

    def looks_like_table(self) -> bool:
        """Whether the folder has this contract's layout (markers, a saved config or ``part-`` shards),
        even with no shard committed: such a folder is read through its markers only."""
        if not self.fs.exists(self.path):
            return False
        for f in self.fs.ls(self.path, detail=False):
            name = f.rstrip("/").rsplit("/", 1)[-1]
            if name in ("_done", "_config.yaml", "_summary.json") or _is_part_file(name):
                return True
        return False

    # -- state
    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def done_shards(self) -> set[str]:
        """Names of the shards whose commit marker exists."""
        marker_dir = self._p("_done")
        if not self.fs.exists(marker_dir):
            return set()
        names = set()
        for f in self.fs.ls(marker_dir, detail=False):
            base = f.rstrip("/").rsplit("/", 1)[-1]
            if base.endswith(".json") and not base.startswith("."):
                names.add(base[: -len(".json")])
        return names

    def is_done(self, shard: str) -> bool:
        return self.fs.exists(self.marker_file(shard))

    def marker(self, shard: str) -> dict:
        with self.fs.open(self.marker_file(shard), "r") as f:
            return json.load(f)

    def markers(self) -> dict[str, dict]:
        """Every committed shard's marker, read in one batch (``fs.cat``: concurrent on object stores)."""
        shards = sorted(self.done_shards())
        if not shards:
            return {}
        raw = self.fs.cat([self.marker_file(s) for s in shards])
        by_path = {k.rstrip("/").rsplit("/", 1)[-1][: -len(".json")]: v for k, v in raw.items()}
        return {s: json.loads(by_path[s]) for s in shards}

    def files(self) -> list[str]:
        """Complete shard files (with a marker), sorted by shard name, as full URLs."""
        proto = self.url.split("://", 1)[0] + "://" if "://" in self.url else ""
        return [proto + self.shard_file(s) if proto else self.shard_file(s) for s in sorted(self.done_shards())]

    # -- writing
    @property
    def object_store(self) -> bool:
        """Whether the table lives on an object store, where one PUT is all-or-nothing but a move is a copy."""
        protos = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        return bool(set(protos) & OBJECT_STORES)

    def _atomic_write_bytes(self, final: str, data: bytes) -> None:
        if self.object_store:
            # An object appears whole or not at all (a multipart upload only on its completion), so
            # the object is written under its final name: a temp object + copy + delete would cost
            # three more requests and be no safer. The marker, written after it, still commits it.
            self.fs.pipe_file(final, data)
            return
        tmp = self._p(".tmp", f"{uuid.uuid4().hex}-{final.rsplit('/', 1)[-1]}")
        self.fs.makedirs(self._p(".tmp"), exist_ok=True)
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
        self.fs.mv(tmp, final)

    def write_shard(
        self, shard: str, table: pa.Table, meta: dict[str, Any] | None = None, row_group_size: int | None = None
    ) -> dict:
        """Write one shard atomically and commit it; returns the marker written.

        Rewriting a shard that is already done replaces it (same name, no duplicate).
        ``row_group_size``: rows per Parquet row group (pyarrow's default when None), for
        tables whose readers fetch single rows (large binary values).
        """
        if not _SHARD_RE.match(shard):
            raise ValueError(f"shard name {shard!r} must match {_SHARD_RE.pattern}")
        if self.schema is not None:
            table = conform(table, self.schema)
        if not self.object_store:  # object stores have no folders to make
            self.fs.makedirs(self.path, exist_ok=True)
        if self.is_done(shard):  # un-commit first, so a crash mid-rewrite never reads half
            self.fs.rm(self.marker_file(shard))
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd", row_group_size=row_group_size)
        data = buf.getvalue()
        self._atomic_write_bytes(self.shard_file(shard), data)
        marker = {
            "shard": shard,
            "rows": table.num_rows,
            "bytes": len(data),
            "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **({"config_fingerprint": self.config_fingerprint} if self.config_fingerprint else {}),
            **(meta or {}),
        }
        self._atomic_write_bytes(self.marker_file(shard), json.dumps(marker, default=str).encode())
        return marker

    def clean_tmp(self, started: float | None = None) -> int:
        """Remove what unfinished writes left: files under ``.tmp/`` and shards without a marker,
        on local disk and object stores alike (where nothing goes through ``.tmp/``, so a killed
        run leaves a marker-less shard). Only files older than ``started`` (default: the run's
        start, :func:`run_started`; no cut-off outside a run) are removed, so another writer of
        the same run (a rank started a little later) keeps what it is writing. Logs one line
        with the count; returns it.

        On an object store the bucket is checked first (:func:`check_writable`): every writing
        stage calls this before it writes.
        """
        check_writable(self.url)
        cutoff = started if started is not None else run_started()
        if cutoff is not None:
            cutoff -= _CLOCK_SLACK_S
        if not self.fs.exists(self.path):
            return 0
        stale: list[str] = []
        tmp = self._p(".tmp")
        for f, info in self.fs.find(tmp, detail=True).items() if self.fs.exists(tmp) else ():
            if not f.endswith(_WRITE_CHECK) and _older(info, cutoff):
                stale.append(f)
        done = self.done_shards()
        for info in self.fs.ls(self.path, detail=True):
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            if _is_part_file(name) and name[len("part-") : -len(".parquet")] not in done and _older(info, cutoff):
                stale.append(info["name"])
        for f in stale:
            self.fs.rm(f)
        if stale:
            log.info(
                "%s: removed %d leftover file(s) of an unfinished run (uncommitted shards, .tmp/)", self.url, len(stale)
            )
        return len(stale)

    # -- reading
    def read(self, columns: list[str] | None = None, filters=None) -> pa.Table:
        """All committed shards as one Arrow table (empty table with the schema if none)."""
        files = [self.shard_file(s) for s in sorted(self.done_shards())]
        if not files:
            if self.schema is None:
                return pa.table({})
            schema = self.schema if columns is None else pa.schema([self.schema.field(c) for c in columns])
            return schema.empty_table()
        return pq.read_table(files, filesystem=self.fs, columns=columns, filters=filters)

    def iter_shards(self, columns: list[str] | None = None) -> Iterator[tuple[str, pa.Table]]:
        for s in sorted(self.done_shards()):
            yield s, pq.read_table(self.shard_file(s), filesystem=self.fs, columns=columns)

    def count_rows(self) -> int:
        return sum(int(self.marker(s)["rows"]) for s in self.done_shards())

    # -- run metadata
    def record_settings(self, section: Any) -> str:
        """Record ``section``'s fingerprint in every marker written from now on; returns it. For a
        stage that rewrites its output before :meth:`save_config` (which sets it too), so that
        the shards it just wrote are not counted as made with other settings."""
        self.config_fingerprint = config_fingerprint(section)
        return self.config_fingerprint

    def save_config(self, cfg: BaseModel | dict, stage: str, section: Any = None) -> dict:
        """Save the resolved config (the composed model, or its dict) beside the output; returns the document written.

        With ``section`` (the stage's settings that decide what its rows hold), its
        fingerprint is recorded in every marker written from now on, the document is also
        kept as ``_configs/<fingerprint>.yaml``, and committed shards whose marker carries
        another fingerprint are listed under ``shards_with_other_settings`` (with a warning
        on every run while there are any): ``_config.yaml`` never claims them. Shards
        committed before fingerprints were recorded count as made by the settings the
        previous ``_config.yaml`` named. Call it again after rewriting those shards.
        """
        doc = resolved_config_document(cfg, stage)
        cfg_file = self._p("_config.yaml")
        if section is not None:
            fp = self.record_settings(section)
            doc["stage_fingerprint"] = fp
            doc["stage_settings"] = section.model_dump(mode="json") if hasattr(section, "model_dump") else section
            other = self._shards_with_other_settings(fp, cfg_file)
            if other:
                doc["shards_with_other_settings"] = other
                log.warning(
                    "%s: %d of its shards were written with other %s settings than this run's (see "
                    "shards_with_other_settings in _config.yaml and _configs/<fingerprint>.yaml)",
                    self.url,
                    sum(other.values()),
                    stage,
                )
            self._atomic_write_bytes(self._p("_configs", f"{fp}.yaml"), yaml.safe_dump(doc, sort_keys=False).encode())
        self._atomic_write_bytes(cfg_file, yaml.safe_dump(doc, sort_keys=False).encode())
        return doc

    def _shards_with_other_settings(self, fp: str, cfg_file: str) -> dict[str, int]:
        markers = self.markers()
        if not markers:
            return {}
        before = None  # what the previous _config.yaml claimed, for markers without a fingerprint
        if any("config_fingerprint" not in m for m in markers.values()) and self.fs.exists(cfg_file):
            try:
                with self.fs.open(cfg_file, "r") as f:
                    old = yaml.safe_load(f) or {}
                before = old.get("stage_fingerprint")
            except Exception:  # noqa: BLE001 - a damaged old config: those shards count as unknown
                before = None
        counts: dict[str, int] = {}
        for m in markers.values():
            theirs = m.get("config_fingerprint", before) or "unknown"
            if theirs != fp:
                counts[theirs] = counts.get(theirs, 0) + 1
        return counts

    def write_file(self, name: str, data: bytes) -> str:
        """Write a side file (e.g. an image the rows point at) atomically under the table
        folder; ``name`` is relative (``png/model/x.png``). Returns its full path."""
        if name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"side file name {name!r} must be relative and stay inside the table folder")
        final = self._p(name)
        self._atomic_write_bytes(final, data)
        return final

    def save_json(self, name: str, doc: dict) -> None:
        self._atomic_write_bytes(self._p(name), json.dumps(doc, indent=2, default=str).encode())

    def load_json(self, name: str) -> dict | None:
        p = self._p(name)
        if not self.fs.exists(p):
            return None
        with self.fs.open(p, "r") as f:
            return json.load(f)


# --------------------------------------------------------------------------- helpers
def _is_part_file(name: str) -> bool:
    return name.startswith("part-") and name.endswith(".parquet")


def _sql_literal(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _empty_sql(schema: pa.Schema) -> str:
    """An empty DuckDB relation with ``schema``'s columns, the types as DuckDB maps the Arrow ones."""
    import duckdb

    con = duckdb.connect()
    try:
        con.register("_empty", schema.empty_table())
        cols = con.execute("DESCRIBE _empty").fetchall()
    finally:
        con.close()
    fields = ", ".join(f'NULL::{typ} AS "{name}"' for name, typ, *_ in cols)
    return f"(SELECT {fields} WHERE false)"


#: S3 and others keep modification times in whole seconds: a cut-off this much earlier never takes a fresh file
_CLOCK_SLACK_S = 2.0
_RUN_STARTED: float | None = None


def mark_run_start(when: float | None = None) -> float | None:
    """Record when this run started (the CLI does, first thing); returns the previous mark.
    :meth:`Table.clean_tmp` removes only leftovers older than it."""
    import time

    global _RUN_STARTED
    previous, _RUN_STARTED = _RUN_STARTED, (time.time() if when is None else when)
    return previous


def reset_run_start(previous: float | None) -> None:
    global _RUN_STARTED
    _RUN_STARTED = previous


def run_started() -> float | None:
    """When this run started (:func:`mark_run_start`), None outside a CLI run."""
    return _RUN_STARTED


def _older(info: dict, cutoff: float | None) -> bool:
    if cutoff is None:
        return True
    for k in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = info.get(k)
        if v is None:
            continue
        if isinstance(v, _dt.datetime):
            return v.timestamp() < cutoff
        if isinstance(v, (int, float)):
            return float(v) < cutoff
        if isinstance(v, str):
            try:
                return _dt.datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp() < cutoff
            except ValueError:
                continue
    return True  # a store that keeps no time: whatever has no marker is a leftover


_WRITE_CHECK = ".write-check"
_CHECKED: set[tuple[str, str]] = set()


def check_writable(url: str) -> None:
    """On an object store, that the bucket of ``url`` exists and takes writes: one PUT of an
    empty ``<url>/.tmp/.write-check``, deleted again (so nothing is left under ``.tmp/``), once
    per bucket and process. Buckets are never created (s3fs's ``makedirs`` would: a typo would make a new
    one). Raises :class:`StorageError` (exit code 2) with one line naming the URL and the cause.
    Local paths and ``memory://`` need no check."""
    fs, path = fsspec.core.url_to_fs(url)
    protos = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if not set(protos) & OBJECT_STORES:
        return
    bucket = path.split("/", 1)[0]
    if (protos[0], bucket) in _CHECKED:
        return
    probe = join(path, ".tmp", _WRITE_CHECK)
    try:
        fs.pipe_file(probe, b"")
    except Exception as exc:  # noqa: BLE001 - described in one line, the traceback goes to the log
        failure = describe_failure(exc, url=url, operation="write check (PUT)", at_start=True)
        if failure is None:
            raise
        raise failure from exc
    with contextlib.suppress(Exception):  # best effort: a store that takes PUTs but not DELETEs still works
        fs.rm_file(probe)
    _CHECKED.add((protos[0], bucket))


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Cast ``table`` to ``schema``: columns in schema order, missing nullable ones as nulls.

    Extra columns are an error: the schema is the contract, so a writer that wants a new
    column adds it to the schema.
    """
    extra = set(table.column_names) - set(schema.names)
    if extra:
        raise ValueError(f"columns not in the table schema: {sorted(extra)}; schema has {schema.names}")
    cols = []
    for field in schema:
        if field.name in table.column_names:
            cols.append(table[field.name].cast(field.type))
        elif field.nullable:
            cols.append(pa.nulls(table.num_rows, field.type))
        else:
            raise ValueError(f"required column {field.name!r} missing; have {table.column_names}")
    return pa.Table.from_arrays(cols, schema=schema)


def rows_to_table(rows: Iterable[dict], schema: pa.Schema) -> pa.Table:
    rows = list(rows)
    return pa.Table.from_pylist(rows, schema=schema) if rows else schema.empty_table()
