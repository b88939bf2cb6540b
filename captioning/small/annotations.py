"""The annotations store: append-only versions of hand-written descriptions, and their review.

Every change appends rows; nothing is edited in place. A row is one version of one key:

- an **import** (:mod:`captioning.small.importer`) appends a version per new text of an
  annotator on a key (state ``submitted``, or ``draft``): a new text, an edit, a revert to an
  earlier text; a pull also appends a ``withdrawn`` version where an annotator's text is gone
  from Label Studio (deleted, or turned into a skip);
- a **review** appends a version that copies the text it decides on, with the new state,
  the reviewer, the comment and ``parent_version`` = the version of the text decided on.

A key can hold several texts: two annotators on one task, or one annotator's edit in Label
Studio (a later text from the same annotator *supersedes* the earlier one). Each text has its own
review state (:mod:`captioning.small.texts`). Allowed transitions of one text::

    draft ──submit──▶ submitted ──approve──▶ approved
                                 └─reject───▶ rejected

``approved`` and ``rejected`` are final for that text: a corrected description comes back as a
new import (a new version, ``submitted`` again). Only an annotator's *current* text (not
superseded, not withdrawn) can be reviewed, and only a current approved text reaches
``small_train``; with several open texts on a key a decision names the version. Anything else
raises :class:`ReviewError`.

**Who.** An annotator is one person: the Label Studio user id (``labelstudio:<id>``), with the
email kept in ``annotator_email`` for display. The content hash is key + annotator identity +
text; an import compares each annotation with the annotator's current version, so importing the
same annotations again, in either export shape (JSON with user ids or user dicts, or JSON-MIN),
adds nothing.

Each import and each review batch is one committed shard, so a failure half-way writes nothing.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from captioning.small import labelstudio as ls
from captioning.small.config import AnnotationsConfig
from captioning.small.texts import approved_sql, texts_sql
from paradiffusion.config import RootConfig
from paradiffusion.deps import MissingDependency, require
from paradiffusion.log import get_logger
from paradiffusion.schemas import ANNOTATIONS, CANDIDATES, SCORES, SMALL_TRAIN
from paradiffusion.stage import StageSummary, announce, progress
from paradiffusion.storage import Table, conform, join

log = get_logger("captioning.small.annotations")

TRANSITIONS: dict[str, dict[str, str]] = {  # state -> {action: new state}
    "draft": {"submit": "submitted"},
    "submitted": {"approve": "approved", "reject": "rejected"},
    "approved": {},
    "rejected": {},
    "withdrawn": {},  # the annotator's text is gone from Label Studio (deleted, or a skip): nothing to review
}
ACTIONS = ("submit", "approve", "reject")

UNKNOWN_KEY = "unknown_key"
ALREADY_IMPORTED = "already_imported"
DUPLICATE_IN_FILE = "duplicate_in_file"
UNKNOWN_ANNOTATOR = "unknown_annotator"

#: identity -> email of every annotator seen, beside the annotations shards
PEOPLE_FILE = "_people.json"


class ReviewError(ValueError):
    """A review decision that is not allowed (wrong state, unknown key or version, failed checks).

    ``reason`` is the counter it is summarised under.
    """

    def __init__(self, message: str, reason: str = "refused"):
        super().__init__(message)
        self.reason = reason


class ImportRefused(ValueError):
    """A file that cannot be imported at all (not readable, or malformed as a whole)."""


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def content_hash(key: str, annotator: str | None, text: str | None) -> str:
    """Identity of one description: the same key, annotator identity and text is the same
    annotation. The display form (email) is left out on purpose."""
    return hashlib.sha256(json.dumps([key, annotator, text]).encode()).hexdigest()


def n_words(text: str | None) -> int:
    """Words = whitespace-separated tokens (the definition every statistic here uses)."""
    return len(text.split()) if text else 0


def who(row: dict) -> str:
    """How an annotator is shown: ``email (labelstudio:4)``, or the identity alone."""
    a = row.get("annotator") or "unknown"
    e = row.get("annotator_email")
    return f"{e} ({a})" if e and e != a else a


# --------------------------------------------------------------------------- locations
def annotations_url(cfg: RootConfig) -> str:
    return cfg.annotations.output or join(cfg.project.data_root, "annotations")


def export_dir(cfg: RootConfig) -> str:
    return cfg.annotations.export_dir or join(cfg.project.data_root, "annotation_tasks")


def train_url(cfg: RootConfig) -> str:
    return cfg.annotations.train_output or join(cfg.project.data_root, "small_train")


def _candidates_url(cfg: RootConfig) -> str:
    from captioning.small.select import candidates_url

    return candidates_url(cfg)


# --------------------------------------------------------------------------- guideline checks
@dataclass
class CheckResult:
    """Guideline checks of one description: ``failures`` block approval, ``notes`` inform."""

    n_words: int
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def render(self) -> str:
        if self.ok:
            return f"ok ({self.n_words} words" + (f"; {'; '.join(self.notes)})" if self.notes else ")")
        return "; ".join(self.failures + self.notes)


def check_text(text: str, ac: AnnotationsConfig) -> CheckResult:
    """Word range, language and vague phrases of one description."""
    res = CheckResult(n_words(text))
    if not ac.min_words <= res.n_words <= ac.max_words:
        res.failures.append(f"{res.n_words} words, outside {ac.min_words}-{ac.max_words}")
    if ac.language:
        try:
            langid = require("py3langid", extra="curation")
            lang, _ = langid.classify(text)
            if lang != ac.language:
                res.failures.append(f"language looks like {lang!r}, expected {ac.language!r}")
        except MissingDependency:
            res.notes.append("language not checked (py3langid not installed)")
    low = " ".join(text.lower().split())
    vague = [p for p in ac.vague_phrases if re.search(r"(?<!\w)" + re.escape(p.lower()) + r"(?!\w)", low)]
    if vague:
        res.failures.append("vague: " + ", ".join(repr(v) for v in vague))
    return res


# --------------------------------------------------------------------------- the store
class AnnotationStore:
    """The ``annotations`` table: its history, the texts with their review states, identities."""

    def __init__(self, url: str):
        self.table = Table(url, ANNOTATIONS)

    def history(self, key: str | None = None) -> pa.Table:
        """Every row, sorted by key and version. Shards are read one by one and conformed to the
        schema, so shards written before a column was added read with that column null."""
        parts = [
            conform(pq.read_table(self.table.shard_file(s), filesystem=self.table.fs), ANNOTATIONS)
            for s in sorted(self.table.done_shards())
        ]
        t = pa.concat_tables(parts) if parts else ANNOTATIONS.empty_table()
        if key is not None and t.num_rows:
            t = t.filter(pc.equal(t["key"], key))
        return t.sort_by([("key", "ascending"), ("version", "ascending")]) if t.num_rows else t

    def last_versions(self, history: pa.Table | None = None) -> dict[str, int]:
        """key -> its highest version number."""
        hist = history if history is not None else self.history()
        out: dict[str, int] = {}
        for k, v in zip(*(hist.select(["key", "version"]).to_pydict().values()), strict=True):
            out[k] = max(out.get(k, 0), v)
        return out

    def begin(self, section) -> int:
        """Before a run appends: remove what a killed run left (uncommitted shard files, temp
        files) and record this run's settings for the markers to come, so a new table's first
        shard is not counted as made with other settings. Returns how many leftovers went."""
        removed = self.table.clean_tmp() if self.table.exists() else 0
        if removed:
            log.info("%s: removed %d leftovers of an interrupted run", self.table.url, removed)
        self.table.record_settings(section)
        return removed

    def people(self, history: pa.Table | None = None) -> dict[str, str]:
        """annotator identity -> email, for display: ``_people.json`` (every pair an import or a
        pull has seen, even when it added no version) and the rows' own ``annotator_email``."""
        out = dict(self.table.load_json(PEOPLE_FILE) or {})
        hist = history if history is not None else self.history()
        for row in hist.select(["annotator", "annotator_email"]).to_pylist():
            if row["annotator_email"] and row["annotator"]:
                out.setdefault(row["annotator"], row["annotator_email"])
        return out

    def remember(self, pairs: dict[str, str]) -> None:
        """Add identity -> email pairs to ``_people.json`` (a later email for an identity wins)."""
        known = dict(self.table.load_json(PEOPLE_FILE) or {})
        new = {i: e for i, e in pairs.items() if i and e and known.get(i) != e}
        if new:
            self.table.fs.makedirs(self.table.path, exist_ok=True)
            self.table.save_json(PEOPLE_FILE, {**known, **new})

    def emails(self, history: pa.Table | None = None) -> dict[str, str]:
        """email (lower case) -> Label Studio identity: resolves exports that name people by email."""
        return {e.lower(): i for i, e in self.people(history).items() if i.startswith(ls.LS_USER)}

    def texts(self, history: pa.Table | None = None) -> list[dict]:
        """One dict per imported text with its current state and ``superseded``
        (:func:`captioning.small.texts.texts_sql`), sorted by key and version; a text without an
        email shows the one known for its annotator."""
        hist = history if history is not None else self.history()
        rows = _run_sql(texts_sql("history") + " ORDER BY key, version", hist)
        people = self.people(hist) if any(r["annotator_email"] is None for r in rows) else {}
        for r in rows:
            r["annotator_email"] = r["annotator_email"] or people.get(r["annotator"])
        return rows

    def append(self, prefix: str, rows: list[dict], meta: dict) -> str | None:
        """Append ``rows`` as one committed shard; returns the shard name (None when no rows)."""
        if not rows:
            return None
        now = _now()
        shard = f"{prefix}-{now:%Y%m%dT%H%M%S%f}"
        for r in rows:
            r.setdefault("recorded_at", now)
        self.table.write_shard(shard, pa.Table.from_pylist(rows, schema=ANNOTATIONS), meta)
        return shard


