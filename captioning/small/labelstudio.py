"""Label Studio's formats: tasks to import, the labeling config, and parsing its exports.

Tasks (what ``annotations export`` writes, Label Studio's import format)::

    [{"data": {"image": "<url>", "key": "<key>", "draft": "<VLM caption>"},
      "predictions": [{"model_version": "<model_id>/<prompt_id>",
                       "result": [{"from_name": "caption", "to_name": "image", "type": "textarea",
                                   "value": {"text": ["<VLM caption>"]}}]}]}, ...]

Two export shapes of Label Studio are read (both as written by Label Studio 1.23's API and UI):

- **JSON**: a list of tasks, each with ``id``, ``data`` and ``annotations``; an annotation has
  ``id``, ``result`` (``[{"value": {"text": [...]}, "from_name": ..., "type": "textarea"}]``),
  ``completed_by`` (the user id, an integer; older exports and some tools write a dict with
  ``id`` and ``email``), ``created_at``, ``updated_at``, ``was_cancelled``, ``lead_time``, ...
  A task nobody annotated has ``"annotations": []``.
- **JSON-MIN**: one flat record per annotation that was not cancelled: the task's ``data``
  fields, ``id`` (the task), the TextArea's text under its ``from_name``, ``annotator`` (the
  user id, or the email when the export had user dicts), ``annotation_id``, ``created_at``,
  ``updated_at``, ``lead_time``. A task nobody annotated is one record with
  ``"annotation_id": null``; a task whose annotations were all cancelled is left out.

**Who wrote it.** An annotator is one person: the Label Studio user id, as
``labelstudio:<id>`` (:func:`annotator_id`). The email is kept beside it for display only. An
export that names a person by email alone (JSON-MIN of dict-shaped data) gives an
:class:`Entry` with ``annotator=None`` and the email; the importer resolves it to the user id
(from the server's user list on a pull, or from earlier imports) or reports it.

Plain CSV and JSONL with ``key``, ``text`` and ``annotator`` columns are read too; there the
annotator is the given name, used as is.

Parsing never raises on bad content: every record becomes either an :class:`Entry` or a
:class:`Problem` that names its line (and task / annotation id) and the reason.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

#: Problem reasons, shared with the importer's summary.
MALFORMED = "malformed"
MISSING_KEY = "missing_key"
EMPTY = "empty_annotation"
CANCELLED = "cancelled_annotation"
NOT_ANNOTATED = "not_annotated"

#: The two export shapes of Label Studio (:func:`parse_label_studio` says which one a file has).
JSON, JSON_MIN = "JSON", "JSON_MIN"


@dataclass
class TaskInfo:
    """One task as the server's task list shows it: what a JSON-MIN export leaves out."""

    id: int
    key: str
    annotations: int  # annotations that were not cancelled (Label Studio's ``total_annotations``)
    cancelled: int  # skips (``cancelled_annotations``)


#: Prefix of an annotator identity that is a Label Studio user id.
LS_USER = "labelstudio:"


def annotator_id(user_id: object) -> str:
    """The identity of a Label Studio user: ``labelstudio:<id>``."""
    return f"{LS_USER}{int(user_id)}"


@dataclass
class Entry:
    """One annotation found in a file."""

    key: str
    text: str
    annotator: str | None  # identity: "labelstudio:<id>" or a plain name; None = only an email is known
    created_at: _dt.datetime | None
    ref: str  # where in the file: "line 12, task 7, annotation 31"
    line: int
    annotator_email: str | None = None  # for display; never part of the identity


@dataclass
class Problem:
    """One record that cannot be imported, and why."""

    ref: str
    line: int
    reason: str
    detail: str = ""
    fatal: bool = False  # the file as a whole cannot be read: import nothing
    key: str | None = None  # the task's key, where the record names one

    def __str__(self) -> str:
        return f"{self.ref}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


def labeling_config(from_name: str = "caption", min_words: int = 50, max_words: int = 200) -> str:
    """The Label Studio labeling config matching the exported tasks: the image, the VLM draft as
    a pre-filled, editable TextArea."""
    guide = (
        f"Describe the image in one paragraph of {min_words}-{max_words} words: the main objects, their "
        "attributes (colour, material, count), where they are in the picture and the background. "
        "Edit the draft below; do not write vague phrases such as 'nice picture'."
    )
    return (
        "<View>\n"
        '  <Image name="image" value="$image" zoom="true"/>\n'
        f"  <Header value={quoteattr(guide)}/>\n"
        f'  <TextArea name={quoteattr(from_name)} toName="image" rows="10" editable="true" '
        'maxSubmissions="1" required="true" showSubmitButton="false"/>\n'
        "</View>\n"
    )


