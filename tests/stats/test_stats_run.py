import json

import duckdb
import pytest

from pipelines.config import load_config
from stats import nouns
from stats.queries import bucket_labels
from stats.run import run_stats
from stats.views import build_views, find_sources


def short(r):
    return min(r["width"], r["height"])


def prompt_version_labels(captions):
    """(model, prompt, hash) -> 'vlm:model/prompt#vN', N by first use of each prompt text."""
    first = {}
    for c in captions:
        k = (c["model_id"], c["prompt_id"], c["prompt_hash"])
        first[k] = min(first.get(k, c["created_at"]), c["created_at"])
    out = {}
    for m, pr, h in first:
        same = sorted((t, hh) for (mm, pp, hh), t in first.items() if (mm, pp) == (m, pr))
        out[(m, pr, h)] = f"vlm:{m}/{pr}#v{[hh for _, hh in same].index(h) + 1}"
    return out


def expected_sources(raw):
    """source -> list of (key, caption, short side), one per caption, computed without SQL."""
    scores = {s["key"]: s for s in raw["scores"]}
    out = {"alt_text": [(s["key"], s["caption"], short(s)) for s in raw["scores"] if s["kept"]]}
    labels = prompt_version_labels(raw["captions"])
    for c in raw["captions"]:
        if c["n_words"] > 0 and c["finish_reason"] != "error":
            label = labels[(c["model_id"], c["prompt_id"], c["prompt_hash"])]
            out.setdefault(label, []).append((c["key"], c["caption"], short(scores[c["key"]])))
    latest = {}
    for a in raw["annotations"]:
        if a["state"] == "approved" and a["version"] >= latest.get(a["key"], {"version": 0})["version"]:
            latest[a["key"]] = a
    out["annotations_approved"] = [(k, a["text"], short(scores[k])) for k, a in latest.items()]
    return out


def test_table1_histogram_and_funnel_match_independent_counts(stats_cfg, tables):
    root, raw = tables
    res = run_stats(stats_cfg, quiet=True)
    exp = expected_sources(raw)
    t1 = {r[0]: r for r in res["table1"].rows}
    assert res["table1"].columns[:5] == ["source", "images", "captions", "mean_short_side", "mean_words"]
    # the edited prompt is a source of its own, not mixed into the first text's captions
    assert (
        set(t1)
        == set(exp)
        == {
            "alt_text",
            "vlm:cogvlm/p100#v1",
            "vlm:cogvlm/p100#v2",
            "vlm:llava/p100#v1",
            "annotations_approved",
        }
    )
    for source, rows in exp.items():
        images = {k: s for k, _, s in rows}
        n_words = [len(c.split()) for _, c, _ in rows]
        assert t1[source][1] == len(images), source  # distinct images, not rows
        assert t1[source][2] == len(rows)
        assert t1[source][3] == pytest.approx(round(sum(images.values()) / len(images), 1))
        assert t1[source][4] == pytest.approx(round(sum(n_words) / len(rows), 1))
    assert t1["vlm:cogvlm/p100#v1"][2] == t1["vlm:cogvlm/p100#v1"][1] + 1  # the image with two rows
    assert t1["vlm:cogvlm/p100#v2"][1] == 5
    # mean nouns: the offline tagger on every caption (the sample is larger than each source)
    count = nouns.noun_counter()
    assert res["table1"].columns[-1] == "mean_nouns"
    if count is not None:
        for source, rows in exp.items():
            assert t1[source][5] == pytest.approx(round(sum(count(c) for _, c, _ in rows) / len(rows), 1))

    versions = {r[0]: r[1] for r in res["prompt_versions"].rows}
    assert versions == {"vlm:cogvlm/p100#v1": "h", "vlm:cogvlm/p100#v2": "h2", "vlm:llava/p100#v1": "h"}

    edges = stats_cfg.stats.length_buckets
    labels = bucket_labels(edges)
    for source, rows in exp.items():
        want = {}
        for _, c, _ in rows:
            n = len(c.split())
            b = sum(n >= e for e in edges)
            want[labels[b]] = want.get(labels[b], 0) + 1
        got = {r[2]: r[3] for r in res["length_histogram"].rows if r[0] == source}
        assert got == want, source

    rejects = {r[0]: r[1] for r in res["reject_reasons"].rows}
    assert rejects == {"too_small": 4, "language": 8}