def _run_sql(sql: str, history: pa.Table) -> list[dict]:
    import duckdb

    con = duckdb.connect()
    try:
        con.register("history", history)
        cur = con.execute(sql)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
    finally:
        con.close()


def known_keys(cfg: RootConfig) -> tuple[set[str], str]:
    """Keys an annotation may name: the candidates, or (without candidates) the kept set."""
    cand = Table(_candidates_url(cfg), CANDIDATES)
    if cand.done_shards():
        return set(cand.read(columns=["key"])["key"].to_pylist()), "candidates"
    scores = Table(join(cfg.project.data_root, "scores"), SCORES)
    if scores.done_shards():
        t = scores.read(columns=["key", "kept"])
        return set(t.filter(pc.field("kept"))["key"].to_pylist()), "kept set"
    raise FileNotFoundError("neither candidates nor scores exist: run `make select-small` (or `make filter`) first")


# --------------------------------------------------------------------------- review
@dataclass
class Decision:
    """One review decision; ``ref`` says where it came from (a line of a batch file)."""

    key: str
    action: str
    reviewer: str
    comment: str = ""
    version: int | None = None
    ref: str = "command line"


def _target(d: Decision, texts: list[dict], parents: dict[int, int]) -> dict:
    """The text a decision is about: the one named by ``d.version`` (a text's version, or a
    review row's version, meaning the text it decided on; ``parents`` maps those), else the
    key's only open text."""
    if not texts:
        raise ReviewError(f"{d.ref}: key {d.key!r} has no annotation to review", "no_annotation")
    if d.version is not None:
        wanted = parents.get(d.version, d.version)
        for t in texts:
            if t["version"] == wanted:
                return t
        listing = ", ".join(f"v{t['version']} by {who(t)} ({t['state']})" for t in texts)
        raise ReviewError(
            f"{d.ref}: key {d.key!r} has no text version {d.version}; its texts: {listing}", "unknown_version"
        )
    live = [t for t in texts if not t["superseded"] and t["state"] != "withdrawn"] or [
        t for t in texts if not t["superseded"]
    ]
    able = [t for t in live if d.action in TRANSITIONS[t["state"]]]
    if len(able) == 1:
        return able[0]
    if len(able) > 1:
        listing = ", ".join(f"v{t['version']} by {who(t)}" for t in able)
        raise ReviewError(
            f"{d.ref}: key {d.key!r} has {len(able)} texts that can be {d.action}d: {listing}; "
            "say which with --version (a `version` column in a batch file)",
            "ambiguous_version",
        )
    return live[-1]  # nothing can take this action: the transition check below says why


