"""Many voters at once on a real server (uvicorn on loopback): no vote lost or doubled."""

from __future__ import annotations

from eval.vote.app import create_app
from eval.vote.db import VoteStore
from eval.vote.pairs import build_pairs
from eval.vote.server import serve_in_thread
from eval.vote.simulate import run_voters

N_VOTERS = 50
PAIRS_PER_VOTER = 6  # x 2 questions = 12 answers each, 600 in all, plus 600 refused re-sends


def test_fifty_concurrent_voters(tmp_path, make_images):
    images = make_images(tmp_path / "images", models=("m1", "m2", "m3"), n_prompts=6)
    store = VoteStore(tmp_path / "votes.sqlite", quota=PAIRS_PER_VOTER)
    store.add_pairs(build_pairs(images.read())[0])
    tokens = [store.add_voter(f"v{i}") for i in range(N_VOTERS)]
    with serve_in_thread(create_app(store, tmp_path / "images", size=(40, 24))) as url:
        runs = run_voters(url, tokens, retry_duplicate=True)
    assert not [e for r in runs for e in r.errors]
    accepted = sum(r.accepted for r in runs)
    assert accepted == N_VOTERS * PAIRS_PER_VOTER * 2
    assert sum(r.status[409] for r in runs) == sum(r.duplicates_tried for r in runs) == accepted
    rows = store.votes_rows()
    assert len(rows) == accepted  # nothing lost, nothing doubled
    keys = {(r["voter"], r["pair_id"], r["question"]) for r in rows}
    assert len(keys) == len(rows)
    per_voter = {r["voter"] for r in rows}
    assert len(per_voter) == N_VOTERS
