"""The report: which votes count, the prompt count beside every interval, few-prompt rows
flagged, a page that fits a phone (the screenshot is in the browser test)."""

from __future__ import annotations

import re

import numpy as np
import yaml

from eval.metrics import aggregate
from eval.report import build_report, counted_votes
from eval.vote.db import VoteStore
from eval.vote.pairs import build_pairs
from paradiffusion.storage import Table
from pipelines.config import load_config


def _cfg(tmp_path, **vote):
    f = tmp_path / "c.yaml"
    f.write_text(
        yaml.safe_dump(
            {"project": {"data_root": str(tmp_path / "data")}, "eval": {"vote": vote, "report": {"bootstrap": 200}}}
        )
    )
    return load_config([str(f)])


def _vote_all(store: VoteStore, name: str, choice: str) -> None:
    v = store.voter_for(store.add_voter(name))
    while not (task := store.next_task(v))["done"]:
        store.mark_loaded(v.id, task["pair_id"], "A")
        store.mark_loaded(v.id, task["pair_id"], "B")
        for q in task["questions"]:
            assert store.cast(v, task["pair_id"], q["id"], choice).status == "accepted"


def test_counted_votes_rule():
    rows = [
        {"voter_role": "voter", "voter_revoked": False},
        {"voter_role": "voter", "voter_revoked": True},
        {"voter_role": "admin", "voter_revoked": False},
    ]
    kept, left = counted_votes(rows)
    assert len(kept) == 1 and sum(left.values()) == 2
    kept, left = counted_votes(rows, count_revoked=True)
    assert len(kept) == 2 and list(left) == ["from admin tokens (an admin sees the models)"]


def test_report_counts_flags_and_fits(tmp_path, make_images):
    images = make_images(tmp_path / "data" / "eval" / "images", n_prompts=12)
    store = VoteStore(tmp_path / "data" / "eval" / "votes" / "votes.sqlite")
    store.add_pairs(build_pairs(images.read()).rows)
    _vote_all(store, "ann", "A")
    _vote_all(store, "bob", "A")
    _vote_all(store, "carol", "B")
    store.revoke("carol")
    admin = store.voter_for(store.add_voter("boss", role="admin"))
    # a vote from an admin token, as a database from before admins were refused may hold
    store._conn().execute(
        "INSERT INTO votes (voter_id, pair_id, question, choice, winner, a_model, b_model, created_at) "
        "VALUES (?, 1, 'visual_appeal', 'A', 'alpha', 'alpha', 'beta', 0)",
        (admin.id,),
    )
    # metrics: 12 prompts in all, 6 per category
    rng = np.random.default_rng(0)
    rows = [
        {
            "model": "alpha",
            "prompt_set": "set1",
            "prompt_id": f"p{p}",
            "category": f"cat{p % 2}",
            "clip_score": float(rng.normal(30, 2)),
            "error": None,
        }
        for p in range(12)
    ]
    metrics = Table(str(tmp_path / "data" / "eval" / "metrics"))
    metrics.save_json(
        "_aggregate.json",
        {"ci_method": "bootstrap over prompts", "clip_score_note": "x100", "rows": aggregate(rows, 200)},
    )
    page, counts = build_report(_cfg(tmp_path))
    assert 'name=viewport content="width=device-width, initial-scale=1"' in page
    counted = re.search(r"<p class=note id=votes-counted>(.*?)</p>", page).group(1)
    assert counted.startswith("Counted 48 of 73 votes, from 2 voters; left out: ")
    assert "1 from admin tokens" in counted and "24 from revoked voters" in counted
    assert counts["votes"] == 48
    # every interval has its prompt count; the two 6-prompt categories are flagged, the 12-prompt rows are not
    intervals = re.findall(r"<span class=ci>\[[^\]]+\]( n=\d+)?</span>", page)
    assert intervals and all(intervals)
    assert page.count("<tr class=few>") == 2 and counts["rows_under_min_prompts"] == 2
    assert "&#9888; 6 prompts" in page and page.count("<div class=scroll><table>") == 1  # the metrics table
    # the voting table stacks on a narrow screen: every cell carries its column name
    vote_table = re.search(r"<table class=stack id=voting-rates>(.*?)</table>", page).group(1)
    cells = re.findall(r"<td[^>]*>", vote_table)
    assert cells and all("data-label=" in c for c in cells) and len(cells) % 10 == 0
    assert "@media (max-width:640px)" in page and "table.stack td::before{content:attr(data-label)" in page
    # the win rate (ties half) with its interval as a plot: one bar per comparison and question, all prompt sets
    bars = re.findall(r'<g class=bar data-mean="([\d.]+)" data-low="([\d.]+)" data-high="([\d.]+)">', page)
    assert len(bars) == 2 and all(0 <= float(lo) <= float(m) <= float(hi) <= 1 for m, lo, hi in bars)
    rows_all = [r for r in re.findall(r"<tr[^>]*>(.*?)</tr>", vote_table) if ">ALL</td>" in r]
    half = [re.search(r'data-label="X, ties half">([\d.]+) %', r).group(1) for r in rows_all]
    assert [f"{float(m) * 100:.1f}" for m, _, _ in bars] == half  # the plot shows the table's numbers
    # counting the revoked voter's votes is a setting
    page2, counts2 = build_report(_cfg(tmp_path, count_revoked=True))
    assert counts2["votes"] == 72 and "Counted 72 of 73 votes, from 3 voters" in page2
