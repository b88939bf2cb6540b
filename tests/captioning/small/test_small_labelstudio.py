import json
import os
import socket
import xml.etree.ElementTree as ET

import pytest

from captioning.small import labelstudio as ls

# A Label Studio JSON export as the tool writes it (trimmed to the fields it always has).
EXPORT = """[
  {
    "id": 7,
    "data": {"image": "http://x/a.jpg", "key": "a", "draft": "d"},
    "annotations": [
      {"id": 31, "completed_by": {"id": 1, "email": "ann@example.com", "first_name": "Ann"},
       "result": [{"value": {"text": ["First line.", "Second line."]}, "id": "x1", "from_name": "caption",
                   "to_name": "image", "type": "textarea", "origin": "manual"},
                  {"value": {"choices": ["ok"]}, "from_name": "quality", "to_name": "image", "type": "choices"}],
       "was_cancelled": false, "ground_truth": false, "created_at": "2026-01-02T10:00:00.000000Z",
       "updated_at": "2026-01-02T11:30:00.000000Z", "lead_time": 120.5, "task": 7, "project": 1},
      {"id": 32, "completed_by": 5, "result": [], "was_cancelled": true,
       "created_at": "2026-01-02T10:05:00Z", "updated_at": "2026-01-02T10:05:00Z", "lead_time": 3.0}
    ],
    "predictions": [], "drafts": [], "meta": {}, "created_at": "2026-01-01T00:00:00Z"
  },
  {"id": 8, "data": {"image": "http://x/b.jpg"}, "annotations": []},
  {"id": 10, "data": {"key": "d"}, "annotations": []},
  {"id": 9, "data": {"key": "c"}, "annotations": [{"id": 40, "completed_by": 5, "result": [
      {"value": {"text": [""]}, "from_name": "caption", "type": "textarea"}], "was_cancelled": false}]}
]
"""


def test_parse_real_shaped_export():
    entries, problems = ls.parse_label_studio(EXPORT)
    assert len(entries) == 1
    e = entries[0]
    assert (e.key, e.annotator, e.annotator_email, e.text) == (
        "a",
        "labelstudio:1",
        "ann@example.com",
        "First line.\nSecond line.",
    )
    assert e.created_at.isoformat() == "2026-01-02T11:30:00+00:00"  # updated_at wins: the latest edit
    assert e.ref == "line 2, task 7, annotation 31" and e.line == 2
    got = {(p.ref, p.reason) for p in problems}
    assert got == {
        ("line 2, task 7, annotation 32", ls.CANCELLED),
        ("line 17, task 8", ls.MISSING_KEY),
        ("line 18, task 10", ls.NOT_ANNOTATED),
        ("line 19, task 9, annotation 40", ls.EMPTY),
    }
    assert not any(p.fatal for p in problems)


def test_malformed_json_names_the_line_and_is_fatal():
    bad = EXPORT.replace('"id": 8,', '"id": 8,,')
    entries, problems = ls.parse_label_studio(bad)
    fatal = [p for p in problems if p.fatal]
    assert len(fatal) == 1 and fatal[0].line == 17 and "not valid JSON" in fatal[0].detail
    _, problems = ls.parse_label_studio('{"not": "a list"}')
    assert problems[0].fatal and "list of tasks" in problems[0].detail


def test_completed_by_int_and_plain_formats():
    assert ls._annotator(5) == ("labelstudio:5", None) and ls._annotator({"id": 3}) == ("labelstudio:3", None)
    assert ls._annotator("12") == ("labelstudio:12", None)
    assert ls._annotator({"email": "a@b.org"}) == (None, "a@b.org") and ls._annotator("a@b.org") == (None, "a@b.org")
    assert ls._annotator(None) == ("unknown", None)
    entries, problems = ls.parse_jsonl('{"key": "a", "text": "t", "annotator": "x"}\n{oops\n\n[1]\n')
    assert [e.key for e in entries] == ["a"]
    assert [(p.line, p.reason, p.fatal) for p in problems] == [(2, ls.MALFORMED, True)]  # stops there
    entries, problems = ls.parse_csv('key,text,annotator\na,"hello, world",x\n,no key,y\nb,,z\n')
    assert [(e.key, e.text, e.line) for e in entries] == [("a", "hello, world", 2)]
    assert [(p.line, p.reason) for p in problems] == [(3, ls.MISSING_KEY), (4, ls.EMPTY)]
    _, problems = ls.parse_csv("id,words\n1,2\n")
    assert problems[0].fatal