def test_funnel_has_one_population_per_step_and_never_widens(stats_cfg, tables):
    _, raw = tables
    res = run_stats(stats_cfg, only=["funnel"], quiet=True)["funnel"]
    assert res.columns == ["step", "stage", "images", "of_step", "pct_of_parent", "outside"]
    rows = {r[1]: r for r in res.rows}
    by_step = {r[0]: r for r in res.rows}
    for _step, stage, n, parent, pct, _outside in res.rows:
        if parent is not None:
            assert n <= by_step[parent][2], stage
            assert pct == pytest.approx(round(100 * n / by_step[parent][2], 1))
    # independent sets
    urls = {i["key"] for i in raw["images"]}
    downloaded = {i["key"] for i in raw["images"] if i["status"] == "success"}
    scored = {s["key"] for s in raw["scores"]}
    kept = {s["key"] for s in raw["scores"] if s["kept"]}
    captioned = {c["key"] for c in raw["captions"] if c["n_words"] > 0}
    annotated = {a["key"] for a in raw["annotations"]}
    approved = {a["key"] for a in raw["annotations"] if a["state"] == "approved"}
    assert rows["URLs tried"][2] == len(urls) == 40
    assert rows["downloaded"][2] == len(downloaded) == 38
    # 46 keys were scored, 8 of them not downloaded here: counted as outside, not as a wider step
    assert (rows["scored by the filter"][2], rows["scored by the filter"][5]) == (len(scored & downloaded), 8)
    assert rows["kept by the filter"][2] == len(kept & scored & downloaded)
    assert rows["captioned (a VLM caption with words)"][2] == len(captioned & kept & downloaded)
    assert rows["captioned (a VLM caption with words)"][5] == len(captioned - (kept & downloaded))
    # no candidates table here: the annotations count from the kept set
    assert rows["annotated (any text)"][3] == rows["kept by the filter"][0]
    assert rows["annotated (any text)"][2] == len(annotated & kept & downloaded)
    assert rows["with an approved text"][2] == len(approved) == 2


def test_comparison_flags_keywords_and_progress(stats_cfg, tables):
    _, raw = tables
    res = run_stats(stats_cfg, quiet=True)
    labels = prompt_version_labels(raw["captions"])
    cog = [
        c for c in raw["captions"] if labels[(c["model_id"], c["prompt_id"], c["prompt_hash"])] == "vlm:cogvlm/p100#v1"
    ]
    llava = {c["key"]: c for c in raw["captions"] if c["model_id"] == "llava"}
    pairs = {(r[0], r[1]): r for r in res["captioner_pairs"].rows}
    pair = pairs[("vlm:cogvlm/p100#v1", "vlm:llava/p100#v1")]
    latest = {}
    for c in sorted(cog, key=lambda c: c["created_at"]):
        latest[c["key"]] = c  # one row per image and source: the newest
    common = [c for c in latest.values() if c["key"] in llava]
    assert pair[2] == len(common)
    diff = sum(abs(len(c["caption"].split()) - len(llava[c["key"]]["caption"].split())) for c in common) / len(common)
    assert pair[5] == pytest.approx(round(diff, 1))
    flags = {(r[0], r[1]): r[2] for r in res["quality_flags"].rows}
    assert flags[("vlm:cogvlm/p100#v1", "repetition")] == sum(bool(c["flags"]) for c in cog)
    assert flags[("vlm:cogvlm/p100#v1", "finish_reason=length")] == sum(c["finish_reason"] == "length" for c in cog)
    assert flags[("vlm:cogvlm/p100#v1", "no words")] == sum(not c["caption"] for c in cog)
    capt = {r[0]: r for r in res["captioners"].rows}
    assert capt["vlm:cogvlm/p100#v1"][1:3] == (len(cog), len({c["key"] for c in cog}))
    kw = {r[0]: r for r in res["keywords"].rows}
    i = res["keywords"].columns.index("pct_left")
    exp = expected_sources(raw)
    for source, rows in exp.items():
        assert kw[source][1] == len(rows), source  # the same captions as Table 1
        share = 100 * sum("left" in c.split() for _, c, _ in rows) / len(rows)
        assert kw[source][i] == pytest.approx(round(share, 1)), source
    prog = {r[0]: r[2:] for r in res["annotation_progress"].rows}
    # bob: keys 0, 2, 4 -> approved, rejected, submitted; ann: 1, 3, 5 -> approved, submitted, submitted
    assert prog == {"ann": (0, 2, 1, 0, 3), "bob": (0, 1, 1, 1, 3)}


