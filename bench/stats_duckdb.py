"""Benchmark: the canned `paradiffusion stats` queries in DuckDB beside the same queries in pandas.

Generates ``--rows`` synthetic caption rows of realistic length (mean ~130 words, like
ParaImage-Big's 132.9) from two captioners, one of which had its prompt text edited part way
(a second prompt version), a few failed generations, plus a ``scores`` table (one row per image,
alt text of ~14 words, sizes, kept / reject reason), as Parquet shards under a temp folder.
Then, in the same run and on the same files, it times each canned query (the real SQL of
``stats.queries`` over the views of ``stats.views``) and a pandas version of it, and checks that
both give the same numbers.

Two queries read the caption text: ``keywords`` (word-boundary matches) and ``words_from_text``
(the whitespace word count of every caption). ``make stats`` reads each shard's text once into
the ``derived`` cache (:mod:`stats.derived`); the run reports that one-off cost, the queries over
the cache, and the same queries reading the text live (``stats.derived: false``).

    .venv/bin/python bench/stats_duckdb.py --rows 1000000     # the full run (a few GB of RAM for pandas)
    .venv/bin/python bench/stats_duckdb.py --rows 50000       # a quick check

Mean nouns (Table 1's POS-tagged column) is not SQL: it tags a fixed-size sample
(``stats.noun_sample``) whatever the table size; its time is reported on its own line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from paradiffusion.schemas import CAPTIONS, SCORES  # noqa: E402
from paradiffusion.storage import Table  # noqa: E402
from pipelines.config import load_config  # noqa: E402

WORDS = (
    "the a of and in on with is at to its left right side front behind near top bottom center background "
    "foreground image picture shows white black red blue green yellow brown gray wooden metal glass small large "
    "tall short round square bright dark soft light shadow sky tree trees grass water road building house window "
    "door wall floor table chair person man woman child dog cat car bicycle boat flower flowers mountain hill "
    "cloud clouds sun street city field river lake beach sand rock stone leaf leaves branch hair face hand shirt "
    "dress hat bag cup plate food bowl fruit apple orange book sign text letters pattern texture surface edge "
    "corner line lines stripes dots detail details visible appears standing sitting lying holding wearing "
    "looking walking parked placed covered filled surrounded"
).split()
MODELS = [("THUDM/cogvlm-chat-hf", "paper"), ("llava-hf/llava-1.5-7b-hf", "paper")]
CAPTION_POOL = 65536
EDITED_FROM_SHARD = 8  # captions shards of model 0 from here on use an edited prompt text (prompt_hash h2)


def _sentences(rng: np.random.Generator, n: int) -> tuple[list[str], np.ndarray]:
    """A pool of sentences with Zipf-like word frequencies; returns (texts, word counts)."""
    p = 1.0 / np.arange(1, len(WORDS) + 1) ** 0.9
    p /= p.sum()
    lens = rng.integers(8, 21, n)
    texts = []
    for k in lens:
        w = rng.choice(len(WORDS), size=k, p=p)
        s = " ".join(WORDS[i] for i in w)
        texts.append(s[0].upper() + s[1:] + ".")
    return texts, lens


def generate(root: Path, rows: int, shard_rows: int, seed: int = 0) -> None:
    """``rows`` caption rows (two captioners, half of the keys each plus a 20 % overlap) and scores."""
    rng = np.random.default_rng(seed)
    pool, pool_lens = _sentences(rng, 8192)
    # captions are drawn from a pool of distinct ones (joining sentences row by row made generating
    # 10 M rows take longer than the benchmark): 64 Ki captions of ~640 characters, far more than
    # Parquet's dictionary page holds, so the text is stored plainly as real captions are
    k_sent = np.clip(rng.poisson(9.3, CAPTION_POOL), 1, 30)
    choice = rng.integers(0, len(pool), k_sent.sum())
    bounds = np.concatenate([[0], np.cumsum(k_sent)])
    cap_pool = np.array(
        [" ".join(pool[j] for j in choice[bounds[i] : bounds[i + 1]]) for i in range(CAPTION_POOL)], dtype=object
    )
    cap_words = np.add.reduceat(pool_lens[choice], bounds[:-1])
    n_keys = int(rows / 1.2) + 1
    scores_t = Table(str(root / "scores"), SCORES)
    caps_t = Table(str(root / "captions"), CAPTIONS)
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    reasons = np.array(["too_small", "aesthetic", "language", "duplicate", "clip_score"])
    for s, start in enumerate(range(0, n_keys, shard_rows)):
        n = min(shard_rows, n_keys - start)
        keys = np.char.add("k", np.arange(start, start + n).astype(str))
        kept = rng.random(n) < 0.7
        alt_idx = rng.integers(0, len(pool), n)
        scores_t.write_shard(
            f"{s:05d}",
            pa.table(
                {
                    "key": keys,
                    "shard": np.full(n, f"{s:05d}"),
                    "caption": [pool[i] for i in alt_idx],
                    "width": rng.integers(256, 2048, n).astype(np.int32),
                    "height": rng.integers(256, 2048, n).astype(np.int32),
                    "aesthetic": rng.normal(5.5, 1, n).astype(np.float32),
                    "kept": kept,
                    "reject_reason": np.where(kept, None, reasons[rng.integers(0, len(reasons), n)]),
                }
            ),
        )
    done = 0
    s = 0
    while done < rows:
        n = min(shard_rows, rows - done)
        model = s % 2
        # model 0 captions keys 0.., model 1 starts at 80 % of the keys: a 20 % overlap
        base = (done // 2) if model == 0 else int(n_keys * 0.8) - (done // 2)
        idx = (base + np.arange(n)) % n_keys
        pick = rng.integers(0, CAPTION_POOL, n)
        texts, n_words = cap_pool[pick], cap_words[pick]
        flags = [["repetition"] if r < 0.03 else (["too_short"] if r < 0.05 else []) for r in rng.random(n)]
        failed = rng.random(n) < 0.005  # failed generations: no caption, no words
        edited = model == 0 and s >= EDITED_FROM_SHARD
        caps_t.write_shard(
            f"{s:05d}",
            pa.Table.from_pydict(
                {
                    "key": np.char.add("k", idx.astype(str)),
                    "caption": [None if f else t for t, f in zip(texts, failed, strict=True)],
                    "n_words": np.where(failed, 0, n_words).astype(np.int32),
                    "model_id": np.full(n, MODELS[model][0]),
                    "prompt_id": np.full(n, MODELS[model][1]),
                    "prompt_hash": np.full(n, "h2" if edited else "h"),
                    "finish_reason": np.where(failed, "error", np.where(rng.random(n) < 0.02, "length", "stop")),
                    "seconds": rng.gamma(2, 1.5, n).astype(np.float32),
                    "created_at": pa.array(
                        [t0 + dt.timedelta(days=30 * edited, seconds=s)] * n, pa.timestamp("us", tz="UTC")
                    ),
                    "flags": flags,
                }
            ),
        )
        done += n
        s += 1


# --------------------------------------------------------------------------- pandas versions
def _read(root: Path, table: str, columns: list[str]):
    import pandas as pd

    return pd.read_parquet(Table(str(root / table)).files(), columns=columns)  # the committed shards


def _words(s):
    return s.fillna("").str.split().str.len()


def _labels(c):
    """The source label of each caption row: model/prompt#v<N>, N by first use of each prompt text."""
    first = c.groupby(["model_id", "prompt_id", "prompt_hash"])["created_at"].min().reset_index()
    first = first.sort_values(["created_at", "prompt_hash"])
    first["v"] = first.groupby(["model_id", "prompt_id"]).cumcount() + 1
    first["source"] = "vlm:" + first["model_id"] + "/" + first["prompt_id"] + "#v" + first["v"].astype(str)
    return c.merge(
        first[["model_id", "prompt_id", "prompt_hash", "source"]], on=["model_id", "prompt_id", "prompt_hash"]
    )


