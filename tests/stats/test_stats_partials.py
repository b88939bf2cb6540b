"""The partial aggregates give the raw views' answers, stay equal to a full recomputation when
shards change, and every view and query reads committed shards only."""

import datetime as dt
import json
import shutil

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from paradiffusion.schemas import ANNOTATIONS, CAPTIONS, SCORES
from paradiffusion.storage import Table
from pipelines.config import load_config
from stats.run import connect, run_stats


def _cfg(root, *extra):
    return load_config([], [f"project.data_root={root}", "stats.plots=false", "stats.nouns='off'", *extra])


def _rows(res):
    return {n: r.rows for n, r in res.items()}


def _summary(root):
    return json.loads((root / "stats" / "_summary.json").read_text())


def test_partials_answer_like_the_raw_views(tables):
    root, _ = tables
    fast = run_stats(_cfg(root), quiet=True)
    assert _summary(root)["keyed_recomputed"] is True
    views = (root / "stats" / "views.sql").read_text()
    raw = run_stats(_cfg(root, "stats.partials=false"), quiet=True)
    assert set(fast) == set(raw) and len(fast) == 11
    for name in fast:
        assert fast[name].rows == raw[name].rows, name
    # the merged partials are views too: the same totals as the raw rows
    con = duckdb.connect()
    con.execute(views)
    assert (
        con.execute("SELECT sum(rows) FROM agg_sets").fetchone()
        == con.execute("SELECT count(*) FROM captions").fetchone()
    )
    assert (
        con.execute("SELECT sum(n) FROM agg_rejects").fetchone()
        == con.execute("SELECT count(*) FROM scores WHERE NOT kept").fetchone()
    )


def _caption_rows(keys, model, phash, n_words, when, flags=()):
    return [
        {
            "key": k,
            "caption": " ".join(["word"] * (n_words + i)),
            "n_words": n_words + i,
            "model_id": model,
            "prompt_id": "p100",
            "prompt_hash": phash,
            "finish_reason": "stop" if i % 3 else "length",
            "seconds": 0.25 * (i + 1),
            "created_at": when,
            "flags": list(flags),
        }
        for i, k in enumerate(keys)
    ]


def _equal_to_full(root, got, out, scan=False):
    """``got`` (an incremental run's results) against a run from nothing in ``out`` (and a scan
    of the raw views)."""
    full = run_stats(_cfg(root, f"stats.output={out}"), quiet=True)
    assert json.loads((out / "_summary.json").read_text())["keyed_mode"] == "full"
    assert set(got) == set(full)
    for name in got:
        assert got[name].rows == full[name].rows, name
    if scan:
        raw = run_stats(_cfg(root, f"stats.output={out}-scan", "stats.partials=false"), quiet=True)
        assert set(got) == set(raw)
        for name in got:
            assert got[name].rows == raw[name].rows, name


