"""A pull reconciles: the store's current version of each (task, annotator) is Label Studio's.

These drive the importer with exports shaped as Label Studio 1.23 writes them (JSON, and the
JSON-MIN a server writes with its task list); the same cases against a real server are in
test_labelstudio_server.py (slow).
"""

from __future__ import annotations

import datetime
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from test_small_annotations import _json_min, ann, export, words

from captioning.small import annotations as an
from captioning.small import labelstudio as ls
from captioning.small.select import run_select_small
from paradiffusion.schemas import ANNOTATIONS, SMALL_TRAIN
from paradiffusion.storage import Table
from pipelines.cli import main

A = {"id": 1, "email": "a@example.org"}
B = {"id": 2, "email": "b@example.org"}
KEYS = ["c0_0", "c1_0", "c2_0"]


@pytest.fixture
def selected(cfg):
    run_select_small(cfg)
    return cfg


class Project:
    """What a Label Studio project holds: task key -> annotator id -> annotation (or nothing)."""

    def __init__(self):
        self.anns: dict[str, dict[int, dict]] = {k: {} for k in KEYS}
        self.clock = 0
        self.next_id = 1

    def _t(self) -> str:
        self.clock += 1
        return f"2026-02-01T10:{self.clock:02d}:00Z"

    def write(self, key: str, who: dict, text: str | None) -> None:
        """A new annotation, an edit of it (same id, later updated_at), or a skip (text None)."""
        old = self.anns[key].get(who["id"])
        aid = old["id"] if old else self.next_id
        self.next_id += not old
        t = self._t()
        self.anns[key][who["id"]] = ann(aid, who, text or "", old["created_at"] if old else t, t, text is None)

    def delete(self, key: str, who: dict) -> None:
        del self.anns[key][who["id"]]

    def tasks(self) -> list[ls.TaskInfo]:
        return [
            ls.TaskInfo(
                i + 1,
                k,
                sum(not a["was_cancelled"] for a in self.anns[k].values()),
                sum(a["was_cancelled"] for a in self.anns[k].values()),
            )
            for i, k in enumerate(KEYS)
        ]

    def pull(self, cfg, tmp_path, kind: str = "JSON") -> an.ImportResult:
        doc = json.loads(export([(k, list(self.anns[k].values())) for k in KEYS]))
        f = tmp_path / f"pull-{self.clock}-{kind}.json"
        f.write_text(json.dumps(doc if kind == "JSON" else _json_min(doc, by_email=False)))
        users = {"labelstudio:1": A["email"], "labelstudio:2": B["email"]}
        return an.import_file(cfg, str(f), users, reconcile=True, tasks=self.tasks() if kind != "JSON" else None)


def _current(cfg) -> dict:
    """(key, annotator) -> (version, state, text) of the store's current versions."""
    store = an.AnnotationStore(an.annotations_url(cfg))
    return {
        (t["key"], t["annotator"][-1]): (t["version"], t["state"], t["text"])
        for t in store.texts()
        if not t["superseded"]
    }


def _train(cfg) -> list[tuple]:
    an.export_approved(cfg)
    rows = Table(an.train_url(cfg), SMALL_TRAIN).read().sort_by("key").to_pylist()
    return [(r["key"], r["version"], r["caption"]) for r in rows]