def _vlm(root: Path, extra: list[str]):
    cols = ["key", "model_id", "prompt_id", "prompt_hash", "created_at", *extra]
    return _labels(_read(root, "captions", list(dict.fromkeys(cols))))


def _sources(root: Path, with_text: bool = False):
    import pandas as pd

    sc = _read(root, "scores", ["key", "caption", "width", "height", "kept"])
    sc["short_side"] = np.minimum(sc["width"], sc["height"])
    alt = sc[sc["kept"]]
    alt = pd.DataFrame(
        {
            "source": "alt_text",
            "key": alt["key"],
            "n_words": _words(alt["caption"]),
            "short_side": alt["short_side"],
            **({"caption": alt["caption"]} if with_text else {}),
        }
    )
    c = _vlm(root, ["n_words", "finish_reason"] + (["caption"] if with_text else []))
    c = c[(c["n_words"].fillna(0) > 0) & (c["finish_reason"] != "error")]
    c = c.merge(sc[["key", "short_side"]], on="key", how="left")
    keep = ["source", "key", "n_words", "short_side"] + (["caption"] if with_text else [])
    return pd.concat([alt, c[keep]], ignore_index=True)


def pd_table1(root):
    s = _sources(root)
    per = s.groupby(["source", "key"]).agg(short_side=("short_side", "first"), n=("key", "size"), w=("n_words", "sum"))
    g = per.groupby("source")
    out = g.agg(images=("n", "size"), captions=("n", "sum"), mean_short_side=("short_side", "mean"), w=("w", "sum"))
    out["mean_words"] = out.pop("w") / out["captions"]
    return out.round(1)


