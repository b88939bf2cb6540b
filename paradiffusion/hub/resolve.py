"""Resolve a command's models before it runs: locate, else download, else one line (explain)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from paradiffusion.hub.cache import ModelCache, _export, env_offline, go_offline, model_cache
from paradiffusion.hub.layouts import _parts
from paradiffusion.hub.locate import Resolved, _list, _read_json, _RepoLacks, dedupe, download, locate
from paradiffusion.hub.lock import ModelsLock, export_commits, movable, pin
from paradiffusion.hub.refs import ModelRef, ModelUnavailable, _first_line, _NotThere, model_ref
from paradiffusion.log import get_logger

if TYPE_CHECKING:
    from paradiffusion.config import ModelsConfig

log = get_logger("models")


# --------------------------------------------------------------------------- the one line
def _chain(exc: BaseException) -> list[BaseException]:
    out, seen = [], set()
    while exc is not None and id(exc) not in seen:
        out.append(exc)
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return out


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def explain(exc: BaseException, ref: ModelRef, cache: ModelCache) -> str:
    """The one line for a failed download of ``ref``: setting, what was tried, the fix."""
    import urllib.error
    from urllib.parse import urlparse

    from huggingface_hub import errors as hf

    head = ref.head()
    local_fix = f"set {ref.setting} to a local copy"
    chain = _chain(exc)

    def find(*types):
        return next((e for e in chain if isinstance(e, types)), None)

    if isinstance(exc, _RepoLacks):
        return (
            f"{head}: the repository (commit {exc.commit[:12]}) has no {_list(exc.missing)}. "
            f"Fix: check the id{' and subfolder' if ref.subfolder else ''} in {ref.setting}, or {local_fix}"
        )
    status = ""
    if (e := find(hf.HfHubHTTPError)) is not None and getattr(e, "response", None) is not None:
        status = f"{e.response.status_code} {e.response.headers.get('X-Error-Code') or ''}".strip()
    page = f"{_endpoint()}/{ref.source}" if ref.kind == "hf" else ref.source
    if find(hf.GatedRepoError):
        return (
            f"{head}: a gated repository; downloading it needs an accepted licence and a token (the Hub answered "
            f"{status or 'GatedRepo'}). Fix: accept the licence on {page} with your account, then run `hf auth "
            f"login` or set HF_TOKEN; or {local_fix}"
        )
    if find(hf.RevisionNotFoundError):
        where = ref.revision_setting or f"the revision of {ref.setting}"
        return (
            f"{head}: {ref.source} has no revision {ref.revision!r} ({status or '404 RevisionNotFound'}). "
            f"Fix: check {where}: a branch, tag or commit SHA from {page} > Files and versions"
        )
    if find(hf.RepositoryNotFoundError):
        return (
            f"{head}: no model repository {ref.source} on {_endpoint()} ({status or '404 RepoNotFound'}; a private "
            f"repository also needs a token) and no local folder of that name. Fix: check the id in {ref.setting} "
            "(owner/name, as on the model page), or set it to a local folder"
        )
    if (e := find(hf.RemoteEntryNotFoundError)) is not None:
        return (
            f"{head}: a file it needs is not in the repository ({status or '404 EntryNotFound'}: "
            f"{_first_line(e, 120)}). Fix: check {ref.setting}"
            f"{' and its subfolder' if ref.subfolder else ''}, or {local_fix}"
        )
    if (e := find(urllib.error.HTTPError)) is not None:
        return (
            f"{head}: the server answered HTTP {e.code} {e.reason}. Fix: check the URL, or download the file "
            f"elsewhere and set {ref.setting} to its path"
        )
    offline = find(hf.OfflineModeIsEnabled)
    network = offline or find(*_network_errors())
    if network is not None:
        where = _endpoint() if ref.kind == "hf" else urlparse(ref.source).netloc
        what = "offline mode is on" if offline else f"{where} cannot be reached ({_first_line(network, 100)})"
        return (
            f"{head}: not in the model cache {cache.hub_dir if ref.kind == 'hf' else cache.url_dir} and {what}. "
            f"Fix: {local_fix}, or run `paradiffusion models fetch` on a machine with network and point "
            "models.cache_dir at the fetched folder"
        )
    if (e := find(hf.HfHubHTTPError)) is not None:
        return (
            f"{head}: the Hub answered {status or 'an error'} ({_first_line(e, 160)}). "
            "Fix: check the id and your access, or rerun later"
        )
    return f"{head}: download failed ({type(exc).__name__}: {_first_line(exc)}). Fix: rerun to resume, or {local_fix}"


def _network_errors() -> tuple[type[BaseException], ...]:
    import socket
    import urllib.error

    types: list[type[BaseException]] = [urllib.error.URLError, socket.timeout, ConnectionError, TimeoutError]
    for mod in ("httpx2", "httpx"):
        m = sys.modules.get(mod)
        if m is not None:
            types += [m.ConnectError, m.TimeoutException, m.NetworkError]
    return tuple(types)


def _offline_line(ref: ModelRef, cache: ModelCache, detail: str, why: str) -> str:
    head = ref.head()
    return (
        f"{head}: {detail}, and downloads are off ({why}). Fix: run `paradiffusion models fetch` where there is "
        f"network (same models.cache_dir), or set {ref.setting} to a local copy"
    )


# --------------------------------------------------------------------------- resolve
def resolve(
    refs: Iterable[ModelRef],
    cache: ModelCache,
    *,
    offline: bool,
    offline_reason: str = "HF_HUB_OFFLINE=1",
    lock: ModelsLock | None = None,
) -> list[Resolved]:
    """Find every model, downloading what is missing unless ``offline``; the first failure raises ModelUnavailable.

    With ``lock``, each Hub model it holds is found (or downloaded) at its locked commit.
    """
    out: list[Resolved] = []
    queue = dedupe(refs)
    done: set[tuple] = set()
    while queue:
        ref, settings = queue.pop(0)
        done.add(ref.key)
        if lock is not None:
            ref = pin([ref], lock)[0][0]
        try:
            res = locate(ref, cache)
        except _NotThere as miss:
            if offline:
                raise ModelUnavailable(_offline_line(ref, cache, miss.detail, offline_reason), ref.setting) from None
            t0 = time.time()
            try:
                download(ref, cache)
                res = locate(ref, cache)
            except ModelUnavailable:
                raise
            except _NotThere as still:
                raise ModelUnavailable(
                    f"{ref.head()}: downloaded, but {still.detail}. Fix: rerun to resume",
                    ref.setting,
                ) from None
            except Exception as exc:  # noqa: BLE001 - every failure becomes its one line
                raise ModelUnavailable(explain(exc, ref, cache), ref.setting) from None
            res.action = "downloaded"
            log.info(
                "%s: downloaded %s (%s) in %.0f s", ref.setting, ref.describe(), human_size(res.size), time.time() - t0
            )
        res.settings = settings
        out.append(res)
        for extra in follow_ups(res):
            if extra.key not in done:
                queue.append((extra, [extra.setting]))
    return out


def follow_ups(res: Resolved) -> list[ModelRef]:
    """Models a resolved one names in its own files: the HF tokenizer of an open_clip hf-hub model."""
    if res.path is None or not any(k == "open_clip" for _, k in _parts(res.ref)) or res.ref.kind != "hf":
        return []
    cfg = _read_json(Path(res.path) / "open_clip_config.json") or {}
    tok = ((cfg.get("model_cfg") or {}).get("text_cfg") or {}).get("hf_tokenizer_name")
    if not tok:
        return []
    return [
        model_ref(
            res.ref.setting, tok, layout=("tokenizer",), note=f"the tokenizer of {res.ref.value or res.ref.source}"
        )
    ]


def resolve_for_run(cfg: ModelsConfig, refs: list[ModelRef]) -> list[Resolved]:
    """What ``paradiffusion <stage>`` does before the stage: resolve, then go offline for the run."""
    if not refs:
        return []
    t0 = time.time()
    cache = model_cache(cfg)
    offline = cfg.offline or env_offline()
    reason = "models.offline: true" if cfg.offline else "HF_HUB_OFFLINE=1"
    lock = ModelsLock.read(cfg.lock)
    resolved = resolve(refs, cache, offline=offline, offline_reason=reason, lock=lock)
    for r in resolved:
        what = f" ({r.ref.note})" if r.ref.note and r.path else ""
        at = f" @ {r.commit[:12]}{' (locked)' if r.ref.commit else ''}" if r.ref.kind == "hf" and r.commit else ""
        log.info("%s: %s %s%s%s", ", ".join(r.settings), r.action, r.path or r.ref.note, at, what)
    unlocked = [r for r in resolved if lock.path is not None and movable(r.ref) and not r.ref.commit]
    if unlocked:
        log.warning(
            "not in %s (resolved to the cache's newest commit of their branch): %s; run `paradiffusion models "
            "fetch` to lock them",
            lock.path,
            ", ".join(f"{r.ref.source}@{r.ref.revision or 'main'}" for r in unlocked),
        )
    records = [
        {"model": r.ref.source, "revision": r.ref.revision, "commit": r.commit, "settings": r.settings}
        for r in resolved
        if r.ref.kind == "hf" and r.commit
    ]
    for name, value in export_commits(records).items():  # workers and ranks load (and record) these commits
        _export(name, value)
    if all(r.ref.kind != "unmanaged" for r in resolved):
        go_offline()
    else:
        log.info("some models are fetched by their own packages: the run keeps Hub access")
    log.info("models resolved in %.1f s (cache %s)", time.time() - t0, cache)
    return resolved


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover
