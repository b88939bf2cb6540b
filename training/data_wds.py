"""WebDataset input for :class:`training.data.BucketedImageData` (``train.stageN.data.format: webdataset``).

What ``paradiffusion publish`` writes with ``publish.webdataset: true`` (or any tar shards of the
same layout)::

    <folder>/webdataset/index.json        {"version": ..., "subsets": {"big": [{"url", "rows", "sha256"}, ...]}}
    <folder>/webdataset/<subset>/*.tar    per sample: {key}.jpg|.png|.webp, {key}.txt, {key}.json

``data.path`` is that folder, its ``index.json``, or tar shard URLs (a list, or one string with
webdataset's brace pattern ``shard-{000..009}.tar``); local paths or any fsspec URL. The tars are
read with the ``webdataset`` package's own tar iteration and key grouping
(``tar_file_iterator`` + ``group_by_keys``) over an fsspec file, so every store fsspec knows works.

A tar shard has no columnar metadata and no row groups: the plan reads each shard's small
members (``.json``/``.txt``; an image only when the ``.json`` gives no size) once, and a rank
later streams a shard once per read, keeping only the image bytes of its own rows. Row ``i``
of a shard is the ``i``-th complete sample in the tar, so the bucketing, rank split, order and
exact resume of the Parquet input apply unchanged.

Bad input is counted, never a crash and never a silent drop: a tar that ends early or has
a corrupt member header keeps the samples before it, and the rows the index lists beyond
them are counted as ``corrupt tar``; a sample without an image, with a ``.json`` that does
not parse, or (``caption_source: txt``) without a ``.txt`` is counted with that reason; an
image that does not decode is counted when loaded, as in the Parquet input. A shard the
index lists that does not exist stops the run with one error naming it.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec

from paradiffusion.log import get_logger

log = get_logger("training.data")

#: Sample members that hold the image (the first one present is used).
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

INDEX_FILE = "index.json"


@dataclass(frozen=True)
class WdsShard:
    url: str
    rows: int | None  # what the index says (None: a tar named directly)


def resolve_shards(path: str | list[str], subset: str) -> list[WdsShard]:
    """The tar shards of ``data.path`` for ``subset``; one error naming every listed shard that is missing."""
    import braceexpand

    if isinstance(path, str) and not path.endswith(".tar") and "{" not in path:
        index_url = path if path.endswith(".json") else _find_index(path)
        shards = _from_index(index_url, subset)
        where = f"listed in {index_url}"
    else:
        urls = [path] if isinstance(path, str) else list(path)
        shards = [WdsShard(u, None) for pattern in urls for u in braceexpand.braceexpand(pattern)]
        where = "named in data.path"
    if not shards:
        raise FileNotFoundError(f"data.path {path}: no WebDataset tar shards for subset {subset!r}")
    missing = [s.url for s in shards if not _exists(s.url)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(shards)} WebDataset shards {where} do not exist, e.g. {missing[0]}: the "
            "dataset folder is incomplete (copy it again, or publish again with publish.webdataset: true)"
        )
    return shards


def _exists(url: str) -> bool:
    fs, p = fsspec.core.url_to_fs(url)
    return fs.exists(p)


def _find_index(folder: str) -> str:
    folder = folder.rstrip("/")
    for candidate in (f"{folder}/webdataset/{INDEX_FILE}", f"{folder}/{INDEX_FILE}"):
        if _exists(candidate):
            return candidate
    raise FileNotFoundError(
        f"data.path {folder}: no webdataset/{INDEX_FILE} (a folder written by `paradiffusion publish` with "
        "publish.webdataset: true), nor an index.json; or give the tar shards' URLs"
    )


def _from_index(index_url: str, subset: str) -> list[WdsShard]:
    fs, p = fsspec.core.url_to_fs(index_url)
    try:
        index = json.loads(fs.cat_file(p))
        subsets = index["subsets"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{index_url}: not a WebDataset index ({{'subsets': {{name: [shards]}}}}): {exc}") from exc
    if subset not in subsets:
        raise ValueError(
            f"data.subset {subset!r} is not in {index_url}; it has {sorted(subsets)} (set train.stageN.data.subset)"
        )
    # shard URLs are relative to the dataset folder (the index's folder's parent when it is webdataset/)
    base = index_url.rsplit("/", 1)[0]
    if base.rsplit("/", 1)[-1] == "webdataset":
        base = base.rsplit("/", 1)[0]
    out = []
    for s in subsets[subset]:
        url = s["url"]
        if "://" not in url and not url.startswith("/"):
            url = f"{base}/{posixpath.normpath(url)}"
        out.append(WdsShard(url, int(s["rows"]) if s.get("rows") is not None else None))
    return out


class TarBroken(Exception):
    """A tar shard ended early or has a corrupt member; the samples before it were read."""


def samples(url: str) -> Iterator[dict]:
    """The complete samples of one tar shard in tar order (``__key__`` + one bytes value per member
    extension), through webdataset's tar iteration and key grouping. A broken tar raises
    :class:`TarBroken` after the samples before the damage; the sample being grouped when it shows
    is not yielded (whether it had all its members cannot be told), so it counts as lost."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    def members(stream):
        for m in tar_file_iterator(stream):  # default handler: an error is raised, and counted by the caller
            m["__url__"] = url
            yield m
        yield {}  # end of shard: flushes the last sample

    fs, p = fsspec.core.url_to_fs(url)
    try:
        with fs.open(p, "rb") as f:
            yield from group_by_keys(members(f))
    except (tarfile.TarError, EOFError, ValueError) as exc:  # damaged tar / a member twice: the rest is lost, counted
        # (a storage failure, OSError, is not bad input: it stops the run as everywhere else)
        raise TarBroken(f"{url}: {type(exc).__name__}: {exc}") from exc


