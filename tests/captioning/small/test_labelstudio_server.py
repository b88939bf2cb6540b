"""The annotation round trip against a real Label Studio server (slow: it starts one, ~1-2 min).

Label Studio runs from its own virtual environment (``.venv-labelstudio/`` at the repository
root, made by ``make setup``; this test installs it there on first use when it is missing),
offline on 127.0.0.1 with SQLite in a temporary folder. Two people sign up through the
organisation's invite link and annotate through the API with their own personal access
tokens, as the UI would on their behalf: both describe one image, one edits a description
later, one skips a task, two tasks are left alone.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from captioning.small import annotations as an
from captioning.small import lsserver
from captioning.small.lsclient import LabelStudioClient
from captioning.small.select import run_select_small
from paradiffusion.schemas import SCORES, SMALL_TRAIN
from paradiffusion.storage import Table
from paradiffusion.testing.image_shards import write_image_shard
from pipelines.cli import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]
VERSION = "1.23.2"


def words(n: int, word: str = "boat") -> str:
    """A description of exactly ``n`` words."""
    base = f"the red {word} floats on calm blue water near a wooden pier under a bright sky".split()
    return " ".join((base * (n // len(base) + 1))[:n])


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (96, 64), (20 * i % 256, 120, 200 - 10 * i % 200)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def project(cfg, data_root, tmp_path):
    """Candidates with image bytes, and the config of a round trip through a local server."""
    scores = Table(str(data_root / "scores"), SCORES).read(columns=["key", "url"]).to_pylist()
    rows = [
        {"key": r["key"], "url": r["url"], "caption": "", "jpg": _jpeg(i), "status": "success", "error_message": None}
        for i, r in enumerate(scores)
    ]
    (data_root / "images").mkdir()
    write_image_shard(data_root / "images", "00000", rows)
    port = lsserver.free_port()
    venv = os.environ.get("PARADIFFUSION_LABEL_STUDIO_VENV", str(REPO / ".venv-labelstudio"))
    sets = [
        f"project.data_root={data_root}",
        "select_small.n_candidates=6",
        "select_small.n_clusters=3",
        "select_small.min_aesthetic=5",
        "select_small.min_short_side=1000",
        "annotations.image_source=files",
        f"annotations.label_studio.port={port}",
        f"annotations.label_studio.venv={venv}",
        f"annotations.label_studio.data_dir={tmp_path / 'labelstudio'}",
        "annotations.language=null",  # the texts below are word lists
    ]
    from pipelines.config import load_config

    c = load_config([], sets)
    run_select_small(c)
    return c, sets


@pytest.fixture
def server(project):
    cfg, _ = project
    lc = cfg.annotations.label_studio
    exe = lsserver.ensure_installed(lc.venv, VERSION)  # installs on first use (about 2 minutes)
    files_root = Path(an.export_dir(cfg))
    files_root.mkdir(parents=True)
    empty_db = lsserver.empty_database(lc.venv)
    srv = lsserver.LabelStudioServer(exe, lc.data_dir, lc.port, lc.admin_email, None, files_root, empty_db)
    with srv.start(lc.start_timeout_s):
        print(f"Label Studio {VERSION} answered /health {srv.started_in:.0f} s after start")
        yield srv


def _person(server, invite: str, email: str) -> tuple[int, LabelStudioClient]:
    password = f"pw-{email.split('@')[0]}-0123456789"
    lsserver.sign_up(invite, email, password)
    client = LabelStudioClient(server.url, lsserver.personal_access_token(server.url, email, password))
    return int(client.whoami()["id"]), client


def _annotate(client: LabelStudioClient, task_id: int, text: str | None) -> dict:
    body = (
        {"result": [], "was_cancelled": True}
        if text is None
        else {
            "result": [{"from_name": "caption", "to_name": "image", "type": "textarea", "value": {"text": [text]}}],
            "lead_time": 42.0,
        }
    )
    return client.request("POST", f"/api/tasks/{task_id}/annotations/", json=body).json()


def test_round_trip_through_a_real_label_studio(project, server, tmp_path):
    cfg, sets = project
    args = [a for s in sets for a in ("--set", s)]
    lsserver.admin_token(server)  # <data_dir>/api_token: what push and pull read

    # ---- push: project with our labeling config, tasks with images served by Label Studio and drafts
    assert main(["annotations", "push", *args]) == 0
    tasks = json.loads((Path(an.export_dir(cfg)) / "tasks.json").read_text())
    keys = [t["data"]["key"] for t in tasks]
    assert len(keys) == 6
    admin = LabelStudioClient(server.url, (Path(cfg.annotations.label_studio.data_dir) / "api_token").read_text())
    project = admin.find_project("ParaImage-Small")
    assert project["label_config"].strip() == (Path(an.export_dir(cfg)) / "labeling_config.xml").read_text().strip()
    ids = admin.task_keys(project["id"])
    assert set(ids) == set(keys)
    assert main(["annotations", "push", *args]) == 0  # pushing again adds nothing
    assert len(admin.task_keys(project["id"])) == 6

    invite = lsserver.invite_url(server.url, lsserver.admin_token(server))
    ann_id, ann = _person(server, invite, "ann@example.org")
    bob_id, bob = _person(server, invite, "bob@example.org")
    ANN, BOB = f"labelstudio:{ann_id}", f"labelstudio:{bob_id}"

    # the image as an annotator's browser loads it: served by Label Studio from the local files storage
    task = ann.request("GET", f"/api/tasks/{ids[keys[0]]}/").json()
    assert task["data"]["image"].startswith("/data/local-files/?d=images/")
    assert task["predictions"][0]["result"][0]["value"]["text"] == [task["data"]["draft"]] and task["data"]["draft"]
    img = ann.request("GET", task["data"]["image"]).content
    local = Path(an.export_dir(cfg)) / "images" / task["data"]["image"].rsplit("/", 1)[-1]
    assert img == local.read_bytes() and img[:3] == b"\xff\xd8\xff"

    # ---- people at work: two on one task, an edit to come, a skip, two tasks left alone
    k_two, k_edit, k_skip, k_bob, *k_alone = keys
    _annotate(ann, ids[k_two], words(60))
    _annotate(bob, ids[k_two], words(70, "y"))
    edited = _annotate(ann, ids[k_edit], words(55))
    _annotate(bob, ids[k_skip], None)
    _annotate(bob, ids[k_bob], words(62))

    assert main(["annotations", "pull", *args]) == 0
    store = an.AnnotationStore(an.annotations_url(cfg))
    got = [(t["key"], t["version"], t["annotator"], t["annotator_email"], t["state"]) for t in store.texts()]
    assert sorted(got) == sorted(
        [
            (k_two, 1, ANN, "ann@example.org", "submitted"),  # versions follow the annotators' times
            (k_two, 2, BOB, "bob@example.org", "submitted"),
            (k_edit, 1, ANN, "ann@example.org", "submitted"),
            (k_bob, 1, BOB, "bob@example.org", "submitted"),
        ]
    )
    summary = json.loads((Path(an.annotations_url(cfg)) / "_summary.json").read_text())
    # the skipped task has no text: not annotated, like the two nobody opened; the skip counted too
    assert summary["rejected"] == {"cancelled_annotation": 1, "not_annotated": 3}
    assert len(summary["not_annotated_positions"]) == 3
    assert all(f"task {ids[k]}" in " ".join(summary["not_annotated_positions"]) for k in [k_skip, *k_alone])

    # ---- review: each annotator's text on the shared task, by version; a rejection
    assert main(["annotations", "review", "--key", k_two, "--approve", "--reviewer", "rev", *args]) == 1  # which?
    for v in (1, 2):
        assert (
            main(
                ["annotations", "review", "--key", k_two, "--approve", "--reviewer", "rev", "--version", str(v), *args]
            )
            == 0
        )
    assert (
        main(["annotations", "review", "--key", k_bob, "--reject", "--reviewer", "rev", "--comment", "more", *args])
        == 0
    )

    # ---- ann edits her description in Label Studio; a JSON-MIN pull brings only that
    ann.request(
        "PATCH",
        f"/api/annotations/{edited['id']}/",
        json={
            "result": [{"from_name": "caption", "to_name": "image", "type": "textarea", "value": {"text": [words(58)]}}]
        },
    )
    assert main(["annotations", "pull", "--export-type", "JSON_MIN", *args]) == 0
    summary = json.loads((Path(an.annotations_url(cfg)) / "_summary.json").read_text())
    # JSON-MIN leaves the skipped task out; the pull counts it from the server's task list, as JSON does
    assert summary["out"] == 1
    assert summary["rejected"] == {"already_imported": 3, "cancelled_annotation": 1, "not_annotated": 3}
    texts = {(t["key"], t["version"]): t for t in store.texts()}
    assert (texts[(k_edit, 1)]["superseded"], texts[(k_edit, 2)]["superseded"]) == (True, False)
    assert texts[(k_edit, 2)]["text"] == words(58) and texts[(k_edit, 2)]["annotator"] == ANN
    states = {(k, v): t["state"] for (k, v), t in texts.items()}
    assert states == {
        (k_two, 1): "approved",
        (k_two, 2): "approved",
        (k_edit, 1): "submitted",
        (k_edit, 2): "submitted",
        (k_bob, 1): "rejected",
    }

    # ---- the same annotations again, in both shapes, from the server and from the saved files: nothing new
    rows_before = store.history().num_rows
    assert main(["annotations", "pull", "--export-type", "JSON", *args]) == 0
    pulls = sorted((Path(an.export_dir(cfg)) / "pulls").glob("*.json"))
    assert [p.stem.split("-", 3)[3] for p in pulls] == ["json", "json-min", "json"]
    for f in pulls:
        assert main(["annotations", "import", str(f), *args]) == 0
    assert store.history().num_rows == rows_before
    assert {(t["key"], t["version"]): t["state"] for t in store.texts()} == states

    # ---- the stage-3 table, by the documented rule
    assert main(["annotations", "export-approved", *args]) == 0
    train = Table(an.train_url(cfg), SMALL_TRAIN).read().to_pylist()
    assert [(r["key"], r["version"], r["annotator"]) for r in train] == [(k_two, 2, BOB)]
    assert main(["annotations", "export-approved", "--set", "annotations.train_rule=each", *args]) == 0
    train = Table(an.train_url(cfg), SMALL_TRAIN).read().sort_by("version").to_pylist()
    assert [(r["key"], r["version"], r["annotator"]) for r in train] == [(k_two, 1, ANN), (k_two, 2, BOB)]


def _text(text: str) -> list[dict]:
    return [{"from_name": "caption", "to_name": "image", "type": "textarea", "value": {"text": [text]}}]


def test_pulls_follow_what_annotators_did(project, server, tmp_path, capsys):
    """Write, edit, revert, delete, skip and re-annotate after a skip, each followed by a pull
    (JSON, then JSON-MIN) and the stage-3 table: `small_train` holds exactly the approved texts
    that are still current in Label Studio. The loop's time is printed (BENCHMARKS.md)."""
    import time

    cfg, sets = project
    args = [a for s in sets for a in ("--set", s)]
    lsserver.admin_token(server)
    t0 = time.monotonic()
    assert main(["annotations", "push", *args]) == 0
    admin = LabelStudioClient(server.url, (Path(cfg.annotations.label_studio.data_dir) / "api_token").read_text())
    ids = admin.task_keys(admin.find_project("ParaImage-Small")["id"])
    invite = lsserver.invite_url(server.url, lsserver.admin_token(server))
    ann_id, ann = _person(server, invite, "ann@example.org")
    bob_id, bob = _person(server, invite, "bob@example.org")
    store = an.AnnotationStore(an.annotations_url(cfg))
    X, Y, Z = words(60), words(61, "cat"), words(62, "dog")

    spent = {"pull": 0.0, "export-approved": 0.0, "review": 0.0}

    def timed(what: str, argv: list[str]) -> int:
        t = time.monotonic()
        rc = main(argv)
        spent[what] += time.monotonic() - t
        return rc

    def pull(kind: str) -> dict:
        assert timed("pull", ["annotations", "pull", "--export-type", kind, *args]) == 0
        return json.loads((Path(an.annotations_url(cfg)) / "_summary.json").read_text())

    def current(key: str, who: int) -> tuple:
        (t,) = [
            t
            for t in store.texts()
            if t["key"] == key and t["annotator"] == f"labelstudio:{who}" and not t["superseded"]
        ]
        return t["version"], t["state"], t["text"]

    def train(key: str) -> list[tuple]:
        assert timed("export-approved", ["annotations", "export-approved", *args]) == 0
        rows = Table(an.train_url(cfg), SMALL_TRAIN).read().to_pylist()
        return [(r["version"], r["caption"]) for r in rows if r["key"] == key]

    def approve(key: str) -> None:
        assert timed("review", ["annotations", "review", "--key", key, "--approve", "--reviewer", "rev", *args]) == 0

    for kind, key in zip(("JSON", "JSON_MIN"), sorted(ids)[:2], strict=True):
        tid = ids[key]
        a = _annotate(ann, tid, X)  # write
        assert pull(kind)["out"] == 1 and current(key, ann_id)[1:] == ("submitted", X)
        approve(key)
        v1 = current(key, ann_id)[0]
        assert train(key) == [(v1, X)]

        ann.request("PATCH", f"/api/annotations/{a['id']}/", json={"result": _text(Y)})  # edit
        assert pull(kind)["out"] == 1 and current(key, ann_id)[1:] == ("submitted", Y)
        assert train(key) == []  # the approved X is not what ann stands by any more

        ann.request("PATCH", f"/api/annotations/{a['id']}/", json={"result": _text(X)})  # revert
        assert pull(kind)["out"] == 1
        v_revert, state, text = current(key, ann_id)
        assert (state, text) == ("submitted", X) and v_revert > v1
        assert train(key) == []  # v1 was approved, but it is not current: the revert needs its own review
        approve(key)
        assert train(key) == [(v_revert, X)]
        assert pull(kind)["out"] == 0  # nothing changed in Label Studio

        ann.request("DELETE", f"/api/annotations/{a['id']}/", ok=(204,))  # delete
        s = pull(kind)
        assert s["out"] == 1 and s["withdrawn"] == 1 and current(key, ann_id)[1:] == ("withdrawn", None)
        assert train(key) == []
        assert main(["annotations", "review", "--key", key, "--approve", "--reviewer", "rev", *args]) == 1

        skip = _annotate(bob, tid, None)  # skip
        s = pull(kind)
        assert s["out"] == 0 and s["rejected"]["cancelled_annotation"] == 1
        assert f"task {tid}" in " ".join(s["not_annotated_positions"])  # a skipped task has no text
        assert train(key) == []

        bob.request(  # re-annotate after the skip: the same annotation, now with a text
            "PATCH", f"/api/annotations/{skip['id']}/", json={"result": _text(Z), "was_cancelled": False}
        )
        s = pull(kind)
        assert s["out"] == 1 and "cancelled_annotation" not in s["rejected"]
        assert current(key, bob_id)[1:] == ("submitted", Z)
        approve(key)
        assert train(key) == [(current(key, bob_id)[0], Z)]
    took = time.monotonic() - t0
    with capsys.disabled():
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in spent.items())
        print(
            f"\nthe annotation loop (push, 2 x 6 cases with a pull, review and export-approved each): {took:.1f} s ({parts})"
        )