def _decide(
    d: Decision, texts: list[dict], parents: dict[int, int], ac: AnnotationsConfig, force: bool, last: int
) -> tuple[dict, CheckResult]:
    """The review row for decision ``d`` on the key's ``texts``; ``parents`` maps the key's review
    versions to the text they decided on; ``last`` is the key's highest version."""
    if d.action not in ACTIONS:
        raise ReviewError(f"{d.ref}: unknown action {d.action!r}; use one of {', '.join(ACTIONS)}", "unknown_action")
    if not d.reviewer:
        raise ReviewError(f"{d.ref}: a review needs a reviewer", "missing_reviewer")
    cur = _target(d, texts, parents)
    if cur["superseded"]:
        newer = max(t["version"] for t in texts if t["annotator"] == cur["annotator"])
        raise ReviewError(
            f"{d.ref}: key {d.key!r} v{cur['version']} was replaced by v{newer} from the same annotator "
            f"({who(cur)}); review v{newer}",
            "superseded",
        )
    if cur["state"] == "withdrawn":
        raise ReviewError(
            f"{d.ref}: key {d.key!r} v{cur['version']}: {who(cur)} has no text here any more (deleted or skipped "
            "in Label Studio); nothing to review until they write one",
            "withdrawn",
        )
    allowed = TRANSITIONS[cur["state"]]
    if d.action not in allowed:
        can = ", ".join(allowed) or "nothing (final state)"
        raise ReviewError(
            f"{d.ref}: key {d.key!r} v{cur['version']} by {who(cur)} is {cur['state']!r}: cannot {d.action} it "
            f"(allowed from {cur['state']!r}: {can})",
            "transition_not_allowed",
        )
    if d.action == "reject" and not d.comment:
        raise ReviewError(f"{d.ref}: rejecting key {d.key!r} needs a --comment saying what to fix", "missing_comment")
    check = check_text(cur["text"] or "", ac)
    if d.action == "approve" and not check.ok and not force:
        raise ReviewError(
            f"{d.ref}: key {d.key!r} v{cur['version']} fails the guidelines ({check.render()}); fix it or use --force",
            "guideline_failed",
        )
    now = _now()
    row = {
        **{
            k: cur[k]
            for k in ("key", "text", "annotator", "annotator_email", "created_at", "source_file", "source_ref")
        },
        "content_hash": cur["content_hash"],
        "version": last + 1,
        "state": allowed[d.action],
        "parent_version": cur["version"],
        "reviewer": d.reviewer,
        "review_comment": d.comment or None,
        "reviewed_at": now,
    }
    return row, check


