"""The voting store: tokens, serving, one vote per voter x pair x question, quotas."""

from __future__ import annotations

import pytest

from eval.vote.db import QUESTIONS, VoteStore
from eval.vote.pairs import build_pairs, export_votes


def _store(tmp_path, images_table, quota=None) -> VoteStore:
    store = VoteStore(tmp_path / "votes.sqlite", quota=quota)
    rows, skipped, mismatch = build_pairs(images_table.read())
    assert store.add_pairs(rows) == 4 and not skipped and not mismatch
    assert store.add_pairs(rows) == 0  # idempotent
    return store


def test_tokens(tmp_path, images_table):
    store = _store(tmp_path, images_table)
    tok = store.add_voter("ann")
    assert store.voter_for(tok).name == "ann"
    assert store.voter_for("") is None and store.voter_for(None) is None and store.voter_for(tok + "x") is None
    assert tok not in (tmp_path / "votes.sqlite").read_bytes().decode("latin-1")  # only the hash is stored
    store.revoke("ann")
    assert store.voter_for(tok) is None


def _loaded(store: VoteStore, voter, pair_id: int) -> None:
    """What the image route records when it has sent both images of a pair."""
    store.mark_loaded(voter.id, pair_id, "A")
    store.mark_loaded(voter.id, pair_id, "B")


def test_serve_vote_once_and_only_served(tmp_path, images_table):
    store = _store(tmp_path, images_table)
    v = store.voter_for(store.add_voter("ann"))
    t1 = store.next_task(v)
    assert not t1["done"] and len(t1["questions"]) == len(QUESTIONS)
    assert store.next_task(v)["pair_id"] == t1["pair_id"]  # a reload shows the same pair
    other = next(i for i in range(1, 5) if i != t1["pair_id"])
    assert store.cast(v, other, "visual_appeal", "A").status == "not_served"
    assert store.cast(v, t1["pair_id"], "visual_appeal", "A").status == "not_loaded"  # no image sent yet
    store.mark_loaded(v.id, t1["pair_id"], "A")
    assert store.cast(v, t1["pair_id"], "visual_appeal", "A").status == "not_loaded"  # only one of the two
    store.mark_loaded(v.id, t1["pair_id"], "B")
    assert store.cast(v, t1["pair_id"], "visual_appeal", "A").status == "accepted"
    assert store.cast(v, t1["pair_id"], "visual_appeal", "B").status == "duplicate"
    t1b = store.next_task(v)
    assert t1b["pair_id"] == t1["pair_id"] and [q["id"] for q in t1b["questions"]] == ["text_faithfulness"]
    res = store.cast(v, t1["pair_id"], "text_faithfulness", "tie")
    assert res.status == "accepted" and (res.done, res.total) == (2, 8)
    assert store.next_task(v)["pair_id"] != t1["pair_id"]
    rows = store.votes_rows()
    assert len(rows) == 2
    a_model = rows[0]["a_model"]
    assert rows[0]["winner"] == a_model and rows[1]["winner"] is None


def test_quota_sides_and_balance(tmp_path, images_table):
    store = _store(tmp_path, images_table, quota=2)
    sides = set()
    for i in range(6):
        v = store.voter_for(store.add_voter(f"v{i}"))
        for _ in range(3):
            task = store.next_task(v)
            if task["done"]:
                break
            sides.add(store.served_sides(v.id, task["pair_id"])[0])
            _loaded(store, v, task["pair_id"])
            for q in task["questions"]:
                assert store.cast(v, task["pair_id"], q["id"], "A").status == "accepted"
        assert task["done"] and task["progress"] == {"done": 4, "total": 4}
    assert sides == {"alpha", "beta"}  # both models appear on side A
    prog = store.progress()
    assert prog["votes"] == 6 * 4
    # least-served first: 6 voters x 2 pairs spread over 4 pairs = 3 each
    served = [store.pair(i)["n_served"] for i in range(1, 5)]
    assert served == [3, 3, 3, 3]


def test_export_parquet_readable_by_duckdb(tmp_path, images_table):
    import duckdb

    store = _store(tmp_path, images_table)
    v = store.voter_for(store.add_voter("ann"))
    task = store.next_task(v)
    _loaded(store, v, task["pair_id"])
    store.cast(v, task["pair_id"], "visual_appeal", "B")
    url, n = export_votes(store, str(tmp_path / "votes"))
    assert n == 1
    got = duckdb.sql(
        f"SELECT question, choice, winner, b_model, voter_role, voter_revoked FROM read_parquet('{url}/part-*.parquet')"
    ).fetchall()
    assert got[0][0] == "visual_appeal" and got[0][1] == "B" and got[0][2] == got[0][3]
    assert got[0][4:] == ("voter", False)


def test_admins_and_revoked_voters_cannot_vote(tmp_path, images_table):
    import pytest

    store = _store(tmp_path, images_table)
    admin = store.voter_for(store.add_voter("boss", role="admin"))
    with pytest.raises(ValueError, match="admin"):
        store.next_task(admin)
    v = store.voter_for(store.add_voter("ann"))
    pid = store.next_task(v)["pair_id"]
    _loaded(store, v, pid)
    # an admin row in `served` (a database from before admins were refused) still cannot vote
    store._conn().execute("INSERT INTO served VALUES (?, ?, 'alpha', 'beta', 0, 1, 1)", (admin.id, pid))
    assert store.cast(admin, pid, "visual_appeal", "A").status == "not_allowed"
    store.revoke("ann")
    assert store.cast(v, pid, "visual_appeal", "A").status == "not_allowed"  # revoked between serving and voting
    assert store.votes_rows() == []


def test_one_study_size_by_construction():
    """The default config has one size for both models of the human study; models of two
    sizes are a config error naming the keys, unless equalise says to crop to eval.vote.size."""
    from pathlib import Path

    from paradiffusion.config import ConfigError
    from pipelines.config import load_config

    yml = str(Path(__file__).resolve().parents[2] / "pipelines.yaml")
    default = load_config([yml]).eval
    sizes = {(default.models[m].width, default.models[m].height) for m in default.study_models()}
    assert default.study_models() == ["paradiffusion", "sdxl"] and sizes == {(1024, 640)}
    assert default.study_size() == (1024, 640)
    tall = ["eval.models.sdxl.width=640", "eval.models.sdxl.height=1024"]
    with pytest.raises(ConfigError, match=r"different sizes \(paradiffusion 1024x640, sdxl 640x1024\)"):
        load_config([yml], tall)
    with pytest.raises(ConfigError, match=r"eval.models.sdxl.width/height differ.*allowed: none, crop"):
        load_config([yml], [*tall, "eval.vote.size=[1024,640]"])
    with pytest.raises(ConfigError, match="eval.vote.equalise"):
        load_config([yml], [*tall, "eval.vote.equalise=letterbox"])
    cropped = load_config([yml], [*tall, "eval.vote.size=[512,512]", "eval.vote.equalise=crop"])
    assert cropped.eval.study_size() == (512, 512)
    with pytest.raises(ConfigError, match="public_url"):
        load_config([yml], ["eval.vote.public_url=https://x.org/?t=1"])