def pd_length_histogram(root, edges):
    import pandas as pd

    s = _sources(root)
    s["bucket"] = pd.cut(s["n_words"], [-1, *[e - 0.5 for e in edges], np.inf], labels=False)
    return s.groupby(["source", "bucket"]).size()


def pd_prompt_versions(root):
    c = _vlm(root, [])
    return c.groupby(["source", "prompt_hash"]).size()


def pd_funnel(root):
    sc = _read(root, "scores", ["key", "kept"])
    c = _read(root, "captions", ["key", "n_words", "finish_reason"])
    scored = set(sc["key"])
    kept = set(sc.loc[sc["kept"], "key"]) & scored
    captioned = set(c.loc[(c["n_words"].fillna(0) > 0) & (c["finish_reason"] != "error"), "key"]) & kept
    return {"scored": len(scored), "kept": len(kept), "captioned": len(captioned)}


def pd_reject_reasons(root):
    sc = _read(root, "scores", ["kept", "reject_reason"])
    return sc.loc[~sc["kept"], "reject_reason"].value_counts()


def pd_quality_flags(root):
    c = _vlm(root, ["flags", "finish_reason", "n_words"])
    f = c[["source", "flags"]].explode("flags").dropna(subset=["flags"])
    out = f.groupby(["source", "flags"]).size()
    fin = c[c["finish_reason"] != "stop"].groupby(["source", "finish_reason"]).size()
    empty = (c["n_words"].fillna(0) == 0).groupby(c["source"]).sum()
    return out, fin, empty


def pd_captioners(root):
    c = _vlm(root, ["n_words", "seconds", "finish_reason"])
    c["trunc"] = (c["finish_reason"] == "length").astype(int)
    return c.groupby("source").agg(
        captions=("key", "size"),
        images=("key", "nunique"),
        mean_words=("n_words", "mean"),
        mean_seconds=("seconds", "mean"),
        pct_truncated=("trunc", "mean"),
    )


def pd_captioner_pairs(root):
    c = _vlm(root, ["n_words", "finish_reason"])
    c = c[c["finish_reason"] != "error"].sort_values("created_at").drop_duplicates(["key", "source"], keep="last")
    c = c[["key", "source", "n_words"]]
    m = c.merge(c, on="key", suffixes=("_a", "_b"))
    m = m[m["source_a"] < m["source_b"]]
    m["diff"] = (m["n_words_a"] - m["n_words_b"]).abs()
    return m.groupby(["source_a", "source_b"]).agg(common=("key", "size"), diff=("diff", "mean"))


