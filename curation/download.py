"""``paradiffusion download``: a URL list into the ``images`` table, with img2dataset.

The downloading itself is ``img2dataset.download`` (the library): reader, threads per
process, resizer, parquet writer, incremental resume. This module only does what
img2dataset leaves to its caller:

- resolves the input (a file, a folder or a glob; parquet, csv, tsv or jsonl) and its
  columns (``url``/``caption`` or LAION's ``URL``/``TEXT``, auto-detected), and scans
  the URL column so the run announces how many rows and how many unusable URLs it has;
- refuses to resume into a folder whose shard layout (input, shard size) differs;
- shows shard progress, then builds the :class:`~paradiffusion.stage.StageSummary`
  from img2dataset's per-shard ``<shard>_stats.json`` files: every input row is either
  a success or a failure with a short reason (``http_404``, ``timeout``,
  ``not_an_image``, ...; the raw error texts are kept in ``failure_detail``), and
  rows of shards that did not finish are counted too.

Output (``<data_root>/images`` by default; the contract :mod:`paradiffusion.images`
reads): ``<shard>.parquet`` with one row per input URL (success or failure),
``<shard>_stats.json``, plus ``_config.yaml`` and ``_summary.json``.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import fsspec
import yaml

from curation.config import URL_LIST_FORMATS, DownloadConfig
from curation.safety import REJECT_OPTED_OUT, SAFETY_REASONS, metadata_limits
from curation.safety.lists import SafetyLists, load_lists
from paradiffusion.config import ConfigError, RootConfig
from paradiffusion.log import get_logger, stage_log_path, third_party_output_to
from paradiffusion.stage import StageSummary, announce, progress
from paradiffusion.storage import Table, check_writable, join

log = get_logger("curation.download")

#: Column names tried, in order, when ``url_col`` / ``caption_col`` are null. Exact
#: names first, then the same names ignoring case.
URL_COLUMNS = ("url", "URL", "image_url", "img_url", "image", "link")
CAPTION_COLUMNS = ("caption", "TEXT", "text", "alt", "alt_text", "txt", "title")

#: img2dataset error text -> short reason, first match wins. The raw text stays in the
#: summary's ``failure_detail`` and in each row's ``error_message``.
FAILURE_REASONS: list[tuple[re.Pattern[str], str | None]] = [
    (re.compile(r"HTTP Error (\d{3})"), None),  # None: the reason is http_<code>
    (re.compile(r"timed? ?out", re.I), "timeout"),
    (re.compile(r"image decoding error", re.I), "not_an_image"),
    (re.compile(r"buf\.empty\(\)"), "empty_response"),  # OpenCV on a zero-byte body
    (re.compile(r"image too small", re.I), "too_small"),
    (re.compile(r"aspect ratio too large", re.I), "aspect_ratio"),
    (re.compile(r"image area too large", re.I), "area_too_large"),
    (re.compile(r"unknown url type|no host given|nonetype|url can't contain|invalid url", re.I), "invalid_url"),
    (re.compile(r"name or service not known|nodename nor servname|name resolution|getaddrinfo", re.I), "dns_error"),
    (re.compile(r"connection refused", re.I), "connection_refused"),
    (re.compile(r"ssl|certificate", re.I), "ssl_error"),
    (re.compile(r"connection reset|remote end closed|broken pipe|incompleteread", re.I), "connection_error"),
    (re.compile(r"x-robots-tag", re.I), REJECT_OPTED_OUT),  # the site opted out (noai, noimageai, ...)
    (re.compile(r"hash mismatch", re.I), "hash_mismatch"),
]
#: Reasons this module adds itself (not from img2dataset's status counts).
REASON_SHARD_FAILED = "shard_not_finished"  # rows of a shard without _stats.json after the run
REASON_ROW_LOST = "row_missing_in_shard"  # counted by img2dataset but absent from its parquet

# What urllib (img2dataset's HTTP client) does with a URL, after stripping whitespace:
# http(s) with a host is fetched; ftp, file and data URLs are fetched by their own
# handlers; anything else (empty, no scheme, no host, another scheme) fails at once.
_URL_HTTP = re.compile(r"^\s*https?://[^/?#]+", re.I)
_URL_OTHER_SCHEME = re.compile(r"^\s*(ftp://[^/?#]+|file:|data:)", re.I)
_GLOB_CHARS = re.compile(r"[*?\[]")


def failure_reason(message: str | None) -> str:
    """Short, stable reason for one img2dataset error message (``other`` if unknown)."""
    text = message or ""
    head = text.split(":", 1)[0]
    if head in SAFETY_REASONS:  # written by curation.safety.hooks: "<reason>: <detail>"
        return head
    for pattern, reason in FAILURE_REASONS:
        m = pattern.search(text)
        if m:
            return reason if reason is not None else f"http_{m.group(1)}"
    return "other"


def failure_line(message: str | None) -> str:
    """``reason: short detail`` on one line for an img2dataset error message (the raw text
    may be an OpenCV assertion over several lines; it stays in the images table's
    ``error_message`` and the summary's ``failure_detail``)."""
    from curation.decode import one_line

    text = one_line(message or "no message", 120)
    return f"{failure_reason(message)}: {text}"


# --------------------------------------------------------------------------- input
@dataclass
class UrlList:
    """A resolved URL list: what img2dataset reads and what the run announces."""

    url_list: str  # the file or folder passed to img2dataset
    files: list[str]  # the files img2dataset will read, in its order (full URLs)
    input_format: str
    url_col: str
    caption_col: str
    columns: list[str]
    rows_per_file: list[int] = field(default_factory=list)
    invalid_urls: int = 0  # null, empty, no scheme or no host: urllib refuses them (invalid_url failures)
    other_scheme_urls: int = 0  # ftp://, file:, data: URLs: urllib fetches them as they are

    @property
    def n_rows(self) -> int:
        return sum(self.rows_per_file)


def _with_proto(fs: Any, path: str) -> str:
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return path if proto in ("file", "local") else f"{proto}://{path}"


def _format_of(name: str) -> str | None:
    for fmt in sorted(URL_LIST_FORMATS, key=len, reverse=True):  # "csv.gz" before "csv"
        if name.endswith("." + fmt):
            return fmt
    return None


def _list_files(cfg: DownloadConfig, staging: str) -> tuple[str, list[str], str]:
    """(what to pass to img2dataset, the files it reads, the format)."""
    if not cfg.input:
        raise ConfigError(
            "download.input is not set: give the URL list, e.g. --set download.input=laion/part-00000.parquet"
        )
    fs, path = fsspec.core.url_to_fs(cfg.input)
    fmt = None if cfg.input_format == "auto" else cfg.input_format
    if _GLOB_CHARS.search(path):
        files = sorted(fs.glob(path))
        files = [f for f in files if fs.isfile(f)]
        if not files:
            raise ConfigError(f"download.input = {cfg.input!r}: the glob matches no file")
        fmts = {_format_of(f) for f in files}
        if fmt is None:
            if len(fmts) != 1 or None in fmts:
                raise ConfigError(
                    f"download.input = {cfg.input!r}: cannot tell the format from the extensions of {files[:3]}...; "
                    f"set download.input_format (one of {', '.join(URL_LIST_FORMATS)})"
                )
            fmt = fmts.pop()
        folders = {f.rsplit("/", 1)[0] for f in files}
        if len(folders) == 1:
            whole = sorted(fs.glob(join(next(iter(folders)), f"*.{fmt}")))
            if whole == files:  # the glob selects a whole folder: img2dataset reads folders itself
                return _with_proto(fs, next(iter(folders))), [_with_proto(fs, f) for f in files], fmt
        # img2dataset reads one file or one folder. For a subset of local files, a folder
        # of links to them keeps img2dataset's own reader (and its order: sorted names).
        if _with_proto(fs, "x") != "x":
            raise ConfigError(
                f"download.input = {cfg.input!r}: a remote glob must select every *.{fmt} file of one folder; "
                "put the files to download in their own folder and give that folder"
            )
        os.makedirs(staging, exist_ok=True)
        for old in os.listdir(staging):
            os.remove(os.path.join(staging, old))
        for i, f in enumerate(files):
            os.symlink(os.path.abspath(f), os.path.join(staging, f"{i:05d}_{f.rsplit('/', 1)[-1]}"))
        return staging, files, fmt
    if not fs.exists(path):
        raise ConfigError(f"download.input = {cfg.input!r}: no such file or folder")
    if fs.isdir(path):
        if fmt is None:
            found = {_format_of(f) for f in fs.ls(path, detail=False)} - {None}
            if len(found) != 1:
                raise ConfigError(
                    f"download.input = {cfg.input!r}: folder holds "
                    f"{'no URL list' if not found else 'several formats: ' + ', '.join(sorted(found))}; "
                    f"set download.input_format (one of {', '.join(URL_LIST_FORMATS)})"
                )
            fmt = found.pop()
        files = sorted(fs.glob(join(path, f"*.{fmt}")))
        if not files:
            raise ConfigError(f"download.input = {cfg.input!r}: no *.{fmt} file in this folder")
        return _with_proto(fs, path), [_with_proto(fs, f) for f in files], fmt
    if fmt is None:
        fmt = _format_of(path)
        if fmt is None:
            raise ConfigError(
                f"download.input = {cfg.input!r}: cannot tell the format from the extension; "
                f"set download.input_format (one of {', '.join(URL_LIST_FORMATS)})"
            )
    return _with_proto(fs, path), [_with_proto(fs, path)], fmt


def _read_table(file: str, fmt: str, columns: list[str] | None = None):
    """Read a URL-list file with the same pyarrow readers img2dataset uses."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    fs, path = fsspec.core.url_to_fs(file)
    if fmt == "parquet":
        with fs.open(path, "rb") as f:
            return pq.read_table(f, columns=columns)
    compression = "gzip" if fmt.endswith(".gz") else None
    with fs.open(path, "rb", compression=compression) as f:
        if fmt.startswith("jsonl"):
            t = pajson.read_json(f)
            return t.select(columns) if columns else t
        delimiter = "\t" if fmt.startswith("tsv") else ","
        convert = pacsv.ConvertOptions(include_columns=columns) if columns else pacsv.ConvertOptions()
        return pacsv.read_csv(f, parse_options=pacsv.ParseOptions(delimiter=delimiter), convert_options=convert)


def _columns_of(file: str, fmt: str) -> list[str]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fs, path = fsspec.core.url_to_fs(file)
    if fmt == "parquet":
        with fs.open(path, "rb") as f:
            return list(pq.read_schema(f).names)
    compression = "gzip" if fmt.endswith(".gz") else None
    with fs.open(path, "rb", compression=compression) as f:
        if fmt.startswith("jsonl"):
            keys: dict[str, None] = {}
            for i, line in enumerate(f):
                if i >= 100:
                    break
                if line.strip():
                    try:
                        keys.update(dict.fromkeys(json.loads(line)))
                    except (ValueError, TypeError, AttributeError):
                        continue
            return list(keys)
        delimiter = "\t" if fmt.startswith("tsv") else ","
        reader = pacsv.open_csv(f, parse_options=pacsv.ParseOptions(delimiter=delimiter))
        return list(reader.schema.names)


def _pick(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, key: str, file: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise ConfigError(f"download.{key} = {wanted!r}: no such column in {file}; columns found: {columns}")
        return wanted
    for c in candidates:
        if c in columns:
            return c
    lower = {c.lower(): c for c in columns}
    for c in candidates:
        if c.lower() in lower:
            return lower[c.lower()]
    raise ConfigError(
        f"{file}: no {what} column (looked for {', '.join(candidates)}); columns found: {columns}. "
        f"Set download.{key} to the right one."
    )


def resolve_url_list(cfg: DownloadConfig, staging: str) -> UrlList:
    """Find the files, format and columns of ``cfg.input`` and count its rows and bad URLs.

    ``staging`` is a local folder used only when a glob selects part of a folder.
    Raises :class:`ConfigError` with the columns found when a column is missing.
    """
    import pyarrow.compute as pc

    url_list, files, fmt = _list_files(cfg, staging)
    try:
        columns = _columns_of(files[0], fmt)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types; say which file and format
        raise ConfigError(f"{files[0]}: cannot read it as {fmt}: {exc}") from exc
    url_col = _pick(columns, cfg.url_col, URL_COLUMNS, "URL", "url_col", files[0])
    caption_col = _pick(columns, cfg.caption_col, CAPTION_COLUMNS, "caption (alt text)", "caption_col", files[0])
    missing = [c for c in cfg.save_additional_columns if c not in columns]
    if missing:
        raise ConfigError(f"download.save_additional_columns {missing}: not in {files[0]}; columns found: {columns}")
    out = UrlList(url_list, files, fmt, url_col, caption_col, columns)
    for f in progress(files, desc="scan URL list", unit="file", disable=len(files) < 2):
        try:
            t = _read_table(f, fmt, [url_col])
        except Exception as exc:  # noqa: BLE001 - pyarrow raises many types; report which file
            raise ConfigError(f"{f}: cannot read it as {fmt} with a {url_col!r} column: {exc}") from exc
        urls = t[url_col].cast("string").fill_null("")
        http = int(pc.sum(pc.match_substring_regex(urls, _URL_HTTP.pattern, ignore_case=True)).as_py() or 0)
        other = int(pc.sum(pc.match_substring_regex(urls, _URL_OTHER_SCHEME.pattern, ignore_case=True)).as_py() or 0)
        out.rows_per_file.append(t.num_rows)
        out.invalid_urls += t.num_rows - http - other
        out.other_scheme_urls += other
    if out.n_rows == 0:
        raise ConfigError(
            f"download.input = {cfg.input!r}: the URL list has no rows ({len(files)} file(s) read); nothing to download"
        )
    return out


# --------------------------------------------------------------------------- shards
def shard_name(shard_id: int) -> str:
    """img2dataset's shard file stem (``oom_shard_count`` = 5 digits)."""
    return f"{shard_id:05d}"


def expected_shards(rows_per_file: list[int], per_shard: int) -> dict[str, int]:
    """Shard name -> number of input rows, as img2dataset's reader cuts the files."""
    out: dict[str, int] = {}
    start = 0
    for rows in rows_per_file:
        n = math.ceil(rows / per_shard)
        for i in range(n):
            out[shard_name(start + i)] = min(per_shard, rows - i * per_shard)
        start += n
    return out


def finished_shards(images_url: str) -> set[str]:
    """Shards with a ``_stats.json``: img2dataset writes it last, so these are complete."""
    fs, path = fsspec.core.url_to_fs(images_url)
    if not fs.exists(path):
        return set()
    return {f.rsplit("/", 1)[-1][: -len("_stats.json")] for f in fs.glob(join(path, "*_stats.json"))}


def summarise(images_url: str, expected: dict[str, int], summary: StageSummary) -> StageSummary:
    """Fill ``summary`` from the ``*_stats.json`` files and shard row counts.

    Every expected input row ends up in ``n_out`` (success) or under a reason.
    """
    import pyarrow.parquet as pq

    fs, path = fsspec.core.url_to_fs(images_url)
    detail: dict[str, Counter] = {}
    done = finished_shards(images_url)
    totals = Counter()
    for shard in sorted(done):
        with fs.open(join(path, f"{shard}_stats.json"), "r") as f:
            stats = json.load(f)
        for k in ("count", "successes", "failed_to_download", "failed_to_resize"):
            totals[k] += int(stats.get(k, 0))
        summary.n_out += int(stats.get("successes", 0))
        for raw, n in stats.get("status_dict", {}).items():
            if raw == "success":
                continue
            reason = failure_reason(raw)
            summary.reject(reason, int(n))
            detail.setdefault(reason, Counter())[raw] += int(n)
        rows = 0  # a shard file deleted by hand: its rows are counted as lost, not skipped
        if fs.exists(join(path, f"{shard}.parquet")):
            with fs.open(join(path, f"{shard}.parquet"), "rb") as f:
                rows = pq.ParquetFile(f).metadata.num_rows
        if rows < int(stats.get("count", 0)):
            summary.reject(REASON_ROW_LOST, int(stats["count"]) - rows)
    not_finished = {s: n for s, n in expected.items() if s not in done}
    if not_finished:
        summary.reject(REASON_SHARD_FAILED, sum(not_finished.values()))
        detail[REASON_SHARD_FAILED] = Counter({f"shard {s}": n for s, n in sorted(not_finished.items())[:20]})
    summary.extra.update(
        shards=len(expected),
        shards_finished=len(done & set(expected)),
        failed_to_download=totals["failed_to_download"],
        failed_to_resize=totals["failed_to_resize"],
        failure_detail={r: dict(c.most_common(5)) for r, c in sorted(detail.items())},
    )
    return summary


# --------------------------------------------------------------------------- run
def images_folder(cfg: RootConfig) -> str:
    """Where the download writes: ``download.output`` or ``<data_root>/images``."""
    return cfg.download.output or join(cfg.project.data_root, "images")


#: Settings that decide what a finished shard's rows hold. Network settings (threads,
#: timeout, retries, processes, distributor) decide how fast, not what, and may change.
ROW_SETTINGS = (
    "url_col",
    "caption_col",
    "save_additional_columns",
    "resize_mode",
    "image_size",
    "resize_only_if_bigger",
    "min_image_size",
    "max_aspect_ratio",
    "max_image_area",
    "encode_format",
    "encode_quality",
    "skip_reencode",
    "disable_all_reencoding",
    "compute_hash",
    "extract_exif",
    "denylists",
    "opt_outs",
    "punsafe_max",
    "pwatermark_max",
    "punsafe_col",
    "pwatermark_col",
)


def row_settings(cfg: DownloadConfig, url_list: UrlList | None = None) -> dict[str, Any]:
    """The download settings that decide what its rows hold (the columns as resolved)."""
    out = {k: getattr(cfg, k) for k in ROW_SETTINGS}
    for k in ("denylists", "opt_outs"):
        out[k] = [c.model_dump(mode="json") for c in out[k]]
    if url_list is not None:
        out.update(url_col=url_list.url_col, caption_col=url_list.caption_col)
    return out


def _check_layout(table: Table, cfg: DownloadConfig, have_shards: bool, url_list: UrlList | None = None) -> None:
    """A resumed run must cut the input into the same shards, or rows would duplicate, and
    must make its rows the same way, or the folder would mix two kinds of rows under one
    ``_config.yaml``."""
    doc = None
    cfg_file = join(table.path, "_config.yaml")
    if have_shards and table.fs.exists(cfg_file):
        with table.fs.open(cfg_file, "r") as f:
            doc = yaml.safe_load(f) or {}
    old = ((doc or {}).get("config") or {}).get("download") or {}
    for key in ("input", "number_sample_per_shard"):
        if key in old and old[key] != getattr(cfg, key):
            raise ConfigError(
                f"{table.url} holds shards downloaded with download.{key} = {old[key]!r}, "
                f"this run has {getattr(cfg, key)!r}: resuming would mix shard layouts. "
                "Use another download.output, or --set download.incremental_mode=overwrite to start over."
            )
    recorded = (doc or {}).get("stage_settings")
    if recorded is None:  # written before row settings were recorded: compare the section itself
        recorded = {k: old[k] for k in ROW_SETTINGS if k in old and k not in ("url_col", "caption_col")}
    now = row_settings(cfg, url_list)
    changed = {k: (recorded[k], now[k]) for k in recorded if k in now and recorded[k] != now[k]}
    if changed:
        what = ", ".join(f"download.{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise ConfigError(
            f"{table.url} holds finished shards made with other settings ({what}): this run would add rows made "
            "another way. Rerun with the settings the folder was made with, use another download.output, or "
            "--set download.incremental_mode=overwrite to download everything again."
        )


def _watch(images_url: str, todo: set[str], stop: threading.Event, console: Any = None) -> None:
    """Advance a progress bar as img2dataset finishes shards (it writes _stats.json last)."""
    bar = progress(None, total=len(todo), desc="download", unit="shard", file=console)
    seen: set[str] = set()
    while True:
        stopping = stop.wait(1.0)
        try:
            now = finished_shards(images_url) & todo
        except Exception:  # noqa: BLE001 - a failed listing only delays the bar; the summary recounts
            now = seen
        bar.update(len(now - seen))
        seen |= now
        if stopping:
            break
    bar.close()


def _img2dataset_kwargs(cfg: DownloadConfig, url_list: UrlList, output: str) -> dict[str, Any]:
    return dict(
        url_list=url_list.url_list,
        output_folder=output,
        output_format="parquet",
        input_format=url_list.input_format,
        url_col=url_list.url_col,
        caption_col=url_list.caption_col,
        # the input's punsafe / pwatermark travel with each row: the safe downloader reads them
        save_additional_columns=list(
            dict.fromkeys(list(cfg.save_additional_columns) + [c for c, _, _ in metadata_limits(cfg, url_list.columns)])
        )
        or None,
        image_size=cfg.image_size,
        resize_mode=cfg.resize_mode,
        resize_only_if_bigger=cfg.resize_only_if_bigger,
        min_image_size=cfg.min_image_size,
        max_aspect_ratio=cfg.max_aspect_ratio if cfg.max_aspect_ratio is not None else float("inf"),
        # null: OpenCV's own limit (it refuses more than 2^30 pixels), which the guard then applies first
        max_image_area=cfg.max_image_area if cfg.max_image_area is not None else float(2**30),
        encode_format=cfg.encode_format,
        encode_quality=cfg.encode_quality,
        skip_reencode=cfg.skip_reencode,
        disable_all_reencoding=cfg.disable_all_reencoding,
        compute_hash=cfg.compute_hash,
        extract_exif=cfg.extract_exif,
        processes_count=cfg.processes_count,
        thread_count=cfg.thread_count,
        number_sample_per_shard=cfg.number_sample_per_shard,
        timeout=cfg.timeout,
        retries=cfg.retries,
        max_shard_retry=cfg.max_shard_retry,
        user_agent_token=cfg.user_agent_token,
        distributor=cfg.distributor,
        incremental_mode="incremental",  # "overwrite" is done here first, so _config.yaml survives
        oom_shard_count=5,
        enable_wandb=False,
    )


def _reject_policy(cfg: DownloadConfig) -> str:
    if cfg.disable_all_reencoding:
        return "nothing: bytes stored as downloaded, nothing decoded (`make filter` judges every image)"
    rules = [f"area > {cfg.max_image_area or 2**30:,.0f} px (from the header, before decoding)"]
    if cfg.min_image_size:
        rules.append(f"short side < {cfg.min_image_size} px")
    if cfg.max_aspect_ratio is not None:
        rules.append(f"aspect ratio > {cfg.max_aspect_ratio:g}")
    return ", ".join(["undecodable"] + rules) + "; animated images stored as downloaded"


def run_download(cfg: RootConfig) -> StageSummary:
    """Download ``cfg.download.input`` into the images folder; returns the summary (also saved)."""
    dcfg: DownloadConfig = cfg.download
    output = images_folder(cfg)
    table = Table(output)
    # on object storage: the bucket exists and takes writes (one PUT), before anything else;
    # a missing one is an error (one line, exit 2), never created
    check_writable(output)
    summary = StageSummary("download")
    staging_fs, staging_path = fsspec.core.url_to_fs(join(output, "_url_list"))
    local = _with_proto(staging_fs, "x") == "x"
    staging = staging_path if local else tempfile.mkdtemp(prefix="paradiffusion-url-list-")
    url_list = resolve_url_list(dcfg, staging)  # before anything is removed: a bad input changes nothing
    safety = load_lists(dcfg.denylists, dcfg.opt_outs)  # a list that cannot be read stops the run here
    if dcfg.incremental_mode == "overwrite" and table.exists():
        log.info("incremental_mode=overwrite: removing what %s holds", output)
        for item in table.fs.ls(table.path, detail=False):
            if item.rstrip("/").rsplit("/", 1)[-1] != "_url_list":
                table.fs.rm(item, recursive=True)
    expected = expected_shards(url_list.rows_per_file, dcfg.number_sample_per_shard)
    already = finished_shards(output) & set(expected)
    _check_layout(table, dcfg, bool(finished_shards(output)), url_list)
    log_path = stage_log_path(output, "download")

    announce(
        "download",
        {
            "input": f"{dcfg.input} ({len(url_list.files)} {url_list.input_format} file(s))",
            "columns": f"url={url_list.url_col!r} caption={url_list.caption_col!r}"
            + (f" + {dcfg.save_additional_columns}" if dcfg.save_additional_columns else ""),
            "rows": f"{url_list.n_rows} ({url_list.invalid_urls} with an empty or invalid URL, counted as "
            "`invalid_url` failures"
            + (
                f"; {url_list.other_scheme_urls} ftp/file/data URLs, fetched as they are)"
                if url_list.other_scheme_urls
                else ")"
            ),
            "output": f"{output} (img2dataset parquet shards of {dcfg.number_sample_per_shard})",
            "shards": f"{len(expected)} ({len(already)} already complete, skipped)",
            "resize": ("keep originals" + (", stored as downloaded" if dcfg.disable_all_reencoding else ""))
            if dcfg.resize_mode == "no"
            else f"{dcfg.resize_mode} to {dcfg.image_size} px" + (" if bigger" if dcfg.resize_only_if_bigger else ""),
            "reject": _reject_policy(dcfg),
            "workers": (
                f"{dcfg.processes_count} process(es)"
                if dcfg.distributor == "multiprocessing"
                else "Ray, a task a shard"
            )
            + f" x {dcfg.thread_count} threads, timeout {dcfg.timeout:g} s, retries {dcfg.retries}",
            "safety": _safety_policy(dcfg, url_list, safety),
            "log": f"{log_path} (img2dataset's and Ray's own output)",
        },
    )
    summary.n_in = url_list.n_rows
    summary.skipped_done = len(already)
    summary.skipped_unit = "shards"
    summary.extra.update(
        output=output, input_invalid_urls=url_list.invalid_urls, input_other_scheme_urls=url_list.other_scheme_urls
    )
    if not table.object_store:  # object stores have no folders (and s3fs's makedirs creates a missing bucket)
        table.fs.makedirs(table.path, exist_ok=True)
    table.clean_tmp()
    # img2dataset takes every *.json at the top of its output folder for a shard's stats
    # (int(name.split("_")[0])), so the previous run's summary must not be there while it
    # runs. It is rebuilt from all the _stats.json files at the end, so nothing is lost.
    if table.fs.exists(join(table.path, "_summary.json")):
        table.fs.rm(join(table.path, "_summary.json"))
    table.save_config(cfg, "download", row_settings(dcfg, url_list))

    todo = set(expected) - already
    if todo:
        summary.extra["ran_on"] = _run_img2dataset(cfg, url_list, output, todo, log_path, safety)
    else:
        log.info("every shard is already complete; nothing to download")
    summarise(output, expected, summary)
    summary.finish()
    table.save_json("_summary.json", summary.to_dict())
    summary.print()
    return summary


def _safety_policy(cfg: DownloadConfig, url_list: UrlList, safety: SafetyLists) -> str:
    limits = metadata_limits(cfg, url_list.columns)
    meta = ", ".join(f"{c} > {m:g} ({r})" for c, m, r in limits)
    absent = [
        c for c, m in ((cfg.punsafe_col, cfg.punsafe_max), (cfg.pwatermark_col, cfg.pwatermark_max)) if m is not None
    ]
    absent = [c for c in absent if c not in url_list.columns]
    return (
        f"lists: {safety.describe()}; not fetched: listed URLs"
        + (f", {meta}" if meta else "")
        + (f" (no {', '.join(absent)} column in the input)" if absent else "")
        + ("; bytes on a hash list never written" if safety.hashes_needed else "")
    )


def _run_img2dataset(
    cfg: RootConfig, url_list: UrlList, output: str, todo: set[str], log_path: str, safety: SafetyLists | None = None
) -> str:
    """Run ``img2dataset.download`` on the shards still to do; returns where it ran.

    img2dataset's own output (its shard bar, stats lines, bandwidth hint, its workers'
    tracebacks) and Ray's go to ``log_path``; the terminal shows our one bar."""
    from paradiffusion.deps import require

    # albumentations (imported by img2dataset's resizer) asks PyPI for a newer version
    # on import unless told not to; a download worker has no business doing that.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    require("img2dataset", extra="curation")
    from img2dataset import download

    from curation.resize_guard import guarded_resizer
    from curation.safety.hooks import safe_download

    where = f"{cfg.download.processes_count} local process(es)"
    old_sigint = signal.getsignal(signal.SIGINT)
    t0 = time.time()
    with third_party_output_to(log_path) as console:
        if cfg.download.distributor == "ray":
            from paradiffusion.raycluster import init_ray

            where = init_ray(cfg.ray, extra="curation")
        stop = threading.Event()
        watcher = threading.Thread(target=_watch, args=(output, todo, stop, console), daemon=True)
        watcher.start()
        try:
            limits = metadata_limits(cfg.download, url_list.columns)
            with guarded_resizer(), safe_download(safety if safety else None, limits):
                download(**_img2dataset_kwargs(cfg.download, url_list, output))
        except SystemExit as exc:
            # img2dataset's SIGINT handler cleans its _tmp folder and calls sys.exit(0):
            # report it as the interruption it is (finished shards are kept).
            raise KeyboardInterrupt from exc
        finally:
            signal.signal(signal.SIGINT, old_sigint)
            stop.set()
            watcher.join()
    log.info("img2dataset finished in %.1f s on %s", time.time() - t0, where)
    return where