def image_of(sample: dict) -> bytes | None:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    return None


def shard_meta(shard: WdsShard, caption_source: str, size_of) -> tuple[dict, int, str | None]:
    """One shard's plan columns: ``key``, ``caption`` (the ``.txt`` for caption_source txt, else the
    ``.json``'s ``alt_text``), ``width``, ``height``, ``skip`` (a reason or None); plus the rows the
    index lists beyond a break (lost) and the break's message."""
    cols: dict[str, list] = {"key": [], "caption": [], "width": [], "height": [], "skip": []}
    broken = None
    try:
        for s in samples(shard.url):
            meta, skip = {}, None
            if "json" in s:
                try:
                    meta = json.loads(s["json"])
                    if not isinstance(meta, dict):
                        raise ValueError("not an object")
                except ValueError:
                    meta, skip = {}, "undecodable .json"
            image = image_of(s)
            if image is None:
                skip = skip or "missing image"
            if caption_source == "txt":
                text = _text(s.get("txt"))
                if text is None:
                    skip = skip or "missing .txt"
            else:
                alt = meta.get("alt_text")
                text = str(alt) if alt is not None and str(alt).strip() else None
            w, h = meta.get("width"), meta.get("height")
            if skip is None and (not w or not h):
                w, h = size_of(image)  # no sizes in the metadata: from the image header
            for c, v in zip(cols, (s["__key__"], text, w, h, skip), strict=True):
                cols[c].append(v)
    except TarBroken as exc:
        broken = str(exc)
        log.warning("corrupt WebDataset shard, the rest of it is skipped: %s", broken)
    n = len(cols["key"])
    lost = max(0, shard.rows - n) if shard.rows is not None else (1 if broken else 0)
    return cols, lost, broken


def _text(data: bytes | None) -> str | None:
    if data is None:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.strip() else None


def read_images(url: str, wanted: dict[int, str]) -> dict[int, bytes | None]:
    """The image bytes of rows ``wanted`` (row -> key) of one shard, streamed once. A row whose key
    is not the planned one means the shard changed under the run: that is an error, not a skip."""
    out: dict[int, bytes | None] = {}
    last = max(wanted) if wanted else -1
    try:
        for i, s in enumerate(samples(url)):
            if i in wanted:
                if s["__key__"] != wanted[i]:
                    raise RuntimeError(
                        f"{url}: sample {i} is {s['__key__']!r}, planned {wanted[i]!r}: the shard changed during the run"
                    )
                out[i] = image_of(s)
            if i >= last:
                break
    except TarBroken as exc:  # the plan read the same samples before the damage: nothing planned is missing
        log.debug("%s", exc)
    return out
