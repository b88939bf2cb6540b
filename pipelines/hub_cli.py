"""``paradiffusion models fetch|check``: fill one model cache where there is network, verify it where there is none.

Both read the models each stage declares for the resolved config (``Command.models``),
so what is fetched is exactly what the stages will resolve:

```
paradiffusion models fetch [--stages filter caption ...]   # download into models.cache_dir; resumable
paradiffusion models fetch --update                         # move models.lock to each branch's newest commit
paradiffusion models check [--stages ...] [--quick]         # offline: present, complete, hashes, loadable
```

``fetch`` writes ``models.lock`` (the ``models.lock`` setting; pipelines.yaml names
``models.lock`` beside it, meant to be checked in): the commit each Hub model resolved to. A model already
in the lock is fetched at its locked commit; one that is not yet there is resolved on the
Hub (a branch such as ``main`` to its newest commit) and added. ``--update`` resolves every
Hub model's branch again and rewrites the lock with the newest commits. Every later run,
on any node, loads exactly the locked commits. ``fetch`` downloads only what is missing
and ends with a table: model, revision, files, size, status. ``check`` never touches a network: every file a loader
reads must be present, match the size and hash the Hub published for it (huggingface_hub
caches the repository listing, with LFS sha256 and git blob ids, at download time; URL
downloads record their sha256 beside the file), and weights must be readable (a
safetensors header that fits the file, a torch zip archive with its directory, JSON that
parses).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zipfile
from pathlib import Path

from paradiffusion import hub
from paradiffusion.cli import Command, load_command
from paradiffusion.config import ConfigError
from paradiffusion.log import get_logger
from pipelines.config import PipelinesConfig

log = get_logger("models")


# --------------------------------------------------------------------------- what the stages declare
def declared_models(
    cfg: PipelinesConfig, stages: list[str] | None
) -> tuple[list[tuple[hub.ModelRef, list[str], list[str]]], list[str]]:
    """(model, settings, commands) for every distinct model the chosen commands declare; plus declaration errors."""
    from pipelines.cli import COMMANDS

    with_models = {n: load_command(t) for n, t in COMMANDS.items() if load_command(t).models is not None}
    unknown = sorted(set(stages or []) - set(with_models))
    if unknown:
        raise ConfigError(
            f"models --stages: {', '.join(unknown)} declare no models (commands that do: {', '.join(with_models)})"
        )
    refs: list[tuple[str, hub.ModelRef]] = []
    problems: list[str] = []
    for name, cmd in with_models.items():
        if stages and name not in stages:
            continue
        try:
            refs += [(name, r) for r in cmd.models(cfg, None)]
        except (ConfigError, hub.ModelUnavailable) as exc:
            problems.append(f"{name}: {' '.join(str(exc).split())}")
    grouped: dict[tuple, tuple[hub.ModelRef, list[str], list[str]]] = {}
    for name, r in refs:
        ref, settings, cmds = grouped.setdefault(r.key, (r, [], []))
        if r.setting not in settings:
            settings.append(r.setting)
        if name not in cmds:
            cmds.append(name)
    return list(grouped.values()), problems


# --------------------------------------------------------------------------- fetch
def run_fetch(cfg: PipelinesConfig, args: argparse.Namespace) -> int:
    if cfg.models.offline or hub.env_offline():
        raise ConfigError(
            "models fetch downloads, but downloads are off (models.offline or HF_HUB_OFFLINE=1); unset them here, "
            "or run `paradiffusion models check` to verify what is cached"
        )
    cache = hub.model_cache(cfg.models)
    lock = hub.ModelsLock.read(cfg.models.lock)
    models, problems = declared_models(cfg, args.stages)
    if not args.update:  # a locked model is fetched at its locked commit, never at its branch's newest
        models = [(hub.pin([r], lock)[0][0], s, c) for r, s, c in models]
    print(f"== models fetch: {len(models)} model(s) into {cache}", file=sys.stderr)
    locked: dict[str, dict] = {}  # lock key -> {commit, settings} of what this fetch resolved
    declared: set[str] = set()
    rows: list[list[str]] = []
    failures = list(problems)
    notes: list[str] = []
    queue = list(models)
    seen: set[tuple] = set()
    total = 0
    while queue:
        ref, settings, cmds = queue.pop(0)
        if ref.key in seen:
            continue
        seen.add(ref.key)
        if hub.movable(ref):
            declared.add(hub.lock.lock_key(ref.source, ref.revision))
        res, status, before = None, "", None
        try:
            if ref.kind == "unmanaged":
                status = "not managed"
                notes.append(f"{ref.setting} = {ref.source}: {ref.note}")
            elif ref.kind in ("folder", "file"):
                res = hub.locate(ref, cache)
                status = "local"
            else:
                before = _try_locate(ref, cache)
                if ref.kind == "url" and before is not None:
                    res = before
                else:
                    print(f"-- {ref.describe()} ({', '.join(settings)})", file=sys.stderr)
                    hub.download(ref, cache)
                    res = hub.locate(ref, cache)
                fresh = before is not None and before.commit == res.commit and before.size == res.size
                status = "up to date" if fresh else "downloaded"
                damaged = verify(res, cache, hashes=args.repair)
                if damaged:  # a cached file that does not match what was published: replace it
                    for path, why in damaged:
                        print(f"   replacing {path.name}: {why}", file=sys.stderr)
                        _remove_cached(path)
                    hub.download(ref, cache)
                    res = hub.locate(ref, cache)
                    still = verify(res, cache, hashes=True)
                    if still:
                        raise hub.ModelUnavailable(f"{ref.head()}: {still[0][1]} even after a new download")
                    status = "repaired"
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is one line in the summary
            line = str(exc) if isinstance(exc, hub.ModelUnavailable) else hub.explain(exc, ref, cache)
            if ref.kind in ("folder", "file"):  # not fetch's to fix: said, not failed
                status = "local: missing"
                notes.append(line)
            elif before is not None and res is None:  # the Hub said no, but a complete copy is cached
                res, status = before, "cached (not refreshed)"
                notes.append(line)
            else:
                status = "FAILED"
                failures.append(line)
        if res is not None:
            total += res.size if status != "local" else 0
            for extra in hub.follow_ups(res):
                queue.append((extra if args.update else hub.pin([extra], lock)[0][0], [extra.setting], cmds))
            if hub.movable(ref) and res.commit:
                entry = locked.setdefault(hub.lock.lock_key(ref.source, ref.revision), {"commit": res.commit})
                entry["settings"] = sorted({*entry.get("settings", []), *settings})
        rows.append(_row(ref, settings, cmds, res, status))
    _print_table(["commands", "setting", "model", "revision", "files", "size", "status"], rows)
    print(f"   cache: {cache}; {hub.human_size(total)} of downloaded models in all", file=sys.stderr)
    if lock.path is not None:
        _write_lock(lock, locked, declared, replace_all=not args.stages)
    for n in notes:
        print(f"   note: {n}", file=sys.stderr)
    for f in failures:
        print(f"error: {f}", file=sys.stderr)
    if failures:
        print("rerun the same command to resume: finished files are kept", file=sys.stderr)
    return 1 if failures else 0


def _write_lock(lock: hub.ModelsLock, fetched: dict[str, dict], declared: set[str], replace_all: bool) -> None:
    """Record the fetched commits; models that failed keep their entry; without --stages, drop undeclared ones."""
    before = {k: v["commit"] for k, v in lock.entries.items()}
    # a declared model that failed this time keeps its entry; without --stages, undeclared ones go
    entries = {k: v for k, v in lock.entries.items() if not replace_all or k in declared}
    entries.update(fetched)
    lock.entries = entries
    lock.write()
    changed = sorted(k for k, v in entries.items() if before.get(k) != v["commit"])
    dropped = sorted(set(before) - set(entries))
    what = f"{len(changed)} new or changed" + (f", {len(dropped)} dropped" if dropped else "")
    print(f"   lock: {lock.path} ({len(entries)} Hub model(s); {what})", file=sys.stderr)
    for k in changed:
        old = before.get(k)
        print(f"   lock: {k} {old[:12] + ' -> ' if old else ''}{entries[k]['commit'][:12]}", file=sys.stderr)


def _remove_cached(path: Path) -> None:
    """Delete a cached file (the blob a Hub snapshot links to, and the link; a URL download and its record),
    so the next download replaces it."""
    real = Path(os.path.realpath(path))
    for p in {real, path, hub._sidecar(path)}:
        p.unlink(missing_ok=True)


def _try_locate(ref: hub.ModelRef, cache: hub.ModelCache) -> hub.Resolved | None:
    try:
        return hub.locate(ref, cache)
    except (hub._NotThere, hub.ModelUnavailable):
        return None


def _row(ref, settings, cmds, res: hub.Resolved | None, status: str) -> list[str]:
    revision = ref.revision or ("main" if ref.kind == "hf" else "")
    if res is not None and res.commit:
        revision = f"{revision} ({res.commit[:12]})" if revision != res.commit else res.commit[:12]
    model = ref.describe() if not ref.note or ref.kind != "hf" else f"{ref.describe()} ({ref.note})"
    return [
        ",".join(cmds),
        ",".join(settings),
        model,
        revision,
        str(len(res.files)) if res is not None and res.files else "",
        hub.human_size(res.size) if res is not None and res.size else "",
        status,
    ]


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    for line in [header, *rows]:
        print("   " + "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip(), file=sys.stderr)


# --------------------------------------------------------------------------- check
def run_check(cfg: PipelinesConfig, args: argparse.Namespace) -> int:
    cache = hub.model_cache(cfg.models)
    hub.go_offline()  # a check never touches a network
    lock = hub.ModelsLock.read(cfg.models.lock)
    models, problems = declared_models(cfg, args.stages)
    models = [(hub.pin([r], lock)[0][0], s, c) for r, s, c in models]  # the locked commits are what runs load
    print(f"== models check: {len(models)} model(s) in {cache} (offline)", file=sys.stderr)
    rows: list[list[str]] = []
    failures = list(problems)
    queue = list(models)
    seen: set[tuple] = set()
    located: list[tuple[hub.Resolved, list[str], list[str]]] = []
    while queue:
        ref, settings, cmds = queue.pop(0)
        if ref.key in seen:
            continue
        seen.add(ref.key)
        try:
            res = hub.locate(ref, cache)
        except hub.ModelUnavailable as exc:
            failures.append(str(exc))
            rows.append(_row(ref, settings, cmds, None, "MISSING"))
            continue
        except hub._NotThere as miss:
            failures.append(f"{ref.head()}: {miss.detail}. Fix: run `paradiffusion models fetch`")
            rows.append(_row(ref, settings, cmds, None, "MISSING"))
            continue
        located.append((res, settings, cmds))
        for extra in hub.follow_ups(res):
            queue.append((hub.pin([extra], lock)[0][0], [extra.setting], cmds))
    to_hash = sum(r.size for r, _, _ in located) if not args.quick else 0
    from paradiffusion.stage import progress

    with progress(iter(()), total=to_hash, desc="verifying", unit="B", unit_scale=True, disable=not to_hash) as bar:
        for res, settings, cmds in located:
            if res.ref.kind == "unmanaged":
                rows.append(_row(res.ref, settings, cmds, res, "not managed"))
                continue
            bad = verify(res, cache, hashes=not args.quick, pbar=bar)
            for _, why in bad:
                failures.append(
                    f"{res.ref.head()}: {why}. Fix: run `paradiffusion models fetch --repair` where there is "
                    "network (it replaces files that fail this check)"
                )
            rows.append(_row(res.ref, settings, cmds, res, "CORRUPT" if bad else "ok"))
    _print_table(["commands", "setting", "model", "revision", "files", "size", "status"], rows)
    for f in failures:
        print(f"error: {f}", file=sys.stderr)
    return 1 if failures else 0


def verify(res: hub.Resolved, cache: hub.ModelCache, hashes: bool = True, pbar=None) -> list[tuple[Path, str]]:
    """(file, problem) for a located model's files: size and hash against what was published, readability."""
    ref = res.ref
    problems: list[tuple[Path, str]] = []
    if ref.kind == "hf":
        storage = hub._hf_storage(cache, ref.source)
        snapshot = storage / "snapshots" / res.commit
        tree = hub._cached_tree(storage, res.commit) or {}
        for rel in res.files:
            entry = tree.get(rel)
            path = snapshot / rel
            if entry is not None:
                sha256 = entry.lfs_sha256
                git_sha1 = None if sha256 else entry.blob_id
                size = entry.size
            else:  # no cached listing (downloaded by a loader): the blob's name is the hash the Hub sent (ETag)
                blob = os.path.basename(os.path.realpath(path))
                sha256 = blob if hub._HEX64.match(blob) else None
                git_sha1 = blob if hub._SHA.match(blob) else None
                size = None
            problems += _verify_file(path, rel, size, sha256 if hashes else None, git_sha1 if hashes else None, pbar)
    elif ref.kind == "url":
        path = Path(res.path)
        meta = hub._read_json(hub._sidecar(path)) or {}
        sha = meta.get("sha256") if hashes else None
        problems += _verify_file(path, path.name, meta.get("size"), sha, None, pbar)
    else:
        root = Path(res.path)
        for rel in res.files or [""]:
            p = root / rel if rel and root.is_dir() else root
            problems += _verify_file(p, rel or root.name, None, None, None, pbar)
    return problems