def test_incremental_runs_equal_a_full_recomputation(tables, tmp_path):
    root, raw = tables
    cfg = _cfg(root)
    run_stats(cfg, quiet=True)
    first = _summary(root)
    assert first["derived_shards_read"] == 4 and first["keyed_mode"] == "full"
    # nothing new: no shard read again, the key-level results kept
    run_stats(cfg, quiet=True)
    assert _summary(root)["derived_shards_read"] == 0 and _summary(root)["keyed_recomputed"] is False
    assert _summary(root)["keyed_mode"] == "kept"

    caps = Table(str(root / "captions"), CAPTIONS)
    kept = [s["key"] for s in raw["scores"] if s["kept"]]
    t = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)
    # a recaption replaces shard 00001 (other words, other flags, a key dropped); its keys also
    # have rows in shard 00000, which is not read again
    old = caps.read().slice(30).to_pylist()
    new = [
        dict(r, n_words=r["n_words"] + 7, caption=r["caption"] + " more words here", flags=["too_short"])
        for r in old[1:]
    ]
    caps.write_shard("00001", pa.Table.from_pylist(new, schema=CAPTIONS))
    # in a new shard: a new prompt text for cogvlm used *before* the others (it becomes v1 and
    # relabels the older caption sets, which swaps the sides of their pairs), a third one after
    # them, and a new captioner on keys that other shards captioned too
    early = dt.datetime(2025, 12, 1, tzinfo=dt.timezone.utc)
    rows = (
        _caption_rows(kept[:9], "cogvlm", "h3", 40, t)
        + _caption_rows(kept[3:12], "cogvlm", "h0", 90, early)
        + _caption_rows(kept[5:20], "blip", "b", 12, t, ["repetition"])
    )
    caps.write_shard("00002", pa.Table.from_pylist(rows, schema=CAPTIONS))
    # new images scored and kept
    more = [
        dict(raw["scores"][0], key=f"z{i}", shard="2", width=300 + i, height=700, kept=True, reject_reason=None)
        for i in range(6)
    ]
    Table(str(root / "scores"), SCORES).write_shard("00002", pa.Table.from_pylist(more, schema=SCORES))
    # a reviewer approves one more text
    now = dt.datetime(2026, 2, 2, tzinfo=dt.timezone.utc)
    a = raw["annotations"][-1]  # a submitted text of kept[5]
    review = dict(
        a, version=a["version"] + 1, state="approved", parent_version=a["version"], reviewer="r", recorded_at=now
    )
    Table(str(root / "annotations"), ANNOTATIONS).write_shard("y", pa.Table.from_pylist([review], schema=ANNOTATIONS))

    incremental = run_stats(cfg, quiet=True)
    s = _summary(root)
    assert s["derived_shards_read"] == 3 and s["derived_shards_reused"] == 3
    assert s["keyed_mode"] == "touched" and s["keyed_inputs_changed"] == 4
    # the keys of the changed inputs (all of the annotations: one input), not every key
    touched = {r["key"] for r in old + rows + more + raw["annotations"]}
    everything = {r["key"] for r in raw["images"] + raw["scores"] + more}
    assert s["keyed_touched_keys"] == len(touched) < len(everything)
    assert "vlm:cogvlm/p100#v4" in {r[0] for r in incremental["table1"].rows}
    assert "vlm:blip/p100#v1" in {r[0] for r in incremental["captioners"].rows}
    pv = {r[0]: r[1] for r in incremental["prompt_versions"].rows}
    assert pv["vlm:cogvlm/p100#v1"] == "h0" and pv["vlm:cogvlm/p100#v2"] == "h"
    approved = {r[0]: r[1] for r in incremental["table1"].rows}["annotations_approved"]
    assert approved == 3
    _equal_to_full(root, incremental, tmp_path / "full1", scan=True)
    # the dropped key and the recaption's new word counts are what Table 1 says now
    t1 = {r[0]: r for r in incremental["table1"].rows}
    want = [r["n_words"] for r in caps.read().to_pylist() if r["model_id"] == "llava" and r["n_words"] > 0]
    assert t1["vlm:llava/p100#v1"][2] == len(want)
    assert t1["vlm:llava/p100#v1"][4] == pytest.approx(round(sum(want) / len(want), 1))


def test_removed_shards_leave_the_key_level_totals(tables, tmp_path):
    """A shard whose commit marker goes away (captions and scores) leaves the partials and the
    key-level totals with it, and the update equals a full recomputation."""
    root, _ = tables
    cfg = _cfg(root)
    before = run_stats(cfg, quiet=True)
    (root / "captions" / "_done" / "00001.json").unlink()
    (root / "scores" / "_done" / "00001.json").unlink()
    gone = run_stats(cfg, quiet=True)
    s = _summary(root)
    assert s["keyed_mode"] == "touched" and s["keyed_inputs_changed"] == 2
    assert gone["funnel"].rows != before["funnel"].rows and gone["table1"].rows != before["table1"].rows
    assert not (root / "stats" / "derived" / "captions" / "00001.sets.parquet").exists()
    _equal_to_full(root, gone, tmp_path / "full")
    # only the files the manifest names are kept: one generation, one rows file per input
    keyed = root / "stats" / "derived" / "keyed"
    assert len([p for p in keyed.iterdir() if p.name.startswith("gen-")]) == 1
    assert len(list((keyed / "rows" / "captions").glob("*.parquet"))) == 1
    assert len(list((keyed / "rows" / "scores").glob("*.parquet"))) == 1


