"""`paradiffusion stats`: write the views, run the canned queries, print them, write a report.

Output folder (``stats.output``, default ``<data_root>/stats``)::

    views.sql        CREATE VIEW statements over the tables, for `duckdb -c ".read views.sql"`
    stats.duckdb     the same views in a database file (no data copied)
    report.md        every canned query as a Markdown table, with the plots
    stats.json       the same results as JSON
    *.png            caption-length histogram, funnel
    derived/         per committed shard: text-derived columns and partial aggregates (stats.derived,
                     stats.aggregates); derived/keyed/: the key-level totals and results (distinct
                     images, funnel, caption-set pairs), updated for the keys of changed shards (stats.keyed)
    .duckdb_tmp/     DuckDB's spill folder (stats.memory_limit)
    _config.yaml, _summary.json
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from paradiffusion.config import ConfigError, RootConfig
from paradiffusion.log import get_logger
from paradiffusion.stage import StageSummary, announce, progress
from paradiffusion.storage import Table, join
from stats import aggregates as _aggregates
from stats import derived as _derived
from stats import keyed as _keyed
from stats import nouns as _nouns
from stats.queries import Query, bucket_labels, canned_queries
from stats.views import build_views, find_sources, views_sql

log = get_logger("stats")


@dataclass
class Result:
    """One canned query's result."""

    name: str
    title: str
    columns: list[str]
    rows: list[tuple]
    seconds: float
    notes: list[str] = field(default_factory=list)


def stats_dir(cfg: RootConfig) -> str:
    return cfg.stats.output or join(cfg.project.data_root, "stats")


#: stats.duckdb is written in this storage format so DuckDB CLIs from 1.2 on can open it.
STORAGE_VERSION = "v1.2.0"


def configure(con, sc, out: str | Path | None = None):
    """Bound a connection's memory (``stats.memory_limit``, spilling under ``<out>/.duckdb_tmp``)
    and threads; insertion order is not kept (no canned query needs it, and it costs memory)."""
    con.execute(f"SET memory_limit = '{sc.memory_limit}'")
    if sc.threads:
        con.execute(f"SET threads = {int(sc.threads)}")
    if out is not None:
        tmp = Path(out) / ".duckdb_tmp"
        con.execute(f"SET temp_directory = '{str(tmp).replace(chr(39), chr(39) * 2)}'")
    con.execute("SET preserve_insertion_order = false")
    return con


def connect(views: list[tuple[str, str]], database: str = ":memory:", sc=None, out=None):
    """A DuckDB connection with the views created (in ``database`` when it is a file)."""
    from paradiffusion.storage import duckdb_connect

    con = duckdb_connect()  # tables on object storage read through this run's fsspec filesystems
    if sc is not None:
        configure(con, sc, out)
    if database != ":memory:":
        con.execute(f"ATTACH '{database}' AS stats_db (STORAGE_VERSION '{STORAGE_VERSION}')")
        con.execute("USE stats_db")
    for name, sql in views:
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")
    return con


def run_query(con, q: Query, partials: bool = True) -> Result:
    """Run a canned query: over the merged partials where it has them (``partials``), else the raw views."""
    t0 = time.perf_counter()
    cur = con.execute(q.agg_sql if partials and q.agg_sql else q.sql)
    rows = cur.fetchall()
    cols = [d[0] for d in cur.description]
    return Result(q.name, q.title, cols, rows, time.perf_counter() - t0)