def make_task(key: str, image: str, draft: str | None, model_version: str | None, from_name: str = "caption") -> dict:
    """One Label Studio task: the image, its key, and the VLM draft as a prediction."""
    task: dict = {"data": {"image": image, "key": key, "draft": draft or ""}}
    if draft:
        task["predictions"] = [
            {
                "model_version": model_version or "vlm",
                "result": [
                    {"from_name": from_name, "to_name": "image", "type": "textarea", "value": {"text": [draft]}}
                ],
            }
        ]
    return task


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _split_json_list(text: str) -> tuple[list[tuple[int, object]], Problem | None]:
    """Decode a top-level JSON list item by item, keeping each item's line number.

    ``json.loads`` gives no positions; decoding item by item with ``raw_decode`` does, so a
    problem can name the line its task starts on.
    """
    dec = json.JSONDecoder()
    i = len(text) - len(text.lstrip())
    if not text[i : i + 1] == "[":
        return [], Problem("line 1", 1, MALFORMED, "a Label Studio JSON export is a list of tasks: expected '['", True)
    i += 1
    items: list[tuple[int, object]] = []
    n = len(text)
    while True:
        while i < n and text[i] in " \t\r\n":
            i += 1
        if i < n and text[i] == "]":
            rest = text[i + 1 :].strip()
            if rest:
                line = _line_of(text, i + 1)
                return items, Problem(f"line {line}", line, MALFORMED, "extra data after the closing ']'", True)
            return items, None
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            return items, Problem(f"line {exc.lineno}", exc.lineno, MALFORMED, f"not valid JSON: {exc.msg}", True)
        items.append((_line_of(text, i), obj))
        i = end
        while i < n and text[i] in " \t\r\n":
            i += 1
        if i < n and text[i] == ",":
            i += 1
        elif not (i < n and text[i] == "]"):
            line = _line_of(text, min(i, n - 1))
            return items, Problem(f"line {line}", line, MALFORMED, "expected ',' or ']' between tasks", True)


def _time(value: object) -> _dt.datetime | None:
    if not value:
        return None
    try:
        t = _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)


def _annotator(completed_by: object) -> tuple[str | None, str | None]:
    """``(identity, email)`` of an export's ``completed_by`` / ``annotator`` value.

    A user id (int, or digits) or a dict with ``id`` gives ``labelstudio:<id>``; an email alone
    (a dict without ``id``, or a string with ``@``) gives ``(None, email)`` for the importer to
    resolve; anything else is ``("unknown", None)``.
    """
    if isinstance(completed_by, dict):
        email = completed_by.get("email") or None
        uid = completed_by.get("id")
        if isinstance(uid, int) or (isinstance(uid, str) and uid.isdigit()):
            return annotator_id(uid), email
        return (None, email) if email else ("unknown", None)
    if isinstance(completed_by, bool) or completed_by is None or completed_by == "":
        return "unknown", None
    if isinstance(completed_by, int) or (isinstance(completed_by, str) and completed_by.strip().isdigit()):
        return annotator_id(completed_by), None
    if isinstance(completed_by, str) and "@" in completed_by:
        return None, completed_by.strip()
    return "unknown", None


def _texts(result: object, from_name: str) -> list[str] | None:
    """The TextArea text of an annotation's ``result``; None when the result is not a list."""
    if not isinstance(result, list):
        return None
    out: list[str] = []
    for r in result:
        if not isinstance(r, dict) or r.get("from_name", from_name) != from_name:
            continue
        value = r.get("value") or {}
        text = value.get("text") if isinstance(value, dict) else None
        if isinstance(text, str):
            text = [text]
        if isinstance(text, list):
            out += [str(t) for t in text if isinstance(t, str)]
    return out


def _body(texts: list[str]) -> str:
    return "\n".join(t.strip() for t in texts if t.strip())