def _verify_file(
    path: Path, rel: str, size: int | None, sha256: str | None, git_sha1: str | None, pbar=None
) -> list[tuple[Path, str]]:
    return [(path, why) for why in _file_problems(path, rel, size, sha256, git_sha1, pbar)]


def _file_problems(
    path: Path, rel: str, size: int | None, sha256: str | None, git_sha1: str | None, pbar=None
) -> list[str]:
    if not path.is_file():
        return [f"{rel} is missing"]
    actual = path.stat().st_size
    if size is not None and actual != size:
        if pbar is not None:
            pbar.update(actual)
        return [f"{rel} has {actual} bytes, the Hub published {size} (truncated or altered)"]
    problem = _unreadable(path)
    if problem:
        if pbar is not None:
            pbar.update(actual)
        return [f"{rel}: {problem}"]
    if sha256:
        got = hub.sha256_file(path, pbar)
        if got != sha256:
            return [f"{rel}: sha256 {got[:12]}... differs from the published {sha256[:12]}..."]
    elif git_sha1 and actual < 64 << 20:
        from huggingface_hub.utils.sha import git_hash

        got = git_hash(path.read_bytes())
        if pbar is not None:
            pbar.update(actual)
        if got != git_sha1:
            return [f"{rel}: git blob hash {got[:12]}... differs from the published {git_sha1[:12]}..."]
    elif pbar is not None:
        pbar.update(actual)
    return []