#: The whitespace word count of every VLM caption, recounted from the text (README's ad-hoc check),
#: over the `caption_words` view: the derived cache, or the text itself without it.
WORDS_FROM_TEXT = (
    "SELECT source, count(*) AS captions, round(avg(words), 2) AS mean_words FROM caption_words GROUP BY 1"
)


def pd_words_from_text(root):
    c = _vlm(root, ["caption"])
    return _words(c["caption"]).groupby(c["source"]).mean()


def pd_keywords(root, keywords):
    s = _sources(root, with_text=True)
    out = {}
    for w in keywords:
        out[w] = s["caption"].fillna("").str.contains(rf"(?i)\b{w}\b", regex=True).groupby(s["source"]).mean() * 100
    return out


# --------------------------------------------------------------------------- measuring
def _peak_reset() -> None:
    """Reset this process's peak RSS (Linux: VmHWM), so the next reading is one query's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_gib() -> float | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def _time(fn, repeat: int) -> tuple[float, float, float | None, object]:
    """Best wall time of ``repeat`` runs, its CPU seconds, the peak RSS (GiB) over the runs, the
    last result. On a shared machine the wall time grows with the load, the CPU time much less."""
    best, out = (float("inf"), 0.0), None
    _peak_reset()
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        best = min(best, (time.perf_counter() - t0, time.process_time() - c0))
    return best[0], best[1], _peak_gib(), out


def _pandas_child(fn, conn) -> None:
    try:
        t0 = time.perf_counter()
        res = fn()
        conn.send(("ok", time.perf_counter() - t0, _peak_gib(), res))
    except MemoryError:
        conn.send(("oom", None, _peak_gib(), None))
    except Exception as exc:  # noqa: BLE001 - reported as the result
        conn.send(("error", None, _peak_gib(), repr(exc)))


def run_pandas(fn, budget_gib: float, timeout_s: float) -> tuple[str, float | None, float | None, object]:
    """One pandas query in a forked child watched from here: killed past ``budget_gib`` of RSS
    ("out of memory at N GiB") or ``timeout_s`` ("over N s"), so the baseline can never take the
    machine (or this benchmark) down with it. Returns (status, seconds, peak GiB, result)."""
    import multiprocessing as mp

    import psutil

    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_pandas_child, args=(fn, child))
    p.start()
    proc = psutil.Process(p.pid)
    t0, peak = time.perf_counter(), 0.0
    while p.is_alive():
        if parent.poll(0.1):
            status, secs, child_peak, res = parent.recv()
            p.join()
            return status, secs, child_peak, res
        try:
            peak = max(peak, proc.memory_info().rss / 2**30)
        except psutil.NoSuchProcess:
            break
        if peak > budget_gib or time.perf_counter() - t0 > timeout_s:
            p.kill()
            p.join()
            return ("oom" if peak > budget_gib else "timeout"), None, peak, None
    if parent.poll(1):
        return parent.recv()
    return "error", None, peak, f"exit code {p.exitcode}"


def _pandas_cell(status, secs, budget, timeout) -> str:
    if status == "ok":
        return f"{secs:.2f}"
    if status == "oom":
        return f"out of memory at {budget:g} GiB"
    if status == "timeout":
        return f"over {timeout:g} s"
    return "error"


def _cell(v) -> str:
    return "-" if v is None else v if isinstance(v, str) else f"{v:.2f}"


def build(cfg, root: Path, threads: int | None):
    """What `make stats` does before its queries: the per-shard caches and partials, then the
    key-level pass. Returns (state, keyed folder, wall s, CPU s, peak GiB)."""
    from paradiffusion.storage import duckdb_connect
    from stats import derived, keyed
    from stats.run import configure
    from stats.views import find_sources

    sources = find_sources(cfg)
    out = root / "stats"
    _peak_reset()
    t0, c0 = time.perf_counter(), time.process_time()
    with duckdb_connect() as con:
        configure(con, cfg.stats, out)
        tables = {n: sources[n].url for n in derived.TEXT_TABLES if sources[n].exists}
        state = derived.refresh(con, out, tables, cfg.stats.keywords)
        kd = keyed.refresh_keyed(con, out, state, sources, cfg)
    print(
        f"key-level pass: {kd.mode}, {kd.changed} of {kd.inputs} inputs changed"
        + (f", {kd.touched_keys:,} keys touched" if kd.touched_keys is not None else "")
        + f", {kd.seconds:.1f} s",
        flush=True,
    )
    return sources, state, kd.folder, time.perf_counter() - t0, time.process_time() - c0, _peak_gib()


def add_rows(root: Path, rows: int, first_shard: int, seed: int = 1) -> None:
    """``rows`` more caption rows (both captioners) in new shards, plus new scored images for
    half of them: what a day of captioning adds."""
    rng = np.random.default_rng(seed)
    pool, pool_lens = _sentences(rng, 2048)
    caps_t = Table(str(root / "captions"), CAPTIONS)
    scores_t = Table(str(root / "scores"), SCORES)
    keys = np.char.add("n", np.arange(rows).astype(str))
    new_img = keys[: rows // 2]
    scores_t.write_shard(
        f"{first_shard:05d}",
        pa.table(
            {
                "key": new_img,
                "shard": np.full(len(new_img), "new"),
                "caption": [pool[i] for i in rng.integers(0, len(pool), len(new_img))],
                "width": rng.integers(256, 2048, len(new_img)).astype(np.int32),
                "height": rng.integers(256, 2048, len(new_img)).astype(np.int32),
                "aesthetic": rng.normal(5.5, 1, len(new_img)).astype(np.float32),
                "kept": np.ones(len(new_img), bool),
                "reject_reason": pa.nulls(len(new_img), pa.string()),
            }
        ),
    )
    k_sent = np.clip(rng.poisson(9.3, rows), 1, 30)
    choice = rng.integers(0, len(pool), k_sent.sum())
    bounds = np.concatenate([[0], np.cumsum(k_sent)])
    t = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)
    caps_t.write_shard(
        f"{first_shard:05d}",
        pa.Table.from_pydict(
            {
                "key": keys,
                "caption": [" ".join(pool[j] for j in choice[bounds[i] : bounds[i + 1]]) for i in range(rows)],
                "n_words": np.add.reduceat(pool_lens[choice], bounds[:-1]).astype(np.int32),
                "model_id": np.where(np.arange(rows) % 2 == 0, MODELS[0][0], MODELS[1][0]),
                "prompt_id": np.full(rows, "paper"),
                "prompt_hash": np.where(np.arange(rows) % 2 == 0, "h2", "h"),
                "finish_reason": np.full(rows, "stop"),
                "seconds": rng.gamma(2, 1.5, rows).astype(np.float32),
                "created_at": pa.array([t] * rows, pa.timestamp("us", tz="UTC")),
                "flags": [[] for _ in range(rows)],
            }
        ),
    )


def check_same(name: str, fast, other, what: str) -> None:
    assert fast.rows == other.rows, (name, f"the partials and {what} disagree")


def check_pandas(name, res, pres, kw) -> None:
    """The numbers pandas computed, against DuckDB's (a subset of the columns, as before)."""
    from stats import derived

    if name == "table1":
        t1 = {r[0]: r for r in res.rows}
        for src, row in pres.iterrows():
            got = t1[src]
            assert got[1] == row["images"] and got[2] == row["captions"], (src, got, row)
            assert abs(got[3] - row["mean_short_side"]) < 0.051 and abs(got[4] - row["mean_words"]) < 0.051
    elif name == "prompt_versions":
        assert {r[0] for r in res.rows} == {s for s, _ in pres.index}, "prompt versions disagree"
    elif name == "funnel":
        f = {r[1]: r[2] for r in res.rows}
        assert (f["scored by the filter"], f["kept by the filter"]) == (pres["scored"], pres["kept"])
        assert f["captioned (a VLM caption with words)"] == pres["captioned"], "funnel disagrees"
    elif name == "captioner_pairs":
        pairs = {(r[0], r[1]): r[2] for r in res.rows}
        for (a, b), row in pres.iterrows():
            assert pairs[(a, b)] == row["common"], ("captioner_pairs disagree", a, b)
    elif name == "keywords":
        kwd = {r[0]: r for r in res.rows}
        col = res.columns.index("pct_" + derived.keyword_column(kw[0])[3:])
        for src, v in pres[kw[0]].items():
            assert abs(kwd[src][col] - v) < 0.051, ("keywords disagree", src, kwd[src][col], v)
    elif name == "words_from_text":
        wt = {r[0]: r[2] for r in res.rows}
        for src, v in pres.items():
            assert abs(wt[src] - v) < 0.006, ("words_from_text disagree", src, wt[src], v)


