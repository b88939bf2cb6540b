import json
import re

import pytest
import yaml

from captioning.small import annotations as an
from captioning.small.select import run_select_small
from paradiffusion.schemas import SMALL_TRAIN
from paradiffusion.storage import Table
from pipelines.cli import main


def words(n: int, word: str = "tree") -> str:
    """An English description of exactly ``n`` words."""
    base = (
        "the red boat floats on calm blue water near a wooden pier under a bright morning sky with white clouds "
        "and green hills far behind it while birds fly"
    ).split()
    return " ".join((base * (n // len(base) + 1))[:n])


def ann(aid, who, text, created, updated=None, cancelled=False):
    return {
        "id": aid,
        "completed_by": who,
        "was_cancelled": cancelled,
        "ground_truth": False,
        "lead_time": 60.0,
        "created_at": created,
        "updated_at": updated or created,
        "result": []
        if cancelled
        else [
            {
                "value": {"text": [text]},
                "from_name": "caption",
                "to_name": "image",
                "type": "textarea",
                "origin": "manual",
            }
        ],
    }


def export(tasks):
    """A Label Studio export: one task per (key, annotations), pretty-printed like the real one."""
    return json.dumps(
        [
            {
                "id": i + 1,
                "data": {"image": f"http://x/{k}.jpg", "key": k},
                "annotations": a,
                "predictions": [],
                "drafts": [],
            }
            for i, (k, a) in enumerate(tasks)
        ],
        indent=2,
    )


ALICE = {"id": 1, "email": "alice@example.com"}


@pytest.fixture
def selected(cfg):
    run_select_small(cfg)
    return cfg


@pytest.fixture
def first_export(tmp_path):
    p = tmp_path / "export1.json"
    p.write_text(
        export(
            [
                (
                    "c0_0",
                    [
                        ann(1, ALICE, words(60), "2026-01-02T10:00:00Z"),
                        ann(2, 7, words(80, "x") + " second opinion", "2026-01-02T09:00:00Z"),
                    ],
                ),
                ("c1_0", [ann(3, 7, "", "2026-01-02T10:00:00Z", cancelled=True)]),
                ("c2_0", [ann(4, ALICE, words(70), "2026-01-02T10:00:00Z", updated="2026-01-03T08:00:00Z")]),
                ("c0_1", [ann(5, 7, "A nice picture.", "2026-01-02T12:00:00Z")]),
                ("nope", [ann(6, 7, words(60), "2026-01-02T12:00:00Z")]),
                ("c2_1", [ann(7, 7, words(55), "2026-01-02T12:00:00Z"), ann(8, 7, words(55), "2026-01-02T12:00:00Z")]),
                ("c1_1", [ann(9, ALICE, "   ", "2026-01-02T12:00:00Z")]),
            ]
        )
    )
    return p


def test_import_versions_problems_and_idempotence(selected, data_root, first_export):
    res = an.import_file(selected, str(first_export))
    reasons = sorted((p.reason, p.ref.split(",")[1].strip()) for p in res.problems)
    assert reasons == [
        ("cancelled_annotation", "task 2"),
        ("duplicate_in_file", "task 6"),
        ("empty_annotation", "task 7"),
        ("not_annotated", "task 2"),  # its only annotation is a skip: no text, as a task nobody opened
        ("unknown_key", "task 5"),
    ]
    assert res.summary.n_in == 10 and res.summary.n_out == 5
    # the terminal gets a count per reason; every record, with its line, is in the run's log file
    assert res.log_file and "line 150, task 5, annotation 6: unknown_key" in open(res.log_file).read()
    store = an.AnnotationStore(an.annotations_url(selected))
    hist = store.history("c0_0").to_pylist()
    # two annotators on one key: versions follow their own times (user 7 wrote first); the
    # identity is the Label Studio user id, the email only shown where the export had it
    assert [(r["version"], r["annotator"], r["annotator_email"], r["state"]) for r in hist] == [
        (1, "labelstudio:7", None, "submitted"),
        (2, "labelstudio:1", "alice@example.com", "submitted"),
    ]
    assert hist[1]["source_file"] == "export1.json" and hist[1]["source_ref"].endswith("task 1, annotation 1")
    assert store.history("c2_0").to_pylist()[0]["created_at"].isoformat() == "2026-01-03T08:00:00+00:00"
    shards = store.table.done_shards()
    again = an.import_file(selected, str(first_export))
    assert again.summary.n_out == 0 and again.shard is None and store.table.done_shards() == shards
    assert again.summary.rejected["already_imported"] == 5
    assert store.history().num_rows == 5


def _flip_shapes(tasks: list[dict]) -> list[dict]:
    """The same annotations with completed_by in the other shape: id <-> {id, email}."""
    emails = {1: "alice@example.com", 7: "user7@example.org"}
    out = json.loads(json.dumps(tasks))
    for t in out:
        for a in t["annotations"]:
            cb = a["completed_by"]
            a["completed_by"] = cb["id"] if isinstance(cb, dict) else {"id": cb, "email": emails[cb]}
    return out


def _json_min(tasks: list[dict], by_email: bool) -> list[dict]:
    """What Label Studio's JSON-MIN export writes for these tasks: one record per annotation
    that was not cancelled, the text under the TextArea's name, the annotator as the user id
    (or the email when the export had user dicts)."""
    recs = []
    for t in tasks:
        anns = [a for a in t["annotations"] if not a["was_cancelled"]]
        if not t["annotations"]:
            recs.append({**t["data"], "id": t["id"], "annotator": None, "annotation_id": None, "created_at": None})
        for a in anns:
            cb = a["completed_by"]
            uid = cb["id"] if isinstance(cb, dict) else cb
            recs.append(
                {
                    **t["data"],
                    "id": t["id"],
                    "caption": a["result"][0]["value"]["text"][0] if a["result"] else "",
                    "annotator": {1: "alice@example.com", 7: "user7@example.org"}[uid] if by_email else uid,
                    "annotation_id": a["id"],
                    "created_at": a["created_at"],
                    "updated_at": a["updated_at"],
                    "lead_time": a["lead_time"],
                }
            )
    return recs


def test_one_annotator_is_one_person_in_every_export_shape(selected, tmp_path, first_export):
    """The issue's case: `completed_by` an integer in some tasks and `{id, email}` in others.
    Re-importing the same annotations in the other shape, or as JSON-MIN (ids or emails), adds
    no version and leaves the review states alone."""
    tasks = json.loads(first_export.read_text())
    an.import_file(selected, str(first_export))
    an.review(selected, [an.Decision("c2_0", "approve", "rev"), an.Decision("c0_1", "reject", "rev", "vague")])
    store = an.AnnotationStore(an.annotations_url(selected))
    before = store.history()
    flipped = tmp_path / "flipped.json"
    flipped.write_text(json.dumps(_flip_shapes(tasks)))
    res = an.import_file(selected, str(flipped))
    assert res.summary.n_out == 0 and res.summary.rejected["already_imported"] == 5
    for by_email in (False, True):
        m = tmp_path / f"min-{by_email}.json"
        m.write_text(json.dumps(_json_min(tasks, by_email)))
        res = an.import_file(selected, str(m))
        assert res.summary.n_out == 0, by_email
        assert res.summary.rejected["already_imported"] == 5
    after = store.history()
    assert after.num_rows == before.num_rows
    states = {(t["key"], t["annotator"]): t["state"] for t in store.texts()}
    assert states[("c2_0", "labelstudio:1")] == "approved" and states[("c0_1", "labelstudio:7")] == "rejected"
    # user 7's email became known from the flipped export (which added no version): shown for
    # display, the identity unchanged
    assert {(t["annotator"], t["annotator_email"]) for t in store.texts()} == {
        ("labelstudio:1", "alice@example.com"),
        ("labelstudio:7", "user7@example.org"),
    }
    assert store.emails() == {"alice@example.com": "labelstudio:1", "user7@example.org": "labelstudio:7"}


def test_json_min_with_an_unknown_email_is_reported_not_guessed(selected, tmp_path):
    recs = [{"key": "c0_0", "id": 1, "caption": words(60), "annotator": "zed@example.org", "annotation_id": 5}]
    f = tmp_path / "min.json"
    f.write_text(json.dumps(recs))
    res = an.import_file(selected, str(f))
    assert res.summary.n_out == 0 and [p.reason for p in res.problems] == ["unknown_annotator"]
    assert "pull from the server" in res.problems[0].detail
    # the server's user list (a pull passes it) resolves it
    res = an.import_file(selected, str(f), users={"labelstudio:9": "zed@example.org"})
    (t,) = an.AnnotationStore(an.annotations_url(selected)).texts()
    assert (t["annotator"], t["annotator_email"]) == ("labelstudio:9", "zed@example.org")


def test_tasks_nobody_annotated_are_reported(selected, tmp_path):
    f = tmp_path / "export.json"
    f.write_text(
        export(
            [
                ("c0_0", [ann(1, ALICE, words(60), "2026-01-02T10:00:00Z")]),
                ("c1_0", []),
                ("c2_0", []),
            ]
        )
    )
    res = an.import_file(selected, str(f))
    assert res.summary.n_out == 1
    starts = [i + 1 for i, line in enumerate(f.read_text().splitlines()) if line == "  {"]  # where each task begins
    assert [(p.reason, p.line) for p in res.not_annotated] == [
        ("not_annotated", starts[1]),
        ("not_annotated", starts[2]),
    ]
    assert "task 2" in res.not_annotated[0].ref and "'c1_0'" in res.not_annotated[0].detail
    assert res.summary.extra["not_annotated_positions"] == [p.ref for p in res.not_annotated]
    assert re.search(r"rejected: not_annotated\s+2\n", res.summary.render())
    assert re.search(r"not_annotated_tasks\s+line \d+, task 2 \(key 'c1_0'\); line \d+, task 3 ", res.summary.render())
    assert res.summary.rejected["not_annotated"] == 2
    m = tmp_path / "min.json"
    m.write_text(json.dumps(_json_min(json.loads(f.read_text()), by_email=False)))
    res = an.import_file(selected, str(m))
    assert sorted(p.reason for p in res.problems) == ["already_imported", "not_annotated", "not_annotated"]


def test_each_annotators_text_can_be_reviewed_and_trained_on(selected, data_root, tmp_path):
    f = tmp_path / "two.json"
    bob = {"id": 2, "email": "bob@example.com"}
    f.write_text(
        export(
            [
                (
                    "c0_0",
                    [
                        ann(1, ALICE, words(60), "2026-01-02T10:00:00Z"),
                        ann(2, bob, words(70, "y"), "2026-01-02T11:00:00Z"),
                    ],
                )
            ]
        )
    )
    an.import_file(selected, str(f))
    with pytest.raises(an.ReviewError, match=r"2 texts that can be approved: v1 by alice@example.com .*v2 by bob"):
        an.review(selected, [an.Decision("c0_0", "approve", "rev")])
    an.review(selected, [an.Decision("c0_0", "approve", "rev", version=1)])  # the earlier one: no stale_version
    with pytest.raises(an.ReviewError, match="has no text version 7"):
        an.review(selected, [an.Decision("c0_0", "approve", "rev", version=7)])
    # only bob's text is still open, so no version is needed now; a review row's version names its text
    an.review(selected, [an.Decision("c0_0", "approve", "rev")])
    with pytest.raises(an.ReviewError, match="v1 by alice@example.com .* is 'approved': cannot reject"):
        an.review(selected, [an.Decision("c0_0", "reject", "rev", "x", version=3)])
    texts = an.AnnotationStore(an.annotations_url(selected)).texts()
    assert [(t["version"], t["state"], t["decided_in"]) for t in texts] == [(1, "approved", 3), (2, "approved", 4)]

    an.export_approved(selected)
    train = Table(str(data_root / "small_train"), SMALL_TRAIN).read().to_pylist()
    assert [(r["key"], r["version"], r["annotator"]) for r in train] == [("c0_0", 2, "labelstudio:2")]
    selected.annotations.train_rule = "each"
    an.export_approved(selected)
    train = Table(str(data_root / "small_train"), SMALL_TRAIN).read().sort_by("version").to_pylist()
    assert [(r["version"], r["annotator"], r["caption"]) for r in train] == [
        (1, "labelstudio:1", words(60)),
        (2, "labelstudio:2", words(70, "y")),
    ]
    # the rerun with train_rule "each" rewrote the table: its config claims no shard for other settings
    doc = yaml.safe_load((data_root / "small_train" / "_config.yaml").read_text())
    assert "shards_with_other_settings" not in doc and doc["stage_settings"]["train_rule"] == "each"


def test_an_edit_supersedes_the_annotators_earlier_text(selected, data_root, tmp_path):
    first = tmp_path / "first.json"
    first.write_text(export([("c0_0", [ann(1, ALICE, words(60), "2026-01-02T10:00:00Z")])]))
    an.import_file(selected, str(first))
    an.review(selected, [an.Decision("c0_0", "approve", "rev")])
    # alice edits her annotation in Label Studio: same annotation id, new text, later updated_at
    edited = tmp_path / "edited.json"
    edited.write_text(
        export([("c0_0", [ann(1, ALICE, words(65), "2026-01-02T10:00:00Z", updated="2026-01-04T10:00:00Z")])])
    )
    assert an.import_file(selected, str(edited)).summary.n_out == 1
    store = an.AnnotationStore(an.annotations_url(selected))
    assert [(t["version"], t["state"], t["superseded"]) for t in store.texts()] == [
        (1, "approved", True),
        (3, "submitted", False),
    ]
    # the approved text is no longer what alice stands by: it leaves the training table until the edit is approved
    an.export_approved(selected)
    assert Table(str(data_root / "small_train"), SMALL_TRAIN).read().num_rows == 0
    with pytest.raises(an.ReviewError, match="v1 was replaced by v3 from the same annotator"):
        an.review(selected, [an.Decision("c0_0", "reject", "rev", "old", version=1)])
    an.review(selected, [an.Decision("c0_0", "approve", "rev")])
    an.export_approved(selected)
    (row,) = Table(str(data_root / "small_train"), SMALL_TRAIN).read().to_pylist()
    assert (row["version"], row["n_words"]) == (3, 65)
    st = an.status(selected)
    assert st["texts"] == 1 and st["by_state"]["approved"] == 1 and st["keys_by_state"]["approved"] == 1


def test_malformed_file_writes_nothing(selected, tmp_path, first_export):
    bad = tmp_path / "broken.json"
    bad.write_text(first_export.read_text()[:-40])  # cut off mid-task
    with pytest.raises(an.ImportRefused, match=r"broken.json: nothing imported: line \d+: malformed"):
        an.import_file(selected, str(bad))
    assert an.AnnotationStore(an.annotations_url(selected)).history().num_rows == 0
    assert main(["annotations", "import", str(bad), "--set", f"project.data_root={selected.project.data_root}"]) == 1


def test_jsonl_and_csv_imports(selected, tmp_path):
    j = tmp_path / "more.jsonl"
    j.write_text(json.dumps({"key": "c0_0", "text": words(60), "annotator": "bob"}) + "\n")
    res = an.import_file(selected, str(j))
    assert res.summary.n_out == 1 and res.problems == []
    c = tmp_path / "more.csv"
    c.write_text(f"key,text,annotator\nc0_0,{words(60)},bob\nc1_0,{words(61)},bob\n")
    res = an.import_file(selected, str(c))
    assert res.summary.n_out == 1 and res.problems[0].reason == "already_imported"


def test_review_transitions_checks_and_export(selected, data_root, first_export, tmp_path):
    an.import_file(selected, str(first_export))
    cfg = selected
    ok = an.Decision("c2_0", "approve", "rev", "good")
    an.review(cfg, [ok])
    hist = an.AnnotationStore(an.annotations_url(cfg)).history("c2_0").to_pylist()
    assert [(r["version"], r["state"], r["parent_version"], r["reviewer"]) for r in hist] == [
        (1, "submitted", None, None),
        (2, "approved", 1, "rev"),
    ]
    assert hist[1]["text"] == hist[0]["text"] and hist[1]["reviewed_at"] is not None
    with pytest.raises(an.ReviewError, match="'approved': cannot approve it"):
        an.review(cfg, [ok])
    with pytest.raises(an.ReviewError, match="'approved': cannot reject"):
        an.review(cfg, [an.Decision("c2_0", "reject", "rev", "changed my mind")])
    with pytest.raises(an.ReviewError, match="fails the guidelines .*words, outside 50-200.*vague: 'nice picture'"):
        an.review(cfg, [an.Decision("c0_1", "approve", "rev")])
    with pytest.raises(an.ReviewError, match="needs a --comment"):
        an.review(cfg, [an.Decision("c0_1", "reject", "rev")])
    with pytest.raises(an.ReviewError, match="has no annotation"):
        an.review(cfg, [an.Decision("c1_0", "approve", "rev")])
    with pytest.raises(an.ReviewError, match="2 texts that can be approved"):
        an.review(cfg, [an.Decision("c0_0", "approve", "rev")])
    # batch from a file: one good line, one disallowed, one bad version; the good one is applied
    batch = tmp_path / "decisions.csv"
    batch.write_text(
        "key,decision,reviewer,comment,version\nc0_1,reject,rev,too short and vague,\n"
        "c2_0,approve,rev,,\nc0_0,approve,,,x\n"
    )
    summary, refused = an.review(cfg, *an.read_decisions(str(batch))[:1])
    assert summary.n_out == 1 and len(refused) == 1 and "line 3" in refused[0]
    assert dict(summary.rejected) == {"transition_not_allowed": 1}
    assert an.read_decisions(str(batch))[1] == [f"{batch}: line 4: malformed version 'x'"]
    # draft -> submitted -> approved
    cfg.annotations.import_state = "draft"
    j = tmp_path / "draft.jsonl"
    j.write_text(json.dumps({"key": "c1_1", "text": words(90), "annotator": "bob"}) + "\n")
    an.import_file(cfg, str(j))
    with pytest.raises(an.ReviewError, match="'draft': cannot approve"):
        an.review(cfg, [an.Decision("c1_1", "approve", "rev")])
    an.review(cfg, [an.Decision("c1_1", "submit", "bob")])
    an.review(cfg, [an.Decision("c1_1", "approve", "rev", version=2)])  # v2 = the submit row: it names text v1
    with pytest.raises(an.ReviewError, match="v1 by bob is 'approved'"):
        an.review(cfg, [an.Decision("c1_1", "reject", "rev", "no", version=2)])

    st = an.status(cfg)
    # texts: c0_0 has two (both submitted), c2_1 submitted, c2_0 and c1_1 approved, c0_1 rejected
    assert st["by_state"] == {"draft": 0, "submitted": 3, "approved": 2, "rejected": 1}
    assert st["keys_by_state"] == {"approved": 2, "submitted": 2, "draft": 0, "rejected": 1}
    assert st["not_started"] == 1 and st["keys_to_annotate"] == 6 and st["texts"] == 6
    assert st["by_annotator"]["alice@example.com (labelstudio:1)"] == {
        "draft": 0,
        "submitted": 1,
        "approved": 1,
        "rejected": 0,
    }
    assert "alice@example.com (labelstudio:1)" in an.render_status(st)

    an.export_approved(cfg)
    train = Table(str(data_root / "small_train"), SMALL_TRAIN).read().sort_by("key").to_pylist()
    assert [(r["key"], r["version"], r["annotator"], r["n_words"]) for r in train] == [
        ("c1_1", 1, "bob", 90),
        ("c2_0", 1, "labelstudio:1", 70),
    ]
    assert train[1]["caption"] == words(70) and train[1]["reviewer"] == "rev"


def test_cli_round_trip(selected, data_root, tmp_path, capsys):
    sets = ["--set", f"project.data_root={data_root}"]
    assert main(["annotations", "export", *sets]) == 0
    tasks = json.loads((data_root / "annotation_tasks" / "tasks.json").read_text())
    assert len(tasks) == 6 and tasks[0]["data"]["key"] == "c2_0"
    # the selected caption (caption.select): no preference matches, no flags, so the newest (the 'big' model's)
    assert tasks[0]["predictions"][0]["result"][0]["value"]["text"] == ["A draft caption for c2_0 by the big model."]
    assert tasks[0]["predictions"][0]["model_version"] == "big/p1"
    assert (data_root / "annotation_tasks" / "labeling_config.xml").exists()
    assert main(["annotations", "export", *sets, "--set", "caption.select.prefer=[{model: small}]"]) == 0
    tasks = json.loads((data_root / "annotation_tasks" / "tasks.json").read_text())
    assert tasks[0]["data"]["draft"] == "An earlier draft for c2_0."

    from captioning.small.simulate import simulated_export

    f = tmp_path / "sim.json"
    f.write_text(json.dumps(simulated_export(tasks)))
    assert main(["annotations", "import", str(f), *sets]) == 0
    assert main(["annotations", "review", "--key", "c2_0", "--approve", "--reviewer", "r", *sets]) == 0
    assert main(["annotations", "review", "--key", "c2_0", "--approve", "--reviewer", "r", *sets]) == 1
    assert "cannot approve it" in capsys.readouterr().err
    assert main(["annotations", "status", *sets]) == 0
    assert "approved: 1" in capsys.readouterr().out
    assert main(["annotations", "history", "--key", "c2_0", *sets]) == 0
    out = capsys.readouterr().out
    assert "v1 submitted text by annotator.one@example.com (labelstudio:11)" in out
    assert (
        "v2 approved  decides v1, by r" in out and "v1 by annotator.one@example.com (labelstudio:11): approved" in out
    )
    assert "guideline checks: ok" in out
    assert main(["annotations", "history", "--key", "nope", *sets]) == 1
    assert main(["annotations", "export-approved", *sets]) == 0
    assert main(["annotations", "review", "--key", "c2_0", *sets]) == 2