@pytest.mark.parametrize("kind", ["JSON", "JSON_MIN"])
def test_write_edit_revert_delete_skip_reannotate(selected, tmp_path, kind, capsys):
    cfg, p = selected, Project()
    X, Y = words(60), words(61, "y")

    # write: a new text is one version
    p.write("c0_0", A, X)
    assert p.pull(cfg, tmp_path, kind).summary.n_out == 1
    assert _current(cfg) == {("c0_0", "1"): (1, "submitted", X)}
    an.review(cfg, [an.Decision("c0_0", "approve", "rev")])
    assert _train(cfg) == [("c0_0", 1, X)]

    # edit: a new version; the approved text it replaces leaves small_train
    p.write("c0_0", A, Y)
    res = p.pull(cfg, tmp_path, kind)
    assert res.summary.n_out == 1 and _current(cfg) == {("c0_0", "1"): (3, "submitted", Y)}
    assert _train(cfg) == []
    with pytest.raises(an.ReviewError, match="v1 was replaced by v3"):
        an.review(cfg, [an.Decision("c0_0", "approve", "rev", version=1)])

    # revert to the earlier text: a new version with the old text (not "already imported")
    p.write("c0_0", A, X)
    res = p.pull(cfg, tmp_path, kind)
    assert res.summary.n_out == 1 and _current(cfg) == {("c0_0", "1"): (4, "submitted", X)}
    assert _train(cfg) == []  # v1 was approved, but it is not the current version
    an.review(cfg, [an.Decision("c0_0", "approve", "rev")])
    assert _train(cfg) == [("c0_0", 4, X)]

    # the same project again: nothing new
    assert p.pull(cfg, tmp_path, kind).summary.n_out == 0

    # delete: a withdrawn version; nothing to approve, nothing to train on
    p.delete("c0_0", A)
    res = p.pull(cfg, tmp_path, kind)
    assert res.summary.n_out == 1 and res.summary.extra["withdrawn"] == 1
    assert _current(cfg) == {("c0_0", "1"): (6, "withdrawn", None)}
    assert _train(cfg) == []
    with pytest.raises(an.ReviewError, match="has no text here any more"):
        an.review(cfg, [an.Decision("c0_0", "approve", "rev")])
    assert an.status(cfg)["withdrawn"] == 1 and an.status(cfg)["texts"] == 0
    assert main(["annotations", "history", "--key", "c0_0", "--set", f"project.data_root={cfg.project.data_root}"]) == 0
    out = capsys.readouterr().out
    assert "v6 withdrawn no text of a@example.org (labelstudio:1) any more" in out
    assert "v6 by a@example.org (labelstudio:1): withdrawn (no text in Label Studio)" in out

    # skip: B writes on c1_0, then turns it into a skip; B skips c2_0 outright
    p.write("c1_0", B, Y)
    p.pull(cfg, tmp_path, kind)
    p.write("c1_0", B, None)
    p.write("c2_0", B, None)
    res = p.pull(cfg, tmp_path, kind)
    assert _current(cfg)[("c1_0", "2")][1:] == ("withdrawn", None)
    # skips and tasks without text: counted the same in both shapes (JSON-MIN from the task list)
    assert res.summary.rejected[ls.CANCELLED] == 2 and res.summary.rejected[ls.NOT_ANNOTATED] == 3
    assert sorted(p.key for p in res.not_annotated) == KEYS

    # re-annotate after a skip: the skip becomes a text again, a new version to review
    p.write("c2_0", B, Y)
    res = p.pull(cfg, tmp_path, kind)
    assert res.summary.n_out == 1 and _current(cfg)[("c2_0", "2")][1:] == ("submitted", Y)
    an.review(cfg, [an.Decision("c2_0", "approve", "rev")])
    assert _train(cfg) == [("c2_0", _current(cfg)[("c2_0", "2")][0], Y)]

    # an old pull file imported again changes nothing: its texts are older than the current versions
    store = an.AnnotationStore(an.annotations_url(cfg))
    rows = store.history().num_rows
    for f in sorted(tmp_path.glob("pull-*.json")):
        an.import_file(cfg, str(f))
    assert store.history().num_rows == rows
    assert _train(cfg) == [("c2_0", _current(cfg)[("c2_0", "2")][0], Y)]


def test_a_json_min_file_says_once_that_it_cannot_show_skips(selected, tmp_path, caplog):
    p = Project()
    p.write("c0_0", A, words(60))
    p.write("c1_0", B, None)
    doc = json.loads(export([(k, list(p.anns[k].values())) for k in KEYS]))
    f = tmp_path / "min.json"
    f.write_text(json.dumps(_json_min(doc, by_email=False)))
    with caplog.at_level(logging.INFO, logger="pd"):
        res = an.import_file(selected, str(f))
    said = [r.getMessage() for r in caplog.records if "leaves skipped tasks out" in r.getMessage()]
    assert len(said) == 1 and "skipped" in res.summary.extra
    assert ls.CANCELLED not in res.summary.rejected  # not guessed
    # with the server's task list the same file counts them
    res = an.import_file(selected, str(f), tasks=p.tasks())
    assert res.summary.rejected[ls.CANCELLED] == 1 and res.summary.rejected[ls.NOT_ANNOTATED] == 2