def bench_size(rows: int, args, root: Path, save=lambda out: None) -> dict:
    from stats.queries import Query, canned_queries
    from stats.run import add_mean_nouns, connect, run_query
    from stats.views import build_views

    if not (root / "captions" / "_done").exists():
        t0 = time.perf_counter()
        generate(root, rows, args.shard_rows)
        print(f"generated {rows:,} caption rows in {time.perf_counter() - t0:.0f} s under {root}", flush=True)
    size = sum(f.stat().st_size for f in root.rglob("*.parquet") if "stats" not in f.parts)
    sets = [f"project.data_root={root}", f"stats.memory_limit={args.memory_limit}"]
    if args.threads:
        sets.append(f"stats.threads={args.threads}")
    cfg = load_config([], sets)
    edges, kw = cfg.stats.length_buckets, cfg.stats.keywords
    shutil.rmtree(root / "stats", ignore_errors=True)
    load0 = os.getloadavg()[0]
    sources, state, keyed, b_wall, b_cpu, b_peak = build(cfg, root, args.threads)
    n_shards = sum(state.computed.values())
    cache_mb = sum(f.stat().st_size for f in (root / "stats" / "derived").rglob("*.parquet")) / 1e6
    print(
        f"\n## {rows:,} caption rows ({size / 1e6:.0f} MB of Parquet, {n_shards} shards; load average {load0:.1f})\n"
        f"first build (every shard's text and partials once, then the key-level pass): {b_wall:.1f} s wall, "
        f"{b_cpu:.1f} CPU s, peak RSS {b_peak:.2f} GiB; cache {cache_mb:.0f} MB",
        flush=True,
    )
    out = {"rows": rows, "parquet_mb": size / 1e6, "build_s": b_wall, "build_cpu_s": b_cpu, "build_peak_gib": b_peak}
    from stats import aggregates

    views = build_views(cfg, sources, state.files) + aggregates.agg_views(state, keyed)
    con = connect(views, sc=cfg.stats, out=root / "stats")
    have = {n for n, _ in views}
    queries = {q.name: q for q in canned_queries(edges, kw, have) if q.name in PANDAS_QUERIES}
    queries["words_from_text"] = Query("words_from_text", "ad hoc", WORDS_FROM_TEXT, ())
    fns = pandas_fns(root, edges, kw)
    detail = rows in args.detail_rows
    run_pd = detail and rows <= args.pandas_max_rows
    out["queries"] = {}
    # 1. every canned query over the merged partials (the goal: each under 2 s)
    print("\n| query | partials (s) | CPU (s) | peak RSS (GiB) |\n|---|---|---|---|", flush=True)
    for name, q in queries.items():
        td, cpu, peak, _ = _time(lambda q=q: run_query(con, q), args.repeat)
        print(f"| {name} | {td:.3f} | {cpu:.2f} | {peak:.2f} |", flush=True)
        out["queries"][name] = {"partials_s": td, "partials_cpu_s": cpu, "partials_peak_gib": peak}
    t0 = time.perf_counter()
    res = run_query(con, queries["table1"])
    add_mean_nouns(con, res, cfg, sources["captions"].columns)
    out["table1_with_nouns_s"] = time.perf_counter() - t0
    print(f"table1 with mean nouns: {out['table1_with_nouns_s']:.2f} s", flush=True)
    save(out)
    # 2. +1 % rows, the rebuild timed (the data then stays at the larger size for the comparisons)
    if args.incremental and rows == max(args.rows):
        extra = max(1, rows // 100)
        next_shard = len(Table(str(root / "captions")).done_shards()) + 1000
        add_rows(root, extra, next_shard)
        sources, state, keyed, i_wall, i_cpu, i_peak = build(cfg, root, args.threads)
        views = build_views(cfg, sources, state.files) + aggregates.agg_views(state, keyed)
        con = connect(views, sc=cfg.stats, out=root / "stats")
        out["incremental"] = {
            "rows_added": extra,
            "shards_read": sum(state.computed.values()),
            "build_s": i_wall,
            "build_cpu_s": i_cpu,
            "ratio": i_wall / b_wall,
            "cpu_ratio": i_cpu / b_cpu,
        }
        print(
            f"\nincremental: +{extra:,} caption rows (+1 %) in 1 new shard (+ {extra // 2:,} scored images): "
            f"{sum(state.computed.values())} shard(s) read, build {i_wall:.1f} s wall ({i_cpu:.1f} CPU s) = "
            f"{100 * i_wall / b_wall:.1f} % of the first build's wall time, {100 * i_cpu / b_cpu:.1f} % of its CPU time",
            flush=True,
        )
        save(out)
    if not detail:
        return out
    # 3. the same queries over the raw views, the text read live, and pandas; every answer compared
    live = connect(build_views(cfg, sources), sc=cfg.stats, out=root / "stats")  # stats.derived: false
    print(
        "\n| query | partials (s) | raw views (s) | peak RSS (GiB) | text read live (s) | peak RSS (GiB) | "
        "pandas (s) | pandas peak RSS (GiB) |\n|---|---|---|---|---|---|---|---|",
        flush=True,
    )
    for name, q in queries.items():
        res = run_query(con, q)
        tr = rpeak = tl = lpeak = None
        oom = f"out of memory at {args.memory_limit}"
        # a scan past DuckDB's memory limit is a result (the limit holds), not the end of the run
        if args.raw is None or name in args.raw:
            try:
                tr, _, rpeak, rres = _time(lambda q=q: run_query(con, q, partials=False), 1)
                check_same(name, res, rres, "the raw views")
            except duckdb.OutOfMemoryException:
                tr = oom
        if name in args.live:
            try:
                tl, _, lpeak, lres = _time(lambda q=q: run_query(live, q, partials=False), 1)
                check_same(name, res, lres, "the text read live")
            except duckdb.OutOfMemoryException:
                tl = oom
        if run_pd:
            status, tp, ppeak, pres = run_pandas(fns[name], args.pandas_budget_gib, args.pandas_timeout)
            if status == "ok":
                check_pandas(name, res, pres, kw)
            pcell = _pandas_cell(status, tp, args.pandas_budget_gib, args.pandas_timeout)
            ppcell = f"{ppeak:.2f}" if ppeak else "-"
        else:
            status, tp, ppeak, pcell, ppcell = "skipped", None, None, "not run", "-"
        print(
            f"| {name} | {res.seconds:.3f} | {_cell(tr)} | {_cell(rpeak)} | {_cell(tl)} | {_cell(lpeak)} | "
            f"{pcell} | {ppcell} |",
            flush=True,
        )
        out["queries"][name].update(
            {
                "raw_s": tr,
                "raw_peak_gib": rpeak,
                "live_s": tl,
                "live_peak_gib": lpeak,
                "pandas": status,
                "pandas_s": tp,
                "pandas_peak_gib": ppeak,
            }
        )
        save(out)
    out["load_after"] = os.getloadavg()[0]
    print(
        "\nthe partials give the raw views' rows (where timed) and the live text's; pandas agrees where it ran; "
        f"load average {load0:.1f} -> {out['load_after']:.1f}",
        flush=True,
    )
    return out


#: The canned queries timed (download and annotation progress need tables the generator does not write).
PANDAS_QUERIES = (
    "table1",
    "length_histogram",
    "prompt_versions",
    "funnel",
    "reject_reasons",
    "quality_flags",
    "captioners",
    "captioner_pairs",
    "keywords",
)


def pandas_fns(root: Path, edges, kw) -> dict:
    return {
        "table1": lambda: pd_table1(root),
        "length_histogram": lambda: pd_length_histogram(root, edges),
        "prompt_versions": lambda: pd_prompt_versions(root),
        "funnel": lambda: pd_funnel(root),
        "reject_reasons": lambda: pd_reject_reasons(root),
        "quality_flags": lambda: pd_quality_flags(root),
        "captioners": lambda: pd_captioners(root),
        "captioner_pairs": lambda: pd_captioner_pairs(root),
        "keywords": lambda: pd_keywords(root, kw),
        "words_from_text": lambda: pd_words_from_text(root),
    }


def plot_growth(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["rows"] / 1e6 for r in results]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in results[0]["queries"]:
        if name not in PANDAS_QUERIES:
            continue  # words_from_text is an ad-hoc check over the per-row cache, not a canned query
        ax.plot(xs, [r["queries"][name]["partials_s"] for r in results], marker="o", label=name)
    ax.set_yscale("log")
    ax.axhline(2.0, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("caption rows (millions)")
    ax.set_ylabel("query wall time (s, log scale; dashed: the 2 s goal)")
    ax.set_title("Canned stats queries over the merged partials")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--rows",
        type=lambda s: [int(float(x)) for x in s.split(",")],
        default=[1_000_000],
        help="caption rows to generate; several (1e6,3e6,1e7) give the growth curve",
    )
    ap.add_argument("--shard-rows", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3, help="runs per query over the partials; the best is reported")
    ap.add_argument("--dir", help="use / keep this folder (default: a temp folder, removed at the end)")
    ap.add_argument("--threads", type=int, default=None, help="DuckDB threads (default: all cores)")
    ap.add_argument("--memory-limit", default="4GB", help="stats.memory_limit for every DuckDB connection")
    ap.add_argument("--pandas-budget-gib", type=float, default=6.0, help="a pandas query past this RSS is stopped")
    ap.add_argument("--pandas-timeout", type=float, default=300.0, help="a pandas query past this is stopped")
    ap.add_argument("--pandas-max-rows", type=int, default=10**9, help="no pandas baseline above this size")
    ap.add_argument(
        "--detail-rows",
        type=lambda s: [int(float(x)) for x in s.split(",")],
        default=None,
        help="sizes at which the raw views, the live text and pandas run too (default: every size)",
    )
    ap.add_argument(
        "--live",
        type=lambda s: [x for x in s.split(",") if x],
        default=["keywords", "words_from_text"],
        help="text queries also timed reading the text live (stats.derived: false)",
    )
    ap.add_argument(
        "--raw",
        type=lambda s: [x for x in s.split(",") if x],
        default=None,
        help="queries also timed over the raw views (default: all of them)",
    )
    ap.add_argument("--incremental", action="store_true", help="at the largest size: add 1 %% rows, rebuild, time it")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plot", help="write the growth curve (PNG) here")
    args = ap.parse_args()
    if args.detail_rows is None:
        args.detail_rows = args.rows

    import pandas  # noqa: F401 - imported once here, not in every forked pandas child

    base = Path(args.dir or tempfile.mkdtemp(prefix="stats-bench-"))
    print(f"cores: {os.cpu_count()}; load average {os.getloadavg()[0]:.1f}; DuckDB memory limit {args.memory_limit}")
    results = []
    try:
        for rows in args.rows:

            def save(partial=None):
                if args.json:
                    Path(args.json).write_text(json.dumps([*results, *([partial] if partial else [])], indent=1))

            results.append(bench_size(rows, args, base / f"rows-{rows}", save))
            save()
        if args.plot and len(results) > 1:
            plot_growth(results, Path(args.plot))
        if len(results) > 1:
            print("\n## growth: query wall time over the partials (s)\n")
            print("| query | " + " | ".join(f"{r['rows'] / 1e6:g} M" for r in results) + " |")
            print("|---|" + "---|" * len(results))
            for name in results[0]["queries"]:
                print(f"| {name} | " + " | ".join(f"{r['queries'][name]['partials_s']:.3f}" for r in results) + " |")
            print("| first build | " + " | ".join(f"{r['build_s']:.1f}" for r in results) + " |")
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
