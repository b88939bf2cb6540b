"""Find a model on this machine without network (locate), or download it into the cache (download)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from paradiffusion.hub.cache import ModelCache
from paradiffusion.hub.layouts import LAYOUTS, _parts, _View, missing_files, select_files
from paradiffusion.hub.refs import _SHA, HTTP_TIMEOUT, ModelRef, ModelUnavailable, _first_line, _NotThere
from paradiffusion.log import get_logger

log = get_logger("models")


# =========================================================================== resolution
@dataclass
class Resolved:
    """Where a model was found (or put), and what it is."""

    ref: ModelRef
    path: str | None
    action: str  # local | cached | downloaded | not managed
    commit: str | None = None
    files: list[str] = field(default_factory=list)  # relative to the model root (Hub/url/file: what was checked)
    size: int = 0
    settings: list[str] = field(default_factory=list)  # every setting that names this model


def dedupe(refs: Iterable[ModelRef]) -> list[tuple[ModelRef, list[str]]]:
    """Each distinct model once, with every setting that names it."""
    seen: dict[tuple, tuple[ModelRef, list[str]]] = {}
    for r in refs:
        if r.key in seen:
            if r.setting not in seen[r.key][1]:
                seen[r.key][1].append(r.setting)
        else:
            seen[r.key] = (r, [r.setting])
    return list(seen.values())


def _hf_storage(cache: ModelCache, repo: str) -> Path:
    return cache.hub_dir / ("models--" + repo.replace("/", "--"))


def _hf_commit(storage: Path, revision: str | None) -> str | None:
    if revision and _SHA.match(revision):
        return revision
    ref_file = storage / "refs" / (revision or "main")
    try:
        return ref_file.read_text().strip() or None
    except OSError:
        return None


def _write_ref(storage: Path, revision: str | None, commit: str) -> None:
    """Point ``refs/<revision>`` at ``commit``, as huggingface_hub does after a download of a branch.

    Loaders in offline mode resolve a branch through this file, so a locked model's ref must
    name the locked commit. Written atomically (another node may read it at the same time).
    """
    if revision and _SHA.match(revision):
        return
    ref_file = storage / "refs" / (revision or "main")
    ref_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref_file.with_name(f".{ref_file.name}.{os.getpid()}.tmp")
    tmp.write_text(commit)
    os.replace(tmp, ref_file)


class LockMismatch(ModelUnavailable):
    """The cache's ref of a locked model names another commit than models.lock."""


def _cached_tree(storage: Path, commit: str) -> dict | None:
    """The repository listing huggingface_hub cached at download time (sizes, LFS sha256, git blob ids)."""
    try:  # huggingface_hub writes trees/<commit>.json on every snapshot_download; read it with its own reader
        from huggingface_hub._tree_cache import read_tree_cache
    except ImportError:  # pragma: no cover - other huggingface_hub versions: verify against blob names only
        return None
    return read_tree_cache(str(storage), commit)


def _sizes(root: Path, files: list[str]) -> int:
    total = 0
    for f in files:
        with contextlib.suppress(OSError):
            total += (root / f).stat().st_size
    return total


def locate(ref: ModelRef, cache: ModelCache) -> Resolved:
    """Find ``ref`` on this machine without any network; raises ``_NotThere`` (internal) or ModelUnavailable."""
    return _LOCATORS[ref.kind](ref, cache)


def _locate_folder(ref: ModelRef, cache: ModelCache) -> Resolved:
    p = Path(os.path.expanduser(ref.source))
    if not p.exists():
        pathlike = ref.source.startswith(("/", ".", "~")) or ref.source.count("/") > 1
        raise ModelUnavailable(
            f"{ref.head()}: no such folder{'' if pathlike else ', and not a Hugging Face id (owner/name)'}. "
            f"Fix: point {ref.setting} at the model folder{'' if pathlike else ', or give its Hub id'}",
            setting=ref.setting,
        )
    if not p.is_dir():
        raise ModelUnavailable(
            f"{ref.head()}: is a file, expected a model folder. Fix: point it at the folder",
            setting=ref.setting,
        )
    missing = missing_files(_View(root=p), ref)
    if missing:
        raise ModelUnavailable(
            f"{ref.head()}: not a complete {_layout_name(ref)} folder: missing "
            f"{_list(missing)}. Fix: point {ref.setting} at the folder that holds them, or copy them in",
            setting=ref.setting,
        )
    files = [f for folder, _ in _parts(ref) for f in _View(root=p).all_files(folder)]
    return Resolved(ref, str(p), "local", files=files, size=_sizes(p, files))