def _unreadable(path: Path) -> str | None:
    """Why a weights/config file cannot be loaded, read from its structure (no hash needed)."""
    name = path.name
    try:
        if name.endswith(".safetensors"):
            size = path.stat().st_size
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if n <= 0 or 8 + n > size:
                    return "safetensors header runs past the end of the file (truncated)"
                header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + n + end != size:
                return f"safetensors data should end at byte {8 + n + end} but the file has {size} (truncated)"
        elif name.endswith(".json"):
            json.loads(path.read_text())
        elif name.endswith((".bin", ".pth", ".pt", ".ckpt")):
            with open(path, "rb") as f:
                magic = f.read(4)
            if magic == b"PK\x03\x04":  # torch.save's zip format; a cut-off file loses its central directory
                with zipfile.ZipFile(path) as z:
                    z.namelist()
    except (ValueError, KeyError, TypeError, zipfile.BadZipFile, OSError) as exc:
        return f"cannot be read ({type(exc).__name__}: {hub._first_line(exc, 100)})"
    return None


# --------------------------------------------------------------------------- the command
def _run(cfg: PipelinesConfig, args: argparse.Namespace) -> int:
    return {"fetch": run_fetch, "check": run_check}[args.action](cfg, args)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "action",
        choices=["fetch", "check"],
        help="fetch: download every model the config names into models.cache_dir at the commits models.lock "
        "holds, and record the commits of models not yet locked there (needs network; resumable; --update moves "
        "every lock entry to its branch's newest commit); "
        "check: verify offline that each is present, complete and matches its published hashes",
    )
    p.add_argument(
        "--stages",
        nargs="+",
        metavar="COMMAND",
        default=None,
        help="only the models of these commands (e.g. filter caption train eval-generate eval); default: all",
    )
    p.add_argument("--quick", action="store_true", help="check: skip hashing (presence, sizes, headers only)")
    p.add_argument(
        "--update",
        action="store_true",
        help="fetch: resolve every Hub model's branch to its newest commit and rewrite models.lock with them "
        "(without it, a model already in the lock is fetched at its locked commit)",
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help="fetch: also hash every cached file and download again the ones that differ from the published hash "
        "(without it, fetch replaces files whose size or structure is wrong)",
    )


MODELS = Command(
    help="fetch every model the config names into one cache folder at the commits models.lock holds (make models; "
    "--update moves the lock to the newest commits), or check it offline",
    run=_run,
    add_arguments=_arguments,
)