def test_derived_cache_gives_the_same_answers_and_is_reused(stats_cfg, tables):
    root, raw = tables
    stats_cfg.stats.plots = stats_cfg.stats.write_duckdb = False
    with_cache = run_stats(stats_cfg, quiet=True)
    summary = json.loads((root / "stats" / "_summary.json").read_text())
    assert summary["derived_shards_read"] == 4 and summary["derived_shards_reused"] == 0  # 2 captions + 2 scores
    assert sorted(p.name for p in (root / "stats" / "derived" / "captions").iterdir()) == [
        f"{s}.{part}"
        for s in ("00000", "00001")
        for part in ("flags.parquet", "json", "lengths.parquet", "parquet", "sets.parquet")
    ]
    again = run_stats(stats_cfg, quiet=True)
    summary = json.loads((root / "stats" / "_summary.json").read_text())
    assert summary["derived_shards_read"] == 0 and summary["derived_shards_reused"] == 4
    stats_cfg.stats.derived = False
    without = run_stats(stats_cfg, quiet=True)
    for name in ("table1", "keywords", "funnel", "length_histogram", "captioner_pairs"):
        assert with_cache[name].rows == without[name].rows == again[name].rows, name
    con = duckdb.connect()
    con.execute((root / "stats" / "views.sql").read_text())  # the text-reading views of the run without cache
    live = dict(con.execute("SELECT source, sum(words) FROM caption_words GROUP BY 1").fetchall())
    want = {}
    labels = prompt_version_labels(raw["captions"])
    for c in raw["captions"]:
        k = labels[(c["model_id"], c["prompt_id"], c["prompt_hash"])]
        want[k] = want.get(k, 0) + len(c["caption"].split())
    assert live == want
    # a rewritten shard (new commit marker) and a new keyword: that shard / every shard is read again
    stats_cfg.stats.derived = True
    from paradiffusion.schemas import CAPTIONS
    from paradiffusion.storage import Table

    t = Table(str(root / "captions"), CAPTIONS)
    t.write_shard("00001", t.read().slice(30))
    run_stats(stats_cfg, only=["keywords"], quiet=True)
    assert json.loads((root / "stats" / "_summary.json").read_text())["derived_shards_read"] == 1
    stats_cfg.stats.keywords = ["left", "dog"]
    res = run_stats(stats_cfg, only=["keywords"], quiet=True)["keywords"]
    assert json.loads((root / "stats" / "_summary.json").read_text())["derived_shards_read"] == 4
    assert res.columns == ["source", "captions", "pct_dog", "pct_left"]


def test_views_sql_and_duckdb_file_hold_only_views(stats_cfg, tables):
    root, raw = tables
    run_stats(stats_cfg, only=["table1"], quiet=True)
    out = root / "stats"
    assert (out / "views.sql").exists() and (out / "report.md").exists() and (out / "_summary.json").exists()
    con = duckdb.connect()
    con.execute((out / "views.sql").read_text())  # what `.read views.sql` runs
    assert con.execute("SELECT count(*) FROM captions").fetchone()[0] == len(raw["captions"])
    assert "jpg" not in [d[0] for d in con.execute("SELECT * FROM images LIMIT 1").description]
    db = duckdb.connect(str(out / "stats.duckdb"), read_only=True)
    kinds = {r[0] for r in db.execute("SELECT table_type FROM information_schema.tables").fetchall()}
    assert kinds == {"VIEW"}
    assert db.execute("SELECT count(*) FROM annotations_current").fetchall() == [(6,)]
    assert (out / "stats.duckdb").stat().st_size < 2_000_000


def test_report_and_plots(stats_cfg, tables, capsys):
    root, _ = tables
    stats_cfg.stats.plots = True
    run_stats(stats_cfg)
    printed = capsys.readouterr().out
    assert "Table 1" in printed and "alt_text" in printed
    md = (root / "stats" / "report.md").read_text()
    assert "![length_histogram.png](length_histogram.png)" in md and "| source | images | captions |" in md
    png = (root / "stats" / "length_histogram.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (root / "stats" / "funnel.png").exists()


def test_missing_tables_and_selected_caption_rule(tmp_path, tables):
    root, raw = tables
    cfg = load_config([], [f"project.data_root={root}", "caption.select.prefer=[{model: llava}]"])
    views = dict(build_views(cfg, find_sources(cfg)))
    con = duckdb.connect()
    for n, sql in views.items():
        con.execute(f"CREATE VIEW {n} AS {sql}")
    # the captioning stage's rule: llava where it captioned the key, else cogvlm's non-empty caption
    got = dict(con.execute("SELECT key, model_id FROM selected_captions").fetchall())
    llava = {c["key"] for c in raw["captions"] if c["model_id"] == "llava"}
    cog = {c["key"] for c in raw["captions"] if c["model_id"] == "cogvlm" and c["caption"]}
    assert {k for k, m in got.items() if m == "llava"} == llava
    assert {k for k, m in got.items() if m == "cogvlm"} == cog - llava

    empty = load_config([], [f"project.data_root={tmp_path / 'nothing'}"])
    res = run_stats(empty, quiet=True)
    assert res == {} and "missing: images, scores" in (tmp_path / "nothing" / "stats" / "report.md").read_text()


def test_no_tagger_says_so(stats_cfg, monkeypatch):
    monkeypatch.setattr(nouns, "noun_counter", lambda: None)
    res = run_stats(stats_cfg, only=["table1"], quiet=True)
    assert all(r[-1] == nouns.UNAVAILABLE for r in res["table1"].rows)


def test_noun_sample_is_bounded_and_deterministic(stats_cfg, monkeypatch):
    seen = []
    monkeypatch.setattr(nouns, "noun_counter", lambda: lambda text: seen.append(text) or len(text.split()))
    stats_cfg.stats.noun_sample = 4
    first = run_stats(stats_cfg, only=["table1"], quiet=True)["table1"]
    n_sources = len(first.rows)
    assert len(seen) == 4 * n_sources - 2  # annotations_approved has only 2 captions: all of them
    assert "seeded sample of captions (alt_text: 4" in first.notes[0]
    again = list(seen)
    seen.clear()
    assert run_stats(stats_cfg, only=["table1"], quiet=True)["table1"].rows == first.rows and seen == again