def _locate_file(ref: ModelRef, cache: ModelCache) -> Resolved:
    if "://" in ref.source:
        try:
            import fsspec

            fs, path = fsspec.core.url_to_fs(ref.source)
            ok = fs.isfile(path)
            size = fs.size(path) if ok else 0
        except Exception as exc:  # noqa: BLE001 - missing filesystem package, credentials, network
            raise ModelUnavailable(
                f"{ref.head()}: cannot open it ({type(exc).__name__}: {_first_line(exc)}). "
                "Fix: check the URL and credentials, or copy the file to a local path",
                setting=ref.setting,
            ) from None
        if not ok:
            raise ModelUnavailable(f"{ref.head()}: no such file. Fix: check the path", ref.setting)
        return Resolved(ref, ref.source, "local", size=size)
    p = Path(os.path.expanduser(ref.source))
    if not p.exists():
        raise ModelUnavailable(
            f"{ref.head()}: no such file. Fix: point {ref.setting} at the weights file "
            "(or give its http(s) URL to download it)",
            setting=ref.setting,
        )
    if p.is_dir():
        raise ModelUnavailable(
            f"{ref.head()}: is a folder, expected a weights file. Fix: name the file itself",
            setting=ref.setting,
        )
    if p.stat().st_size == 0:
        raise ModelUnavailable(f"{ref.head()}: the file is empty. Fix: copy it again", ref.setting)
    return Resolved(ref, str(p), "local", files=[p.name], size=p.stat().st_size)


def url_destination(ref: ModelRef, cache: ModelCache) -> Path:
    """Where torch.hub.load_state_dict_from_url(url) keeps ``url``: its checkpoints folder + the URL's file name."""
    from urllib.parse import urlparse

    return cache.url_dir / os.path.basename(urlparse(ref.source).path)


def _sidecar(dest: Path) -> Path:
    return dest.with_name(dest.name + ".source.json")


def _locate_url(ref: ModelRef, cache: ModelCache) -> Resolved:
    dest = url_destination(ref, cache)
    if not dest.is_file():
        raise _NotThere(f"not downloaded into {dest.parent}")
    meta = _read_json(_sidecar(dest))
    if meta and meta.get("url") != ref.source:
        raise ModelUnavailable(
            f"{ref.head()}: {dest} already holds a download of {meta.get('url')} (torch.hub names "
            f"cached files by the URL's file name). Fix: download one of them yourself and set {ref.setting} to its path",
            setting=ref.setting,
        )
    return Resolved(ref, str(dest), "cached", files=[dest.name], size=dest.stat().st_size)