def review(cfg: RootConfig, decisions: list[Decision], force: bool = False) -> tuple[StageSummary, list[str]]:
    """Apply review decisions; the allowed ones are appended as one shard.

    Returns the summary and the refused decisions' messages (each names its line and why).
    A single decision that is refused raises :class:`ReviewError` instead.
    """
    ac = cfg.annotations
    store = AnnotationStore(annotations_url(cfg))
    store.begin(ac)
    history = store.history()
    by_key: dict[str, list[dict]] = {}
    for t in store.texts(history):
        by_key.setdefault(t["key"], []).append(t)
    parents: dict[str, dict[int, int]] = {}
    last: dict[str, int] = {}
    for k, v, pv in zip(*history.select(["key", "version", "parent_version"]).to_pydict().values(), strict=True):
        last[k] = max(last.get(k, 0), v)
        if pv is not None:
            parents.setdefault(k, {})[v] = pv
    summary = StageSummary("annotations review")
    summary.n_in = len(decisions)
    rows, refused = [], []
    for d in decisions:
        try:
            row, check = _decide(d, by_key.get(d.key, []), parents.get(d.key, {}), ac, force, last.get(d.key, 0))
        except ReviewError as exc:
            if len(decisions) == 1:
                raise
            refused.append(str(exc))
            summary.reject(exc.reason)
            log.warning("%s", exc)
            continue
        print(f"   {d.key} v{row['parent_version']} by {who(row)}: checks {check.render()} -> {row['state']}")
        rows.append(row)
        last[d.key] = row["version"]
        parents.setdefault(d.key, {})[row["version"]] = row["parent_version"]
        for t in by_key[d.key]:  # a later line of the same batch sees this decision
            if t["version"] == row["parent_version"]:
                t.update(state=row["state"], decided_in=row["version"], reviewer=d.reviewer)
    shard = store.append("review", rows, {"decisions": len(rows), "refused": len(refused)})
    store.table.save_config(cfg, "annotations", ac)
    summary.n_out = len(rows)
    summary.extra["shard"] = shard or "none"
    summary.extra["by_state"] = dict(Counter(r["state"] for r in rows))
    summary.finish()
    store.table.save_json("_summary.json", summary.to_dict())
    summary.print()
    return summary, refused


