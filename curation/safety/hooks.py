"""The safety checks inside img2dataset's download: rows refused before any request, bytes
refused before anything is written.

img2dataset's ``Downloader.download_shard`` reads a shard of the URL list, then fetches
every row with the module function ``img2dataset.downloader.download_image_with_retry``
(looked up at each call) and hands the bytes to its resizer. :class:`SafeDownloader`
decides, before that shard's first request, which rows must not be fetched (a URL on a
denylist or an opt-out list, input ``punsafe`` / ``pwatermark`` above the thresholds)
and answers those rows itself with ``"<reason>: <detail>"``: img2dataset then writes them
as failures with that ``error_message`` and no image, and counts them in its stats.
The resizer (:class:`curation.resize_guard.GuardedResizer`) checks the bytes of every
fetched image against the hash denylists first: a match is refused the same way, so
its bytes never reach a shard, a temp file or a log (they only lived in memory).

img2dataset has no hook for another downloader, so :func:`safe_download` swaps the
class in ``img2dataset.main`` for the length of the call (as ``guarded_resizer`` does
for the resizer); the instance travels to the worker processes (spawned, or Ray tasks)
by pickle. img2dataset's distributors run one shard at a time in a process, so the
rows refused for the shard in progress are a process-global table.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Iterator
from typing import Any

from img2dataset.downloader import Downloader

from .lists import SafetyLists

_REFUSED: dict[int, str] = {}  # row key within the shard in progress -> error message
_LOCK = threading.Lock()
_ORIGINAL = None


def _checked_download(row, *args, **kwargs):
    """img2dataset's fetch, except for the rows refused before download (no request made)."""
    key = row[0]
    msg = _REFUSED.get(key)
    if msg is not None:
        return key, None, msg
    return _ORIGINAL(row, *args, **kwargs)


def _install() -> None:
    global _ORIGINAL
    import img2dataset.downloader as mod

    with _LOCK:
        if _ORIGINAL is None:
            _ORIGINAL = mod.download_image_with_retry
            mod.download_image_with_retry = _checked_download


def refusals(columns: dict[str, list], safety: SafetyLists | None, limits: list[tuple[str, float, str]]) -> dict:
    """Row index -> ``"<reason>: <detail>"`` for the rows not to fetch (``columns``: the shard's
    ``url`` and metadata columns). Lists first, then metadata, in that order of reasons."""
    out: dict[int, str] = {}
    urls = columns.get("url") or []
    for i, url in enumerate(urls):
        if safety:
            found = safety.check_url(url)
            if found is not None:
                out[i] = f"{found[0]}: {found[1]}"
                continue
        for col, maximum, reason in limits:
            v = (columns.get(col) or [None] * len(urls))[i]
            try:
                v = float(v) if v is not None else None
            except (TypeError, ValueError):
                v = None
            if v is not None and math.isfinite(v) and v > maximum:
                out[i] = f"{reason}: input {col} {v:.3f} > {maximum:g}"
                break
    return out


class SafeDownloader(Downloader):
    """img2dataset's ``Downloader`` with the rows to refuse answered without a request."""

    def __init__(self, *args: Any, safety: SafetyLists | None = None, limits=(), **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.safety = safety
        self.limits = [tuple(x) for x in limits]
        if safety is not None and safety.hashes_needed:
            self.resizer.safety = safety  # the bytes check, before anything is written

    def download_shard(self, row):
        import fsspec
        import pyarrow as pa

        _shard_id, shard_file = row
        fs, path = fsspec.core.url_to_fs(shard_file)
        with fs.open(path, "rb") as f:
            table = pa.ipc.open_file(f).read_all()
        want = ["url"] + [c for c, _, _ in self.limits if c in table.column_names]
        refused = refusals(table.select(want).to_pydict(), self.safety, self.limits)
        del table
        _install()
        with _LOCK:
            _REFUSED.clear()
            _REFUSED.update(refused)
        try:
            return super().download_shard(row)
        finally:
            with _LOCK:
                _REFUSED.clear()


@contextlib.contextmanager
def safe_download(safety: SafetyLists | None, limits: list[tuple[str, float, str]]) -> Iterator[None]:
    """Make ``img2dataset.download`` build a :class:`SafeDownloader` inside this block."""
    import importlib

    i2d_main = importlib.import_module("img2dataset.main")
    original = i2d_main.Downloader
    i2d_main.Downloader = functools.partial(SafeDownloader, safety=safety, limits=limits)
    try:
        yield
    finally:
        i2d_main.Downloader = original
