import duckdb
import pytest

from paradiffusion.config import load_config
from stats import nouns
from stats.queries import bucket_labels
from stats.run import run_stats
from stats.views import build_views, find_sources


def short(r):
    return min(r["width"], r["height"])


def expected_sources(raw):
    """source -> list of (key, caption, short side), computed without SQL."""
    scores = {s["key"]: s for s in raw["scores"]}
    out = {"alt_text": [(s["key"], s["caption"], short(s)) for s in raw["scores"] if s["kept"]]}
    for c in raw["captions"]:
        out.setdefault(f"vlm:{c['model_id']}/{c['prompt_id']}", []).append(
            (c["key"], c["caption"], short(scores[c["key"]]))
        )
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
    assert set(t1) == set(exp)
    for source, rows in exp.items():
        n_words = [len(c.split()) for _, c, _ in rows]
        assert t1[source][1] == len(rows)
        assert t1[source][2] == pytest.approx(round(sum(s for *_, s in rows) / len(rows), 1))
        assert t1[source][3] == pytest.approx(round(sum(n_words) / len(rows), 1))
    # mean nouns: the offline tagger on every caption (the sample is larger than each source)
    count = nouns.noun_counter()
    assert res["table1"].columns[-1] == "mean_nouns"
    if count is not None:
        for source, rows in exp.items():
            assert t1[source][4] == pytest.approx(round(sum(count(c) for _, c, _ in rows) / len(rows), 1))

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

    funnel = {r[1]: r[2] for r in res["funnel"].rows}
    assert funnel["URLs tried (images rows)"] == 40 and funnel["downloaded (status success)"] == 38
    assert funnel["kept by the filter"] == sum(s["kept"] for s in raw["scores"])
    assert funnel["captioned (any VLM)"] == len({c["key"] for c in raw["captions"]})
    assert funnel["approved descriptions"] == 2 and funnel["annotated (any version)"] == 6
    rejects = {r[0]: r[1] for r in res["reject_reasons"].rows}
    assert rejects == {"too_small": 4, "language": 4}


def test_comparison_flags_keywords_and_progress(stats_cfg, tables):
    _, raw = tables
    res = run_stats(stats_cfg, quiet=True)
    cog = [c for c in raw["captions"] if c["model_id"] == "cogvlm"]
    llava = {c["key"]: c for c in raw["captions"] if c["model_id"] == "llava"}
    (pair,) = res["captioner_pairs"].rows
    common = [c for c in cog if c["key"] in llava]
    assert pair[:3] == ("cogvlm/p100", "llava/p100", len(common))
    diff = sum(abs(len(c["caption"].split()) - len(llava[c["key"]]["caption"].split())) for c in common) / len(common)
    assert pair[5] == pytest.approx(round(diff, 1))
    flags = {(r[0], r[2]): r[3] for r in res["quality_flags"].rows}
    assert flags[("cogvlm", "repetition")] == sum(bool(c["flags"]) for c in cog)
    assert flags[("cogvlm", "finish_reason=length")] == sum(c["finish_reason"] == "length" for c in cog)
    assert flags[("cogvlm", "no words")] == sum(not c["caption"] for c in cog)
    kw = {r[0]: r for r in res["keywords"].rows}
    i = res["keywords"].columns.index("pct_left")
    alt = [s["caption"] for s in raw["scores"] if s["kept"]]
    assert kw["alt_text"][i] == pytest.approx(round(100 * sum("left" in c.split() for c in alt) / len(alt), 1))
    prog = {r[0]: r[1:] for r in res["annotation_progress"].rows}
    # bob: keys 0, 2, 4 -> approved, rejected, submitted; ann: 1, 3, 5 -> approved, submitted, submitted
    assert prog == {"ann": (0, 2, 1, 0, 3), "bob": (0, 1, 1, 1, 3)}


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
    assert db.execute("SELECT count(*) FROM annotations_current").fetchone()[0] == 6
    assert (out / "stats.duckdb").stat().st_size < 2_000_000


def test_report_and_plots(stats_cfg, tables, capsys):
    root, _ = tables
    run_stats(stats_cfg)
    printed = capsys.readouterr().out
    assert "Table 1" in printed and "alt_text" in printed
    md = (root / "stats" / "report.md").read_text()
    assert "![length_histogram.png](length_histogram.png)" in md and "| source | images |" in md
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