def test_a_file_import_never_withdraws(selected, tmp_path):
    p = Project()
    p.write("c0_0", A, words(60))
    p.pull(selected, tmp_path)
    f = tmp_path / "other.jsonl"
    f.write_text(json.dumps({"key": "c1_0", "text": words(70), "annotator": "bob"}) + "\n")
    an.import_file(selected, str(f))
    p.delete("c0_0", A)
    p.write("c2_0", B, words(62))
    p.pull(selected, tmp_path)
    cur = _current(selected)
    assert cur[("c0_0", "1")][1] == "withdrawn"  # gone from Label Studio
    assert cur[("c1_0", "b")][1] == "submitted"  # a CSV/JSONL annotator is not Label Studio's to withdraw


def test_import_removes_leftovers_and_records_its_settings_first(selected, tmp_path, caplog):
    store = an.AnnotationStore(an.annotations_url(selected))
    # a killed import: its shard file moved out of .tmp/, its marker never written
    store.table.fs.makedirs(store.table.path + "/.tmp", exist_ok=True)
    row = {
        "key": "c0_0",
        "version": 1,
        "text": words(60),
        "annotator": "x",
        "content_hash": "h",
        "state": "submitted",
        "recorded_at": datetime.datetime.now(datetime.timezone.utc),
    }
    pq.write_table(pa.Table.from_pylist([row], schema=ANNOTATIONS), store.table.shard_file("import-killed"))
    f = tmp_path / "one.jsonl"
    f.write_text(json.dumps({"key": "c1_0", "text": words(70), "annotator": "bob"}) + "\n")
    with caplog.at_level(logging.WARNING, logger="pd"):
        res = an.import_file(selected, str(f))
    assert res.summary.extra["leftovers_removed"] == 1
    assert not store.table.fs.exists(store.table.shard_file("import-killed"))
    assert [t["key"] for t in store.texts()] == ["c1_0"]
    assert not [r for r in caplog.records if "other annotations settings" in r.getMessage()]
    doc = yaml.safe_load(open(f"{an.annotations_url(selected)}/_config.yaml").read())
    assert "shards_with_other_settings" not in doc
    fp = doc["stage_fingerprint"]
    assert all(m["config_fingerprint"] == fp for m in store.table.markers().values())


@pytest.mark.parametrize(
    "name, body, where",
    [
        ("cut.csv", f"key,text,annotator\nc0_0,{words(60)},bob\nc1_0,{words(61)}", r"line 3: .*'annotator' missing"),
        (
            "cut-in-field.csv",
            f"key,text,annotator\nc0_0,{words(60)},bob\nc1_0,{words(61)},bo",
            r"line 3: .*no line end",
        ),
        (
            "short.csv",
            f"key,text,annotator\nc0_0,{words(60)}\nc1_0,{words(61)},bob\n",
            r"line 2: .*'annotator' missing",
        ),
        ("noann.csv", f"key,text,user\nc0_0,{words(60)},bob\n", r"line 1: .*no 'annotator' column"),
        ("empty-ann.csv", f"key,text,annotator\nc0_0,{words(60)},\n", r"line 2: .*'annotator' is empty"),
        (
            "cut.jsonl",
            json.dumps({"key": "c0_0", "text": words(60), "annotator": "b"}) + '\n{"key": "c1_0", "te',
            "line 2: .*not valid JSON",
        ),
        ("nofield.jsonl", json.dumps({"key": "c0_0", "text": words(60)}) + "\n", r"line 1: .*'annotator' missing"),
    ],
)
def test_a_cut_or_incomplete_plain_file_stops_the_import(selected, tmp_path, name, body, where):
    f = tmp_path / name
    f.write_text(body)
    with pytest.raises(an.ImportRefused, match=f"{name}: nothing imported: {where}"):
        an.import_file(selected, str(f))
    assert an.AnnotationStore(an.annotations_url(selected)).history().num_rows == 0