def _sample_captions(
    con, counts: dict[str, int], n: int, seed: int, caption_columns: list[str] | None = None
) -> list[tuple[str, str]]:
    """Up to ``n`` captions per source: those with the smallest ``hash(key || seed)``.

    Deterministic for a seed. A window over every caption would sort the whole text column;
    instead a hash threshold keeps about ``2n`` rows per source and the ``n`` smallest of those
    are taken here. Each source is read from its own table with the same row filter as
    ``caption_sources``, the hash condition next to it: DuckDB evaluates it in the scan, so only
    the sampled captions' text goes any further (through ``caption_sources`` every caption's
    text would be carried through the joins first).
    """
    from stats.views import vlm_has_words_sql

    top = 2**64 - 1
    h = f"hash(key || '{seed}')"
    versions = {}
    if any(s.startswith("vlm:") for s in counts):
        cur = con.execute("SELECT source, model_id, model_revision, prompt_id, prompt_hash FROM prompt_versions")
        versions = {r[0]: r[1:] for r in cur.fetchall()}
    parts = []
    for source, count in counts.items():
        limit = top if count <= 2 * n else int(top * (2 * n / count))
        lit = "'" + source.replace("'", "''") + "'"
        if source == "alt_text":
            parts.append(f"SELECT {lit} AS source, caption, {h} AS h FROM scores WHERE kept AND {h} <= {limit}")
        elif source == "annotations_approved":
            parts.append(f"SELECT {lit}, text, {h} FROM annotations_approved WHERE {h} <= {limit}")
        elif source in versions:
            model, rev, prompt, phash = (
                "'" + str(v).replace("'", "''") + "'" if v is not None else None for v in versions[source]
            )
            cond = f"model_id = {model} AND prompt_id = {prompt} AND prompt_hash = {phash}"
            cond += (
                f" AND model_revision = {rev}"
                if rev is not None and "model_revision" in (caption_columns or [])
                else ""
            )
            cond += " AND model_revision IS NULL" if rev is None and "model_revision" in (caption_columns or []) else ""
            has_words = vlm_has_words_sql(caption_columns or ["n_words"])
            parts.append(f"SELECT {lit}, caption, {h} FROM captions WHERE {cond} AND {has_words} AND {h} <= {limit}")
    if not parts:
        return []
    rows = con.execute(" UNION ALL ".join(parts)).fetchall()
    by_source: dict[str, list[tuple[int, str]]] = {}
    for source, caption, hv in rows:
        by_source.setdefault(source, []).append((hv, caption or ""))
    return [(s, c) for s in sorted(by_source) for _, c in sorted(by_source[s])[:n]]


def add_mean_nouns(con, res: Result, cfg: RootConfig, caption_columns: list[str] | None = None) -> None:
    """Append Table 1's ``mean_nouns`` column, measured on a seeded sample per source."""
    counter = _nouns.noun_counter() if cfg.stats.nouns == "auto" else None
    if counter is None:
        why = _nouns.UNAVAILABLE if cfg.stats.nouns == "auto" else "n/a: stats.nouns is off"
        res.columns.append("mean_nouns")
        res.rows = [(*r, why) for r in res.rows]
        return
    n = cfg.stats.noun_sample
    sample = _sample_captions(con, {r[0]: r[2] for r in res.rows}, n, cfg.project.seed, caption_columns)
    sums: dict[str, list[int]] = {}
    for source, caption in progress(sample, total=len(sample), desc="nouns", unit="caption"):
        sums.setdefault(source, []).append(counter(caption or ""))
    res.columns.append("mean_nouns")
    out = []
    for r in res.rows:
        got = sums.get(r[0], [])
        out.append((*r, round(sum(got) / len(got), 1) if got else None))
    res.rows = out
    sampled = [r[0] for r in res.rows if r[2] > n]
    if sampled:
        sizes = ", ".join(f"{s}: {len(sums.get(s, []))}" for s in sampled)
        res.notes.append(f"mean_nouns on a seeded sample of captions ({sizes})")
    res.notes.append("nouns: TextBlob's offline PatternTagger, tags NN/NNS/NNP/NNPS")