def test_task_and_labeling_config_match():
    task = ls.make_task("k1", "http://x/k1.jpg", "A draft.", "big/p1")
    assert task["data"] == {"image": "http://x/k1.jpg", "key": "k1", "draft": "A draft."}
    pred = task["predictions"][0]["result"][0]
    root = ET.fromstring(ls.labeling_config("caption", 50, 200))
    area = root.find("TextArea")
    image = root.find("Image")
    assert area.get("name") == pred["from_name"] and area.get("toName") == image.get("name") == pred["to_name"]
    assert image.get("value") == "$image" and pred["value"]["text"] == ["A draft."]
    assert "50-200 words" in root.find("Header").get("value")
    assert "predictions" not in ls.make_task("k2", "u", None, None)
    json.dumps(task)  # serialisable


# What Label Studio 1.23.2 writes for exportType=JSON_MIN (trimmed from a real export): one record per
# annotation that was not cancelled; a task nobody annotated is a record with annotation_id null.
EXPORT_MIN = """[
{
  "image": "/data/local-files/?d=images/k0.jpg",
  "key": "k0",
  "draft": "draft 0",
  "id": 1,
  "caption": "cat on k0",
  "annotator": 4,
  "annotation_id": 2,
  "created_at": "2026-11-29T04:22:33.106957Z",
  "updated_at": "2026-11-29T04:22:33.107001Z",
  "lead_time": null
},
{
  "key": "k1",
  "id": 2,
  "caption": ["two", "regions"],
  "annotator": "bob@example.org",
  "annotation_id": 3,
  "created_at": "2026-11-29T04:22:33.314778Z",
  "updated_at": "2026-11-29T04:22:34.061505Z"
},
{
  "key": "k3",
  "id": 4,
  "annotator": null,
  "annotation_id": null,
  "created_at": null
}
]"""


def test_parse_json_min():
    entries, problems = ls.parse_label_studio(EXPORT_MIN)
    assert [(e.key, e.annotator, e.annotator_email, e.text, e.line) for e in entries] == [
        ("k0", "labelstudio:4", None, "cat on k0", 2),
        ("k1", None, "bob@example.org", "two\nregions", 14),
    ]
    assert entries[0].ref == "line 2, task 1, annotation 2"
    assert entries[1].created_at.isoformat() == "2026-11-29T04:22:34.061505+00:00"
    assert [(p.ref, p.reason) for p in problems] == [("line 23, task 4", ls.NOT_ANNOTATED)]
    assert "'k3'" in problems[0].detail


def test_token_comes_from_the_variable_or_the_file(tmp_path, monkeypatch):
    from captioning.small import sync
    from captioning.small.lsclient import LabelStudioError, is_jwt
    from pipelines.config import load_config

    cfg = load_config([], [f"project.data_root={tmp_path}"])
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    with pytest.raises(LabelStudioError, match="set LABEL_STUDIO_API_KEY") as exc:
        sync.resolve_token(cfg)
    assert str(tmp_path / "labelstudio" / "api_token") in str(exc.value)
    (tmp_path / "labelstudio").mkdir()
    (tmp_path / "labelstudio" / "api_token").write_text("a.b.c\n")
    assert sync.resolve_token(cfg) == "a.b.c" and is_jwt("a.b.c")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    assert not is_jwt(sync.resolve_token(cfg))  # a legacy token: sent as "Token ..."
    assert sync.server_url(cfg) == "http://127.0.0.1:8080"


def test_a_taken_port_is_refused_naming_its_owner(tmp_path):
    """`serve` on a port another server holds stops before starting (no "up after 0 s" from the other one)."""
    from captioning.small import lsserver

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        srv = lsserver.LabelStudioServer("/bin/false", tmp_path / "ls", port)
        with pytest.raises(lsserver.ServerError, match=rf"port {port} on 127.0.0.1 is taken by pid {os.getpid()} "):
            srv.start(timeout=5)
        assert srv.proc is None  # nothing was started
    assert lsserver.port_owner(port) is None


def test_pull_files_are_named_once_and_pruned(tmp_path):
    from captioning.small import sync

    for i in range(5):
        (tmp_path / f"project-3-2026010{i}T000000000000-json-min.json").write_text("[]")
    (tmp_path / "project-4-20260101T000000000000-json.json").write_text("[]")
    sync._prune(tmp_path, "project-3-*.json", 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "project-3-20260103T000000000000-json-min.json",
        "project-3-20260104T000000000000-json-min.json",
        "project-4-20260101T000000000000-json.json",
    ]
    infos = sync._task_infos(
        [
            {"id": 7, "data": {"key": "a"}, "total_annotations": 1, "cancelled_annotations": 2},
            {"id": 8, "data": {"image": "x"}},  # not one of ours
            {"id": 9, "data": {"key": "b"}},
        ]
    )
    assert infos == [ls.TaskInfo(7, "a", 1, 2), ls.TaskInfo(9, "b", 0, 0)]
    assert [p.reason for p in ls.task_problems(infos)] == [ls.CANCELLED, ls.CANCELLED, ls.NOT_ANNOTATED]