def _locate_hf(ref: ModelRef, cache: ModelCache) -> Resolved:
    storage = _hf_storage(cache, ref.source)
    commit = _hf_commit(storage, ref.revision)
    if ref.commit:  # locked: the cache must hold that commit, and its ref must name it (loaders read the ref)
        if commit and commit != ref.commit:
            rev = ref.revision or "main"
            raise LockMismatch(
                f"{ref.head()}: the model cache {cache.hub_dir} has {rev} at commit {commit}, models.lock pins "
                f"{ref.commit}. Fix: run `paradiffusion models fetch` (puts the locked commit in the cache), or "
                "`paradiffusion models fetch --update` to lock the newest commit",
                ref.setting,
            )
        commit = ref.commit
    snapshot = storage / "snapshots" / commit if commit else None
    if snapshot is None or not snapshot.is_dir():
        raise _NotThere(f"not in the model cache {cache.hub_dir}")
    if any(kind == "pipeline" for _, kind in _parts(ref)):
        path = _pipeline_download(ref, cache, local_only=True)
        files = _View(root=Path(path)).all_files("")
        return Resolved(ref, path, "cached", commit, files, _sizes(Path(path), files))
    tree = _cached_tree(storage, commit)
    if tree is not None:
        files = select_files(tree, ref)
        absent = [f for f in files if not (snapshot / f).is_file()]
        if absent:
            raise _NotThere(f"incomplete in the model cache {cache.hub_dir}: missing {_list(absent)}")
    else:
        files = [f for folder, _ in _parts(ref) for f in _View(root=snapshot).all_files(folder)]
    missing = missing_files(_View(root=snapshot), ref)
    if missing:
        raise _NotThere(f"incomplete in the model cache {cache.hub_dir}: missing {_list(missing)}")
    if ref.commit and _hf_commit(storage, ref.revision) is None:  # fetched by commit: give loaders the ref
        _write_ref(storage, ref.revision, ref.commit)
    path = snapshot / ref.subfolder if ref.subfolder else snapshot
    return Resolved(ref, str(path), "cached", commit, files, _sizes(snapshot, files))


def _locate_unmanaged(ref: ModelRef, cache: ModelCache) -> Resolved:
    return Resolved(ref, None, "not managed")


_LOCATORS = {
    "folder": _locate_folder,
    "file": _locate_file,
    "url": _locate_url,
    "hf": _locate_hf,
    "unmanaged": _locate_unmanaged,
}


def _list(items: list[str], n: int = 4) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def _layout_name(ref: ModelRef) -> str:
    return " + ".join(dict.fromkeys(LAYOUTS[k].describe for _, k in _parts(ref)))