# --------------------------------------------------------------------------- rendering
def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:,.3f}".rstrip("0").rstrip(".")
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def render_text(res: Result) -> str:
    """A plain terminal table."""
    cells = [[_fmt(v) for v in r] for r in res.rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(res.columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(res.columns, widths, strict=True))
    out = [f"-- {res.title} ({res.seconds * 1000:.0f} ms)", line, "  ".join("-" * w for w in widths)]
    for row in cells:
        out.append("  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(row, widths, strict=True)))
    if not cells:
        out.append("(no rows)")
    out += [f"   note: {n}" for n in res.notes]
    return "\n".join(out)


def _numeric(v: str) -> bool:
    return v.replace(",", "").replace(".", "", 1).lstrip("-").isdigit()


def render_markdown(res: Result) -> str:
    out = [f"### {res.title}", "", "| " + " | ".join(res.columns) + " |", "|" + "---|" * len(res.columns)]
    for r in res.rows:
        out.append("| " + " | ".join(_fmt(v).replace("|", "\\|") for v in r) + " |")
    if not res.rows:
        out.append("| (no rows) |" + " |" * (len(res.columns) - 1))
    out += ["", *[f"*{n}*" for n in res.notes], f"<sub>query `{res.name}`: {res.seconds * 1000:.0f} ms</sub>", ""]
    return "\n".join(out)


def plot_histogram(res: Result, labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_source: dict[str, list[float]] = {}
    for source, bucket, _, _, pct in res.rows:
        by_source.setdefault(source, [0.0] * len(labels))[bucket] = float(pct)
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(1, len(by_source))
    for i, (source, pcts) in enumerate(sorted(by_source.items())):
        ax.bar([x + i * width for x in range(len(labels))], pcts, width, label=source)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels)
    ax.set_xlabel("words per caption")
    ax.set_ylabel("% of captions")
    ax.set_title("Caption length by source")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_funnel(res: Result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [
        f"{r[0]}. {r[1]}" + (f" (of step {r[3]})" if r[3] is not None and r[3] != r[0] - 1 else "") for r in res.rows
    ]
    names = names[::-1]
    values = [r[2] for r in res.rows][::-1]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 1))
    ax.barh(names, values, color="#4c72b0")
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:,}", va="center", fontsize=8)
    ax.set_xlabel("images (distinct keys)")
    ax.set_title("Funnel")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def cached_views(cfg: RootConfig, sources, out: Path, summary: StageSummary | None = None):
    """The views the canned queries run on, and the derived cache's state (None without it): over the
    per-shard caches and partial aggregates under ``out`` (``stats.derived``, ``stats.partials``),
    brought up to date for the shards committed since, else over the tables' rows. ``summary``
    gets what the refresh did."""
    sc = cfg.stats
    if not sc.derived:
        return build_views(cfg, sources, {}), None
    from paradiffusion.storage import duckdb_connect

    have = {n for n, s in sources.items() if s.exists}
    extra = summary.extra if summary is not None else {}
    agg: list[tuple[str, str]] = []
    with duckdb_connect() as dcon:
        configure(dcon, sc, out)
        tables = {n: sources[n].url for n in _derived.TEXT_TABLES if n in have}
        state = _derived.refresh(dcon, out, tables, sc.keywords)
        # the partials answer the canned queries only when they cover every cached table present
        if sc.partials and set(tables) and set(tables) <= set(state.files):
            kd = _keyed.refresh_keyed(dcon, out, state, sources, cfg)
            agg = _aggregates.agg_views(state, kd.folder)
            extra["keyed_recomputed"] = kd.recomputed
            extra["keyed_mode"] = kd.mode
            extra["keyed_inputs_changed"] = kd.changed
            extra["keyed_touched_keys"] = kd.touched_keys
            extra["keyed_seconds"] = round(kd.seconds, 2)
    extra["derived_shards_read"] = sum(state.computed.values())
    extra["derived_shards_reused"] = sum(state.reused.values())
    extra["derived_seconds"] = round(state.seconds, 2)
    return build_views(cfg, sources, state.files) + agg, state