def parse_label_studio(
    text: str, from_name: str = "caption", info: dict | None = None
) -> tuple[list[Entry], list[Problem]]:
    """Entries and problems of a Label Studio JSON or JSON-MIN export (the shape is detected and
    put under ``info["shape"]`` when ``info`` is given).

    A task without any text (no annotation, or only skips) is a :data:`NOT_ANNOTATED` problem;
    in JSON each skip is also a :data:`CANCELLED` one. JSON-MIN leaves skipped tasks out: only
    the server's task list (:func:`task_problems`) shows them."""
    items, fatal = _split_json_list(text)
    entries: list[Entry] = []
    problems: list[Problem] = [fatal] if fatal else []
    first = next((t for _, t in items if isinstance(t, dict)), None)
    is_min = first is not None and "annotations" not in first and ("annotation_id" in first or "annotator" in first)
    if info is not None:
        info["shape"] = JSON_MIN if is_min else JSON
    for line, task in items:
        if not isinstance(task, dict):
            problems.append(Problem(f"line {line}", line, MALFORMED, "a task must be a JSON object"))
            continue
        got = _min_record(task, line, from_name) if is_min else _json_task(task, line, from_name)
        for x in got:
            (entries if isinstance(x, Entry) else problems).append(x)
    return entries, problems


def _json_task(task: dict, line: int, from_name: str) -> list[Entry | Problem]:
    tid = task.get("id", "?")
    tref = f"line {line}, task {tid}"
    data = task.get("data")
    key = data.get("key") if isinstance(data, dict) else None
    if not key:
        return [Problem(tref, line, MISSING_KEY, "task data has no 'key' (was it exported by this tool?)")]
    anns = task.get("annotations", task.get("completions", []))
    if anns is None:
        anns = []
    if not isinstance(anns, list):
        return [Problem(tref, line, MALFORMED, "'annotations' must be a list")]
    if not anns:
        return [Problem(tref, line, NOT_ANNOTATED, f"key {key!r}: nobody annotated this task", key=str(key))]
    out: list[Entry | Problem] = []
    for ann in anns:
        if not isinstance(ann, dict):
            out.append(Problem(tref, line, MALFORMED, "an annotation must be a JSON object"))
            continue
        ref = f"{tref}, annotation {ann.get('id', '?')}"
        if ann.get("was_cancelled") or ann.get("skipped"):
            out.append(Problem(ref, line, CANCELLED, "skipped by the annotator", key=str(key)))
            continue
        texts = _texts(ann.get("result"), from_name)
        if texts is None:
            out.append(Problem(ref, line, MALFORMED, "'result' must be a list"))
            continue
        body = _body(texts)
        if not body:
            out.append(Problem(ref, line, EMPTY, f"no text in a {from_name!r} TextArea", key=str(key)))
            continue
        who, email = _annotator(ann.get("completed_by"))
        when = _time(ann.get("updated_at")) or _time(ann.get("created_at"))
        out.append(Entry(str(key), body, who, when, ref, line, email))
    if all(isinstance(x, Problem) and x.reason == CANCELLED for x in out):
        out.append(Problem(tref, line, NOT_ANNOTATED, f"key {key!r}: skipped, no text", key=str(key)))
    return out


def _min_record(rec: dict, line: int, from_name: str) -> list[Entry | Problem]:
    tref = f"line {line}, task {rec.get('id', '?')}"
    key = rec.get("key")
    if not key:
        return [Problem(tref, line, MISSING_KEY, "record has no 'key' (was it exported by this tool?)")]
    aid = rec.get("annotation_id")
    value = rec.get(from_name)
    if aid is None and value is None:
        return [Problem(tref, line, NOT_ANNOTATED, f"key {key!r}: nobody annotated this task", key=str(key))]
    ref = f"{tref}, annotation {aid if aid is not None else '?'}"
    if rec.get("was_cancelled"):
        return [Problem(ref, line, CANCELLED, "skipped by the annotator", key=str(key))]
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, list):
        texts = [v for v in value if isinstance(v, str)]
        # several TextArea regions are written as a list of {"text": [...]} dicts
        texts += [t for v in value if isinstance(v, dict) for t in (v.get("text") or []) if isinstance(t, str)]
    else:
        texts = []
    body = _body(texts)
    if not body:
        return [Problem(ref, line, EMPTY, f"no text under {from_name!r}", key=str(key))]
    who, email = _annotator(rec.get("annotator"))
    when = _time(rec.get("updated_at")) or _time(rec.get("created_at"))
    return [Entry(str(key), body, who, when, ref, line, email)]


#: The columns (CSV) / fields (JSONL) every plain record has; ``created_at`` and ``was_cancelled`` may be added.
PLAIN_FIELDS = ("key", "text", "annotator")