def read_decisions(path: str, default_reviewer: str | None = None) -> tuple[list[Decision], list[str]]:
    """A batch of decisions from CSV or JSONL: ``key, decision (approve|reject|submit), reviewer,
    comment[, version]``. Returns the decisions and the unreadable lines' messages."""
    with fsspec.open(path, "r", encoding="utf-8-sig") as f:
        text = f.read()
    records: list[tuple[int, dict]] = []
    bad: list[str] = []
    if path.lower().endswith(".jsonl"):
        for i, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
                records.append((i, rec))
            except ValueError as exc:
                bad.append(f"{path}: line {i}: malformed ({exc})")
    else:
        reader = csv.DictReader(io.StringIO(text))
        for rec in reader:
            records.append((reader.line_num, rec))
    out = []
    for line, rec in records:
        action = str(rec.get("decision") or rec.get("action") or "").strip().lower()
        action = {"approved": "approve", "rejected": "reject", "submitted": "submit"}.get(action, action)
        try:
            version = int(rec["version"]) if str(rec.get("version") or "").strip() else None
        except ValueError:
            bad.append(f"{path}: line {line}: malformed version {rec.get('version')!r}")
            continue
        out.append(
            Decision(
                key=str(rec.get("key") or "").strip(),
                action=action,
                reviewer=str(rec.get("reviewer") or default_reviewer or "").strip(),
                comment=str(rec.get("comment") or "").strip(),
                version=version,
                ref=f"{path}: line {line}",
            )
        )
    return out, bad


# --------------------------------------------------------------------------- status
KEY_STATES = ("approved", "submitted", "draft", "rejected")  # a key's state: the first any of its texts has


def status(cfg: RootConfig) -> dict:
    """Progress: texts (each annotator's latest per key) by state and by annotator, keys by their
    best state, keys not started, and pending texts failing the guidelines."""
    store = AnnotationStore(annotations_url(cfg))
    current = [t for t in store.texts() if not t["superseded"]]
    texts = [t for t in current if t["state"] != "withdrawn"]
    annotated = {t["key"] for t in texts}
    try:
        keys, keys_from = known_keys(cfg)
    except FileNotFoundError:
        keys, keys_from = set(annotated), "annotations"
    by_state = Counter(t["state"] for t in texts)
    states_of: dict[str, set[str]] = {}
    by_annotator: dict[str, Counter] = {}
    failing = 0
    for t in texts:
        states_of.setdefault(t["key"], set()).add(t["state"])
        by_annotator.setdefault(who(t), Counter())[t["state"]] += 1
        if t["state"] in ("draft", "submitted") and not check_text(t["text"] or "", cfg.annotations).ok:
            failing += 1
    keys_by_state = Counter(next(s for s in KEY_STATES if s in states) for states in states_of.values())
    return {
        "keys_to_annotate": len(keys),
        "keys_from": keys_from,
        "not_started": len(keys - annotated),
        "versions": store.history().num_rows,
        "texts": len(texts),
        "by_state": {s: by_state.get(s, 0) for s in TRANSITIONS if s != "withdrawn"},
        "withdrawn": len(current) - len(texts),
        "keys_by_state": {s: keys_by_state.get(s, 0) for s in KEY_STATES},
        "by_annotator": {
            a: {s: c.get(s, 0) for s in TRANSITIONS if s != "withdrawn"} for a, c in sorted(by_annotator.items())
        },
        "pending_failing_guidelines": failing,
    }