def _read_json(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- downloads
def download(ref: ModelRef, cache: ModelCache) -> None:
    """Fetch ``ref`` into the cache (online); raises what the download raised."""
    if ref.kind == "hf":
        _download_hf(ref, cache)
    elif ref.kind == "url":
        download_url(ref.source, url_destination(ref, cache))
    else:  # pragma: no cover - callers only download remote kinds
        raise ValueError(f"nothing to download for a {ref.kind} model")


def _download_hf(ref: ModelRef, cache: ModelCache) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    revision = ref.commit or ref.revision  # a locked model: exactly its commit
    info = api.repo_info(ref.source, revision=revision, timeout=HTTP_TIMEOUT)  # fails fast: 404, no network
    if any(kind == "pipeline" for _, kind in _parts(ref)):
        _pipeline_download(ref, cache, local_only=False)
    else:
        _download_files(api, info, ref, cache, revision)
    if ref.commit:  # downloaded by commit: huggingface_hub leaves the branch's ref alone; the lock decides it
        _write_ref(_hf_storage(cache, ref.source), ref.revision, ref.commit)


def _download_files(api, info, ref: ModelRef, cache: ModelCache, revision: str | None) -> None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.hf_api import RepoFile

    listing = [
        f.path for f in api.list_repo_tree(ref.source, recursive=True, revision=info.sha) if isinstance(f, RepoFile)
    ]
    lacking = missing_files(_View(listing=listing), ref)
    if lacking:
        raise _RepoLacks(lacking, info.sha)
    files = select_files(listing, ref)
    if getattr(info, "gated", False) and files:  # one HEAD says whether this account may download, before any bar
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        get_hf_file_metadata(hf_hub_url(ref.source, files[0], revision=info.sha), timeout=HTTP_TIMEOUT)
    log.info("downloading %s (%d files) into %s", ref.describe(), len(files), cache.hub_dir)
    snapshot_download(
        ref.source,
        revision=revision,
        cache_dir=str(cache.hub_dir),
        allow_patterns=[_glob_escape(f) for f in files],
        etag_timeout=HTTP_TIMEOUT,
    )


class _RepoLacks(Exception):
    def __init__(self, missing: list[str], commit: str):
        super().__init__(", ".join(missing))
        self.missing, self.commit = missing, commit


def _glob_escape(path: str) -> str:
    # allow_patterns are fnmatch patterns; an exact path must not be read as one.
    return re.sub(r"([\[\]*?])", r"[\1]", path)


def _pipeline_download(ref: ModelRef, cache: ModelCache, local_only: bool) -> str:
    """A diffusers pipeline: diffusers chooses its files (components, no unused variants), as from_pretrained does."""
    from diffusers import DiffusionPipeline

    try:
        return str(
            DiffusionPipeline.download(
                ref.source,
                revision=ref.commit or ref.revision,
                cache_dir=str(cache.hub_dir),
                local_files_only=local_only,
            )
        )
    except (OSError, ValueError) as exc:
        if local_only:
            raise _NotThere(f"incomplete in the model cache {cache.hub_dir} ({_first_line(exc)})") from None
        raise


def download_url(url: str, dest: Path, timeout: float = HTTP_TIMEOUT, progress: bool = True) -> Path:
    """Download ``url`` to ``dest``: resumable, atomic, with a progress bar and a recorded sha256.

    Bytes go to ``dest.part``; a rerun after a kill asks for the rest (HTTP Range, with
    If-Range so a changed file starts over). The complete file is renamed into place and
    ``dest.source.json`` records the URL, size and sha256 (``models check`` verifies them).
    urllib is enough for one file and keeps this dependency-free; huggingface_hub's
    downloader only speaks to Hub endpoints.
    """
    import urllib.error
    import urllib.request

    from paradiffusion.stage import progress as bar

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    part_meta = dest.with_name(dest.name + ".part.json")
    meta = _read_json(part_meta) or {}
    offset = part.stat().st_size if part.is_file() and meta.get("url") == url else 0
    if offset == 0:
        part.unlink(missing_ok=True)
    headers = {"User-Agent": "paradiffusion-toolkit", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if meta.get("etag") or meta.get("last_modified"):
            headers["If-Range"] = meta.get("etag") or meta.get("last_modified")
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # nothing left to send: the part may already be complete
            total = _remote_size(url, timeout)
            if total == offset:
                return _finish_download(url, part, part_meta, dest, meta)
            part.unlink(missing_ok=True)
            part_meta.unlink(missing_ok=True)
            return download_url(url, dest, timeout, progress)
        raise
    with resp:
        if resp.status == 206 and offset:
            start = int(re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", "bytes 0-")).group(1))
            if start != offset:
                raise OSError(f"the server resumed at byte {start}, not {offset}")
            mode = "ab"
        else:
            offset, mode = 0, "wb"
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        meta = {"url": url, "etag": resp.headers.get("ETag"), "last_modified": resp.headers.get("Last-Modified")}
        part_meta.write_text(json.dumps(meta))
        if offset:
            log.info("resuming %s at %.1f MB", dest.name, offset / 1e6)
        with (
            open(part, mode) as out,
            bar(iter(()), total=total, desc=dest.name, unit="B", unit_scale=True, disable=not progress) as pbar,
        ):
            pbar.update(offset)
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                out.write(chunk)
                pbar.update(len(chunk))
    got = part.stat().st_size
    if total is not None and got != total:
        raise OSError(f"the connection closed after {got} of {total} bytes; rerun to resume")
    return _finish_download(url, part, part_meta, dest, meta)


def _remote_size(url: str, timeout: float) -> int | None:
    import urllib.request

    req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "paradiffusion-toolkit"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        n = r.headers.get("Content-Length")
        return int(n) if n is not None else None


def _finish_download(url: str, part: Path, part_meta: Path, dest: Path, meta: dict) -> Path:
    digest = sha256_file(part)
    os.replace(part, dest)
    record = {
        "url": url,
        "size": dest.stat().st_size,
        "sha256": digest,
        "etag": meta.get("etag"),
        "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp = _sidecar(dest).with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, _sidecar(dest))
    part_meta.unlink(missing_ok=True)
    return dest


def sha256_file(path: Path, pbar=None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            if pbar is not None:
                pbar.update(len(chunk))
    return h.hexdigest()