# --------------------------------------------------------------------------- the stage
def run_stats(cfg: RootConfig, only: list[str] | None = None, quiet: bool = False) -> dict[str, Result]:
    """Write views.sql (+ stats.duckdb), run the canned queries, print them and write the report."""
    sc = cfg.stats
    if "://" in stats_dir(cfg):
        raise ConfigError(
            f"stats.output = {stats_dir(cfg)}: must be a local folder (the report and views.sql are local files)"
        )
    out = Path(stats_dir(cfg))
    sources = find_sources(cfg)
    have = {n for n, s in sources.items() if s.exists}
    missing = [n for n in sources if n not in have]
    announce(
        "stats",
        {
            "data": cfg.project.data_root,
            "tables": ", ".join(sorted(have)) or "none",
            "missing": ", ".join(missing) or "none",
            "output": str(out),
        },
    )
    summary = StageSummary("stats")
    out.mkdir(parents=True, exist_ok=True)
    views, state = cached_views(cfg, sources, out, summary)
    view_names = {n for n, _ in views}
    _write_atomic(out / "views.sql", views_sql(views, missing, state.folders if state else None).encode())
    if sc.write_duckdb:
        tmp = out / ".stats.duckdb.tmp"
        tmp.unlink(missing_ok=True)
        connect(views, str(tmp)).close()
        os.replace(tmp, out / "stats.duckdb")
    con = connect(views, sc=sc, out=out)
    queries = canned_queries(sc.length_buckets, sc.keywords, view_names)
    results: dict[str, Result] = {}
    summary.n_in = len(queries)
    for q in queries:
        if only and q.name not in only:
            continue
        if not q.sql or not set(q.needs) <= view_names:
            summary.reject("tables_missing")
            log.info("%s: skipped (needs %s)", q.name, ", ".join(q.needs) or "any table")
            continue
        try:
            res = run_query(con, q)
        except Exception as exc:  # noqa: BLE001 - one bad table must not hide the other results
            summary.reject("query_failed")
            log.warning("%s failed: %s", q.name, exc)
            continue
        if q.name == "table1":
            add_mean_nouns(con, res, cfg, sources["captions"].columns)
        results[q.name] = res
        summary.n_out += 1
        if not quiet:
            print(render_text(res) + "\n")
    plots = []
    if sc.plots and results:
        try:
            if "length_histogram" in results and results["length_histogram"].rows:
                plot_histogram(
                    results["length_histogram"], bucket_labels(sc.length_buckets), out / "length_histogram.png"
                )
                plots.append("length_histogram.png")
            if "funnel" in results and results["funnel"].rows:
                plot_funnel(results["funnel"], out / "funnel.png")
                plots.append("funnel.png")
        except ImportError:
            log.warning("no plots: matplotlib is not installed (pip install matplotlib)")
    md = [
        "# Dataset statistics",
        "",
        f"Written {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M UTC} from `{cfg.project.data_root}` "
        f"by `paradiffusion stats`. Tables: {', '.join(sorted(have)) or 'none'}; "
        f"missing: {', '.join(missing) or 'none'}.",
        "Words are whitespace-separated tokens. Length buckets: "
        + ", ".join(bucket_labels(sc.length_buckets))
        + " words. Re-run any of this with "
        '`duckdb -c ".read views.sql" -c "SELECT ..."`.',
        "",
        *[f"![{p}]({p})\n" for p in plots],
        *[render_markdown(r) for r in results.values()],
    ]
    _write_atomic(out / "report.md", "\n".join(md).encode())
    doc = {
        n: {
            "title": r.title,
            "columns": r.columns,
            "rows": [list(x) for x in r.rows],
            "seconds": r.seconds,
            "notes": r.notes,
        }
        for n, r in results.items()
    }
    _write_atomic(out / "stats.json", json.dumps(doc, indent=1, default=str).encode())
    meta = Table(str(out))
    meta.save_config(cfg, "stats", sc)
    summary.extra.update({"views": len(views), "report": str(out / "report.md"), "plots": len(plots)})
    summary.finish()
    meta.save_json("_summary.json", summary.to_dict())
    summary.print()
    return results
