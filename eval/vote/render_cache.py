"""The served images, rendered once and kept on disk (safe for many threads and processes).

An entry is named by a hash of the source file's *content*, the study size and
:data:`eval.vote.display.RENDER_VERSION`, so an image replaced in place is rendered
again and the name says nothing about the pair or the model. Writing is write-once:

- each thread renders into its own temp file (``tempfile.mkstemp``: a unique name, so
  two threads or two server processes never share one);
- the temp file is published with ``os.link`` to the final name, which fails if another
  writer got there first; the loser drops its temp file and serves the winner's bytes
  (equal anyway). Readers only ever see complete files;
- within one process, a striped lock per name makes concurrent first requests of one
  image render it once instead of once per thread.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import threading
from pathlib import Path

from eval.vote.display import RENDER_VERSION, BadImage, render_file
from paradiffusion.log import get_logger

log = get_logger("eval.vote")

_N_LOCKS = 64


def _read(path: Path) -> bytes | None:
    """A cached file's bytes; None when it is not there or the cache cannot be read (the
    cache's trouble is never the source image's: the caller renders it again)."""
    try:
        return path.read_bytes()
    except OSError:
        return None


def inside(root: Path, rel: str) -> Path | None:
    """``rel`` under the image folder ``root`` (resolved, links followed), or None when it
    leaves the folder: a pair's stored path is never trusted. The file may be missing
    (reading it then raises ``FileNotFoundError``)."""
    try:
        path = (root / rel).resolve()
        return path if path.is_relative_to(root) else None
    except (OSError, ValueError):  # a path with NUL, too long, a loop of links
        return None


def prerender(store, image_root: str | Path, size: tuple[int, int], cache_dir: str | Path | None = None) -> dict:
    """Render every servable pair's images into the cache before voters come (the
    ``vote`` command does it at start), so no voter waits for a first render and a bad
    image is withdrawn before anyone is served its pair. Returns counts: ``rendered``,
    ``cached`` (already there), ``withdrawn`` (pairs with an image that cannot be shown)."""
    from collections import Counter

    from paradiffusion.stage import progress

    root = Path(image_root).resolve()
    cache = RenderCache(Path(cache_dir) if cache_dir else store.path.parent / "display", size)
    counts: Counter = Counter()
    pairs = [p for p in store.pairs_overview() if not store.is_withdrawn(p["id"])]
    for overview in progress(pairs, desc="render images", unit="pair"):
        pair = store.pair(overview["id"])
        for which in ("x", "y"):
            path = inside(root, pair[f"path_{which}"])
            before = cache.rendered
            try:
                if path is None:
                    raise FileNotFoundError(f"{pair[f'path_{which}']} is outside the image folder")
                cache.get(path)
            except (BadImage, OSError) as exc:
                store.withdraw(pair["id"], f"{which}: {exc}")
                counts["withdrawn"] += 1
                break
            counts["rendered" if cache.rendered > before else "cached"] += 1
    return dict(counts)


class RenderCache:
    """Rendered images of the study's ``size`` under ``folder``."""

    def __init__(self, folder: str | Path, size: tuple[int, int]):
        self.folder = Path(folder)
        self.size = (int(size[0]), int(size[1]))
        self._locks = [threading.Lock() for _ in range(_N_LOCKS)]
        self.rendered = 0  # renders done by this process (tests and the benchmark read it)

    def name_for(self, data: bytes) -> str:
        h = hashlib.sha256(f"{RENDER_VERSION}:{self.size[0]}x{self.size[1]}:".encode())
        h.update(data)
        return h.hexdigest()[:40] + ".jpg"

    def get(self, path: Path) -> bytes:
        """The served bytes of the source at ``path``; :class:`BadImage` when it cannot be
        decoded, ``OSError`` when the source cannot be read. A cache folder that cannot be
        read or written only costs a render (logged), never the image."""
        data = path.read_bytes()
        name = self.name_for(data)
        final = self.folder / name
        cached = _read(final)
        if cached is not None:
            return cached
        with self._locks[int(name[:8], 16) % _N_LOCKS]:
            cached = _read(final)  # another thread may have rendered it while this one waited
            if cached is not None:
                return cached
            out = render_file(io.BytesIO(data), self.size)
            self.rendered += 1
            try:
                self._publish(final, out)
            except OSError as exc:  # a full or read-only cache folder: serve it anyway, the source is fine
                log.warning("cannot cache a rendered image in %s (%s); serving it uncached", self.folder, exc)
            return out

    def _publish(self, final: Path, out: bytes) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(out)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, final)  # write-once: fails when the name exists
            except FileExistsError:
                pass  # another process published the same (equal) bytes first
            except OSError:  # a file system without hard links: rename is atomic too
                os.replace(tmp, final)
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


__all__ = ["BadImage", "RenderCache", "inside", "prerender"]