def render_status(st: dict) -> str:
    states = [s for s in TRANSITIONS if s != "withdrawn"]
    lines = [
        f"== annotations status ({st['keys_to_annotate']} keys in the {st['keys_from']}, "
        f"{st['texts']} current texts, {st['versions']} versions recorded)",
        f"   keys: not started: {st['not_started']}   "
        + "   ".join(f"{s}: {st['keys_by_state'][s]}" for s in KEY_STATES)
        + "   (a key counts under the best state of its texts)",
        "   texts: "
        + "   ".join(f"{s}: {st['by_state'][s]}" for s in states)
        + f"   (withdrawn in Label Studio: {st.get('withdrawn', 0)})",
        f"   pending texts failing the guidelines: {st['pending_failing_guidelines']}",
    ]
    if st["by_annotator"]:
        width = max(12, *(len(a) for a in st["by_annotator"]))
        lines.append("   " + "annotator".ljust(width) + "".join(s.rjust(11) for s in states))
        for a, c in st["by_annotator"].items():
            lines.append("   " + a.ljust(width) + "".join(str(c[s]).rjust(11) for s in states))
    return "\n".join(lines)


# --------------------------------------------------------------------------- export
def draft_captions(cfg: RootConfig, keys: list[str]) -> dict[str, tuple[str, str]]:
    """key -> (VLM draft caption, "model_id/prompt_id"): the selected caption (``caption.select``)."""
    from captioning.store import selected_captions_sql

    captions = Table(join(cfg.project.data_root, "captions"))
    if not captions.done_shards() or not keys:
        return {}
    from paradiffusion.storage import duckdb_connect

    con = duckdb_connect()  # the captions may be on object storage
    con.register("wanted", pa.table({"key": pa.array(keys, pa.string())}))
    sql = selected_captions_sql(captions.sql_source(), cfg.caption.select)  # committed shards only
    rows = con.execute(
        f"SELECT s.key, s.caption, s.model_id || '/' || s.prompt_id FROM ({sql}) s JOIN wanted USING (key)"
    ).fetchall()
    return {k: (c, mv) for k, c, mv in rows}


