"""Importing annotations: a file (or a pull) reconciled with the store's current texts.

For each (key, annotator) the store has a *current* version: the annotator's latest row
(:func:`captioning.small.texts.texts_sql`, not ``superseded``). An import compares each
annotation of the file with it:

- the same text as the current version: nothing to do (``already_imported``);
- older than the current version (an earlier export imported again): nothing to do (``stale``);
- otherwise (a new text, an edit, or a revert to an earlier text): a new version, ``submitted``
  (or ``draft``), whose review starts again.

A **pull** (``reconcile=True``) also knows that the export holds every annotation of the
project: a Label Studio annotator whose current text on a task is not in it any more (the
annotation was deleted, or turned into a skip) gets a ``withdrawn`` version. A withdrawn text
cannot be approved and never reaches ``small_train``; writing on the task again is a new version.
Plain CSV / JSONL imports and file imports never withdraw: a file may hold part of the work.

**Skips and tasks without text** are counted the same in every shape (``cancelled_annotation``
per skip, ``not_annotated`` per task with no text): from the file for JSON, from the server's
task list for a JSON-MIN pull (JSON-MIN leaves skipped tasks out). A JSON-MIN file imported on its
own cannot show them; the import says so once.

The import goes through the table writer contract: leftovers of a killed import are removed
first, this run's settings are recorded before its shard, the shard is committed by its marker.
The terminal gets one line per reason with a count; every problem, with its line, goes to the
run's log file (``<annotations>/_logs/import-<time>.log``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
from collections import Counter
from dataclasses import dataclass

import fsspec

from captioning.small import labelstudio as ls
from captioning.small.annotations import (
    ALREADY_IMPORTED,
    DUPLICATE_IN_FILE,
    UNKNOWN_ANNOTATOR,
    UNKNOWN_KEY,
    AnnotationStore,
    ImportRefused,
    annotations_url,
    content_hash,
    known_keys,
)
from paradiffusion.config import RootConfig
from paradiffusion.log import get_logger, stage_log_path
from paradiffusion.stage import StageSummary, announce

log = get_logger("captioning.small.annotations")

STALE = "stale"  # older than the annotator's current version (an earlier export imported again)
WITHDRAWN = "withdrawn"  # the state of a version that says: this annotator has no text here any more

#: reasons that are routine on every pull: counted, not warned about
QUIET = (ALREADY_IMPORTED, STALE, ls.NOT_ANNOTATED, ls.CANCELLED)


@dataclass
class ImportResult:
    summary: StageSummary
    problems: list[ls.Problem]
    shard: str | None
    log_file: str | None = None

    @property
    def not_annotated(self) -> list[ls.Problem]:
        """Tasks without a text (nobody annotated them, or only skips); their positions are in ``ref``."""
        return [p for p in self.problems if p.reason == ls.NOT_ANNOTATED]


def _read(path: str) -> tuple[bytes, str]:
    try:
        with fsspec.open(path, "rb") as f:
            raw = f.read()
    except (OSError, ValueError) as exc:
        raise ImportRefused(f"{path}: cannot read: {exc}") from exc
    try:
        return raw, raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ImportRefused(f"{path}: not UTF-8 text (byte {exc.start})") from exc


def import_file(
    cfg: RootConfig,
    path: str,
    users: dict[str, str] | None = None,
    *,
    reconcile: bool = False,
    tasks: list[ls.TaskInfo] | None = None,
) -> ImportResult:
    """Import one Label Studio export (JSON or JSON-MIN) / CSV / JSONL as one committed shard.

    ``users`` maps annotator identities (``labelstudio:<id>``) to emails (the server's user list
    on a pull). ``reconcile``: the file is the whole project as the server has it now (a pull):
    Label Studio annotators' texts missing from it are withdrawn. ``tasks``: the server's task
    list, for the skips and tasks without text a JSON-MIN export leaves out. Every record that
    adds no version is a :class:`labelstudio.Problem` with its line and reason; a file that
    cannot be trusted as a whole raises :class:`ImportRefused` and writes nothing.
    """
    ac = cfg.annotations
    store = AnnotationStore(annotations_url(cfg))
    announce("annotations import", {"file": path, "into": store.table.url, "imported as": ac.import_state})
    summary = StageSummary("annotations import")
    raw, text = _read(path)
    info: dict = {}
    if path.lower().endswith(".json"):
        entries, problems = ls.parse_label_studio(text, ac.from_name, info)
    else:
        entries, problems = ls.parse_file(path, text, ac.from_name)
    fatal = [p for p in problems if p.fatal]
    if fatal:
        raise ImportRefused(f"{path}: nothing imported: " + "; ".join(str(p) for p in fatal))
    shape = info.get("shape")
    if shape == ls.JSON_MIN:
        if tasks is not None:  # skips and untouched tasks from the server, as a JSON export has them
            problems = [p for p in problems if p.reason not in (ls.CANCELLED, ls.NOT_ANNOTATED)]
            problems += ls.task_problems(tasks)
        else:
            summary.extra["skipped"] = "unknown (a JSON-MIN file leaves skipped tasks out)"
            log.warning(
                "%s is a JSON-MIN export: Label Studio leaves skipped tasks out of it, so skips are not counted "
                "(`paradiffusion annotations pull` counts them from the server's task list)",
                os.path.basename(path),
            )
    removed = store.begin(ac)  # leftovers of a killed import; this run's settings in its marker
    if removed:
        summary.extra["leftovers_removed"] = removed
    keys, keys_from = known_keys(cfg)
    history = store.history()  # read once: every lookup below works on it
    by_email = store.emails(history)
    display = {ident: email for email, ident in by_email.items()}
    for ident, email in (users or {}).items():
        if email:
            display[ident] = email
            by_email[email.lower()] = ident
    learned = {ident: email for ident, email in (users or {}).items() if email}
    for e in entries:
        if e.annotator and e.annotator.startswith(ls.LS_USER) and e.annotator_email:
            learned[e.annotator] = e.annotator_email
            by_email[e.annotator_email.lower()] = e.annotator
            display[e.annotator] = e.annotator_email
    # (key, annotator) -> the store's current version (the annotator's latest row for the key)
    current = {(t["key"], t["annotator"]): t for t in store.texts(history) if not t["superseded"]}
    versions = Counter(store.last_versions(history))
    seen_file: dict[str, ls.Entry] = {}
    in_file: set[tuple[str, str]] = set()  # (key, annotator) pairs the file has a text for
    rows: list[dict] = []
    summary.n_in = len(entries) + len(problems)
    source = os.path.basename(path) if "://" not in path else path
    now = _dt.datetime.now(_dt.timezone.utc)

    def add(key: str, ident: str, body: str | None, email, created, ref: str, state: str) -> None:
        versions[key] += 1
        row = {
            "key": key,
            "version": versions[key],
            "text": body,
            "annotator": ident,
            "annotator_email": email,
            "created_at": created,
            "source_file": source,
            "source_ref": ref,
            "content_hash": content_hash(key, ident, body),
            "state": state,
        }
        rows.append(row)
        current[(key, ident)] = {**row, "superseded": False}

    # Versions follow the annotators' own times; ties (and missing times) keep file order.
    floor = _dt.datetime.min.replace(tzinfo=_dt.timezone.utc)
    for e in sorted(entries, key=lambda e: (e.created_at or floor, e.line)):
        if e.key not in keys:
            problems.append(ls.Problem(e.ref, e.line, UNKNOWN_KEY, f"{e.key!r} is not in the {keys_from}", key=e.key))
            continue
        ident, email = e.annotator, e.annotator_email
        if ident is None or (ident and "@" in ident and ident.lower() in by_email):
            email = email or ident
            ident = by_email.get((email or "").lower())
            if ident is None:
                problems.append(
                    ls.Problem(
                        e.ref,
                        e.line,
                        UNKNOWN_ANNOTATOR,
                        f"{email!r} has no Label Studio user id here yet: pull from the server "
                        "(`paradiffusion annotations pull`) or import a JSON export first",
                        key=e.key,
                    )
                )
                continue
        email = email or display.get(ident)
        in_file.add((e.key, ident))
        h = content_hash(e.key, ident, e.text)
        if h in seen_file:
            problems.append(ls.Problem(e.ref, e.line, DUPLICATE_IN_FILE, f"same text as {seen_file[h].ref}", key=e.key))
            continue
        seen_file[h] = e
        cur = current.get((e.key, ident))
        if cur is not None and cur["state"] != WITHDRAWN and cur["text"] == e.text:
            where = f"current v{cur['version']} from {cur['source_file']} {cur['source_ref']}"
            problems.append(ls.Problem(e.ref, e.line, ALREADY_IMPORTED, where, key=e.key))
            continue
        if cur is not None and e.created_at and cur["created_at"] and e.created_at < cur["created_at"]:
            detail = f"written {e.created_at.isoformat()}, before the current v{cur['version']} ({cur['created_at']})"
            problems.append(ls.Problem(e.ref, e.line, STALE, detail, key=e.key))
            continue
        add(e.key, ident, e.text, email, e.created_at, e.ref, ac.import_state)

    if reconcile:
        # The export is the project: a Label Studio annotator's text it no longer has was deleted
        # (or turned into a skip) there. Only the tasks the export (or the task list) covers.
        scope = {e.key for e in entries} | {p.key for p in problems if p.key}
        scope |= {t.key for t in tasks or []}
        gone = [
            (k, a, c)
            for (k, a), c in sorted(current.items(), key=lambda x: (x[0][0], x[0][1] or ""))
            if a and a.startswith(ls.LS_USER) and c["state"] != WITHDRAWN and k in scope and (k, a) not in in_file
        ]
        for k, a, c in gone:
            ref = f"v{c['version']} is not in the export any more (deleted or skipped in Label Studio)"
            add(k, a, None, c.get("annotator_email") or display.get(a), now, ref, WITHDRAWN)
        if gone:
            summary.extra["withdrawn"] = len(gone)

    problems.sort(key=lambda p: p.line)
    for p in problems:
        summary.reject(p.reason)
    log_file = _log_problems(store.table.url, source, problems)
    shard = store.append("import", rows, {"source_file": source, "sha256": hashlib.sha256(raw).hexdigest()})
    store.remember(learned)
    summary.n_out = len(rows)
    summary.extra["shard"] = shard or "none (nothing new)"
    summary.extra["by_state"] = dict(Counter(r["state"] for r in rows))
    summary.extra["annotators"] = len({r["annotator"] for r in rows})
    not_annotated = [p for p in problems if p.reason == ls.NOT_ANNOTATED]
    where = [f"{p.ref} ({p.detail.split(':')[0]})" for p in not_annotated]
    if where:
        summary.extra["not_annotated_tasks"] = "; ".join(where[:10]) + (
            f"; ... {len(where) - 10} more" if len(where) > 10 else ""
        )
    summary.extra["not_annotated_positions"] = [p.ref for p in not_annotated]
    summary.extra["problems"] = [str(p) for p in problems if p.reason not in QUIET]
    if log_file:
        summary.extra["log"] = log_file
    summary.finish()
    store.table.save_config(cfg, "annotations", ac)
    store.table.save_json("_summary.json", summary.to_dict())
    summary.print()
    return ImportResult(summary, problems, shard, log_file)


def _log_problems(table_url: str, source: str, problems: list[ls.Problem]) -> str | None:
    """One terminal line per reason (a count and the first case), every problem in the run's log file."""
    if not problems:
        return None
    path = stage_log_path(table_url, "import")
    with open(path, "a", encoding="utf-8") as f:
        for p in problems:
            f.write(f"{source}: {p}\n")
    by_reason: dict[str, list[ls.Problem]] = {}
    for p in problems:
        by_reason.setdefault(p.reason, []).append(p)
    for reason, ps in sorted(by_reason.items()):
        first = ps[0].ref + (f": {ps[0].detail}" if ps[0].detail else "")
        line = f"{source}: {len(ps)} {reason}" + ("" if reason in QUIET else f" (first: {first})")
        (log.info if reason in QUIET else log.warning)("%s", line)
    log.info("%s: every record not imported, with its line: %s", source, path)
    return path