def _plain_record(rec: dict, ref: str, line: int) -> Entry | Problem:
    """One CSV row / JSONL object. A field that is absent (a cut last record, a short row) or an
    empty annotator is fatal: whose text it is, or whether it is whole, cannot be known."""
    absent = [f for f in PLAIN_FIELDS if rec.get(f) is None]
    if absent:
        return Problem(
            ref, line, MALFORMED, f"field {', '.join(repr(f) for f in absent)} missing (a cut or short record?)", True
        )
    annotator = str(rec["annotator"]).strip()
    if not annotator:
        return Problem(ref, line, MALFORMED, "field 'annotator' is empty: whose text is it?", True)
    key = str(rec["key"]).strip()
    if not key:
        return Problem(ref, line, MISSING_KEY, "no 'key'")
    text = str(rec["text"]).strip()
    if not text:
        return Problem(ref, line, EMPTY, "no 'text'", key=key)
    if str(rec.get("was_cancelled", "")).lower() in ("true", "1", "yes"):
        return Problem(ref, line, CANCELLED, "marked cancelled", key=key)
    return Entry(key, text, annotator, _time(rec.get("created_at")), ref, line)


def parse_csv(text: str) -> tuple[list[Entry], list[Problem]]:
    """Entries and problems of a CSV with a header: ``key,text,annotator[,created_at]``.

    Stops at the first record that cannot be trusted (a fatal problem naming its line and
    field): a header without the three columns, a row with fewer fields than the header, broken
    quoting, and a last row without its line end (a file cut while it was written)."""
    reader = csv.DictReader(io.StringIO(text))
    fields = reader.fieldnames or []
    missing = [f for f in PLAIN_FIELDS if f not in fields]
    if missing:
        return [], [
            Problem(
                "line 1",
                1,
                MALFORMED,
                f"the header must name {', '.join(PLAIN_FIELDS)}; no {', '.join(repr(f) for f in missing)} "
                f"column in {fields}",
                True,
            )
        ]
    entries, problems = [], []
    while True:
        try:
            rec = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            return entries, problems + [Problem(f"line {reader.line_num}", reader.line_num, MALFORMED, str(exc), True)]
        line = reader.line_num
        if None in rec:
            return entries, problems + [Problem(f"line {line}", line, MALFORMED, "more fields than the header", True)]
        got = _plain_record(rec, f"line {line}", line)
        if isinstance(got, Problem) and got.fatal:
            return entries, problems + [got]
        (entries if isinstance(got, Entry) else problems).append(got)
    if text.strip() and not text.endswith(("\n", "\r")):
        line = reader.line_num
        problems.append(
            Problem(f"line {line}", line, MALFORMED, "the last row has no line end: the file may be cut there", True)
        )
    return entries, problems


def parse_jsonl(text: str) -> tuple[list[Entry], list[Problem]]:
    """Entries and problems of JSON Lines: one ``{"key", "text", "annotator"}`` object a line.

    A line that is not a whole JSON object (e.g. the cut last line of a file) or that lacks a
    field stops the import (a fatal problem naming the line and field)."""
    entries, problems = [], []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as exc:
            return entries, problems + [Problem(f"line {line}", line, MALFORMED, f"not valid JSON: {exc.msg}", True)]
        if not isinstance(rec, dict):
            return entries, problems + [Problem(f"line {line}", line, MALFORMED, "not a JSON object", True)]
        got = _plain_record(rec, f"line {line}", line)
        if isinstance(got, Problem) and got.fatal:
            return entries, problems + [got]
        (entries if isinstance(got, Entry) else problems).append(got)
    return entries, problems


def task_problems(tasks: list[TaskInfo]) -> list[Problem]:
    """Skips and tasks without text, from the server's task list: the same problems a JSON
    export gives (one :data:`CANCELLED` per skip, one :data:`NOT_ANNOTATED` per task without a
    text), for an export (JSON-MIN) that leaves skipped tasks out."""
    out = []
    for t in tasks:
        ref = f"task {t.id}"
        out += [Problem(ref, 0, CANCELLED, "skipped by the annotator", key=t.key) for _ in range(t.cancelled)]
        if not t.annotations:
            what = "skipped, no text" if t.cancelled else "nobody annotated this task"
            out.append(Problem(ref, 0, NOT_ANNOTATED, f"key {t.key!r}: {what}", key=t.key))
    return out


def parse_file(name: str, text: str, from_name: str = "caption") -> tuple[list[Entry], list[Problem]]:
    """Parse by extension: ``.json`` (Label Studio export), ``.jsonl``, ``.csv``."""
    lower = name.lower()
    if lower.endswith(".jsonl"):
        return parse_jsonl(text)
    if lower.endswith(".csv"):
        return parse_csv(text)
    if lower.endswith(".json"):
        return parse_label_studio(text, from_name)
    return [], [
        Problem("file", 0, MALFORMED, "unknown format: expected .json (Label Studio export), .jsonl or .csv", True)
    ]