def export_tasks(cfg: RootConfig) -> StageSummary:
    """Write ``tasks.json`` (Label Studio import) and ``labeling_config.xml`` for the candidates."""
    ac = cfg.annotations
    out_url = export_dir(cfg)
    meta = Table(out_url)  # a local folder or a URL: files written with the storage contract's atomic writes
    cand = Table(_candidates_url(cfg), CANDIDATES)
    announce("annotations export", {"candidates": cand.url, "output": out_url, "images": ac.image_source})
    summary = StageSummary("annotations export")
    if not cand.done_shards():
        raise FileNotFoundError(f"no candidates under {cand.url}: run `make select-small` first")
    rows = cand.read().sort_by("selection_rank").to_pylist()
    summary.n_in = len(rows)
    drafts = draft_captions(cfg, [r["key"] for r in rows])
    location = {r["key"]: r["url"] for r in rows}
    if ac.image_source == "files":
        from paradiffusion.images import iter_kept_images

        location = {}
        wanted = {r["key"] for r in rows}
        images = join(cfg.project.data_root, "images")
        for _, t in progress(
            iter_kept_images(images, join(cfg.project.data_root, "scores"), ("key", "image"), wanted), desc="images"
        ):
            for key, data in zip(t["key"].to_pylist(), t["image"].to_pylist(), strict=True):
                ext = _ext(data)
                meta.write_file(f"images/{key}.{ext}", data)
                location[key] = f"{ac.image_url_prefix}{key}.{ext}"
    tasks = []
    for r in rows:
        if not location.get(r["key"]):
            summary.reject("no_image_location")
            log.warning("candidate %s: no image location (no url / no image bytes); not exported", r["key"])
            continue
        draft, mv = drafts.get(r["key"], (None, None))
        tasks.append(ls.make_task(r["key"], location[r["key"]], draft, mv, ac.from_name))
    meta.write_file("tasks.json", json.dumps(tasks, indent=1, ensure_ascii=False).encode())
    meta.write_file("labeling_config.xml", ls.labeling_config(ac.from_name, ac.min_words, ac.max_words).encode())
    summary.n_out = len(tasks)
    summary.extra["with_draft"] = sum(1 for t in tasks if t.get("predictions"))
    summary.extra["without_draft"] = len(tasks) - summary.extra["with_draft"]
    summary.extra["tasks"] = join(out_url, "tasks.json")
    summary.finish()
    meta.save_config(cfg, "annotations export")
    meta.save_json("_summary.json", summary.to_dict())
    summary.print()
    return summary


def _ext(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "bin"


def export_approved(cfg: RootConfig) -> StageSummary:
    """Write the stage-3 training table from the approved texts, by ``annotations.train_rule``
    (:func:`captioning.small.texts.approved_sql`: ``latest`` = one row per key, ``each`` = one
    row per approved annotator)."""
    ac = cfg.annotations
    store = AnnotationStore(annotations_url(cfg))
    out = Table(train_url(cfg), SMALL_TRAIN)
    announce(
        "annotations export-approved",
        {"annotations": store.table.url, "output": out.url, "rule": ac.train_rule},
    )
    summary = StageSummary("annotations export-approved")
    history = store.history()
    approved = _run_sql(approved_sql("history", ac.train_rule) + " ORDER BY key, version", history)
    texts = [t for t in store.texts(history) if not t["superseded"]]  # withdrawn ones count as not approved
    # the unit of the rule: a key (latest) or a key's annotator (each)
    unit = (lambda r: r["key"]) if ac.train_rule == "latest" else (lambda r: (r["key"], r["annotator"]))
    have = {unit(a) for a in approved}
    states: dict = {}
    for t in texts:
        states.setdefault(unit(t), set()).add(t["state"])
    summary.n_in = len(states)
    for u, st in sorted(states.items(), key=lambda x: str(x[0])):
        if u not in have:
            summary.reject(f"not_approved ({'/'.join(sorted(st))})")
    rows = [
        {
            "key": a["key"],
            "caption": a["text"],
            "annotator": a["annotator"],
            "version": a["version"],
            "reviewer": a["reviewer"],
            "n_words": n_words(a["text"]),
        }
        for a in approved
    ]
    out.record_settings(ac)  # this run's settings in the marker (the shard is rewritten)
    out.write_shard("00000", pa.Table.from_pylist(rows, schema=SMALL_TRAIN) if rows else SMALL_TRAIN.empty_table())
    out.save_config(cfg, "annotations export-approved", ac)
    summary.n_out = len(rows)
    summary.extra["keys"] = len({a["key"] for a in approved})
    summary.extra["rule"] = ac.train_rule
    if rows:
        summary.extra["mean_words"] = round(sum(r["n_words"] for r in rows) / len(rows), 1)
    summary.finish()
    out.save_json("_summary.json", summary.to_dict())
    summary.print()
    return summary


# The import lives in its own module (reconciliation with Label Studio); it is part of this API.
from captioning.small.importer import ImportResult, import_file  # noqa: E402, F401