def test_a_killed_key_level_update_leaves_the_last_one_whole(tables, tmp_path, monkeypatch):
    """Killed after the new rows files and totals are written but before the manifest names
    them: the next run starts from the previous manifest, still equals a full recomputation, and
    removes what the killed run left."""
    from stats import keyed

    root, raw = tables
    cfg = _cfg(root)
    run_stats(cfg, quiet=True)
    more = [dict(r, key=f"k0{i}", n_words=5, caption="a b c d e") for i, r in enumerate(raw["captions"][:4])]
    Table(str(root / "captions"), CAPTIONS).write_shard("00003", pa.Table.from_pylist(more, schema=CAPTIONS))

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(keyed, "_results", killed)  # after the new rows files and totals, before the manifest
    with pytest.raises(KeyboardInterrupt):
        run_stats(cfg, quiet=True)
    monkeypatch.undo()
    leftovers = list((root / "stats" / "derived" / "keyed").glob(".gen-*"))
    assert leftovers and list((root / "stats" / "derived" / "keyed" / "rows" / "captions").glob("00003-*"))
    got = run_stats(cfg, quiet=True)
    assert _summary(root)["keyed_mode"] == "touched" and _summary(root)["keyed_inputs_changed"] == 1
    assert not any(p.exists() for p in leftovers)
    _equal_to_full(root, got, tmp_path / "full")


def _view_counts(views_sql: str) -> dict[str, int]:
    con = duckdb.connect()
    con.execute(views_sql)
    names = [r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()]
    return {n: con.execute(f"SELECT count(*) FROM {n}").fetchone()[0] for n in names}


def test_every_view_and_query_ignores_uncommitted_shards(tables, tmp_path):
    root, raw = tables
    clean = tmp_path / "clean"
    shutil.copytree(root, clean)
    # the reference: the shards that stay committed, and nothing else
    (clean / "captions" / "part-00001.parquet").unlink()
    (clean / "captions" / "_done" / "00001.json").unlink()
    (clean / "scores" / "part-00001.parquet").unlink()
    (clean / "scores" / "_done" / "00001.json").unlink()

    # the same data plus: two committed shards whose marker was removed (a rewrite in flight) and
    # marker-less shards (a killed run's leftovers, new keys and old ones), in every table read
    (root / "captions" / "_done" / "00001.json").unlink()
    (root / "scores" / "_done" / "00001.json").unlink()
    t = dt.datetime(2026, 5, 1, tzinfo=dt.timezone.utc)
    planted = _caption_rows(["k01", "k02", "q1", "q2"], "ghost", "g", 30, t, ["repetition"])
    pq.write_table(pa.Table.from_pylist(planted, schema=CAPTIONS), root / "captions" / "part-00007.parquet")
    ghost_scores = [
        dict(raw["scores"][1], key=f"q{i}", kept=i % 2 == 0, reject_reason=None if i % 2 == 0 else "language")
        for i in range(5)
    ]
    pq.write_table(pa.Table.from_pylist(ghost_scores, schema=SCORES), root / "scores" / "part-00007.parquet")
    pq.write_table(
        pq.read_table(root / "images" / "00000.parquet"), root / "images" / "00009.parquet"
    )  # no _stats.json

    for partials in ("false", "true"):
        want = run_stats(_cfg(clean, f"stats.partials={partials}"), quiet=True)
        got = run_stats(_cfg(root, f"stats.partials={partials}"), quiet=True)
        assert set(got) == set(want) and len(got) == 11
        for name in want:
            assert got[name].rows == want[name].rows, (partials, name)
        assert "ghost" not in json.dumps({n: r.rows for n, r in got.items()}, default=str)
    text = (root / "stats" / "views.sql").read_text()
    assert "part-00007" not in text and "part-00001" not in text and "00009" not in text and "part-*" not in text
    want_counts = _view_counts((clean / "stats" / "views.sql").read_text())
    got_counts = _view_counts(text)
    assert got_counts == want_counts and len(got_counts) >= 20
    assert got_counts["captions"] == 30 and got_counts["scores"] == 38 and got_counts["images"] == 40


def test_memory_limit_and_threads_are_set_and_checked(tables, tmp_path):
    root, _ = tables
    cfg = _cfg(root, "stats.memory_limit=256MB", "stats.threads=1")
    res = run_stats(cfg, only=["table1", "funnel"], quiet=True)
    assert set(res) == {"table1", "funnel"}
    con = connect([], sc=cfg.stats, out=tmp_path)
    limit, threads, spill = con.execute(
        "SELECT current_setting('memory_limit'), current_setting('threads'), current_setting('temp_directory')"
    ).fetchone()
    assert limit in ("256.0 MiB", "244.1 MiB") and threads == 1 and spill == str(tmp_path / ".duckdb_tmp")
    from paradiffusion.config import ConfigError

    with pytest.raises(ConfigError, match=r"stats.memory_limit"):
        _cfg(root, "stats.memory_limit=lots")
    with pytest.raises(ConfigError, match=r"stats.threads"):
        _cfg(root, "stats.threads=0")
