"""The key-level results, kept current in proportion to the shards that changed.

Distinct images per source (Table 1, with their mean short side), distinct images per caption
set (captioners), the funnel's nested key sets and the caption-set pairs cannot be added up
shard by shard: one image may have rows in several shards. They can be added up **key by
key**: every one of these numbers is a sum, over the distinct keys, of what that key's rows
(across every table) contribute. So this module keeps, under ``<stats.output>/derived/keyed``::

    rows/<table>/<id>-<digest>.parquet   per committed shard (captions, scores) or input file
                                         (images, candidates): the few columns of its rows the
                                         pass reads (64-bit key hash, caption set, words, ...);
                                         annotations (small): one file of per-key flags
    <generation>/totals_*.parquet        the sums over every key: per caption set, per caption-set
                                         pair, per funnel step
    <generation>/{table1,captioners,pairs,funnel}.parquet   the results, labelled (what the
                                         ``keyed_*`` views read)
    keyed.json                           the manifest: the inputs (each shard's identity and its
                                         rows file) and the generation that holds their totals

When shards are added, replaced (a recaption: a new commit marker) or removed, only the keys of
those shards are *touched*: their contribution under the old rows (every old rows file, filtered
to the touched keys) is subtracted from the totals and their contribution under the new rows is
added. The work is in proportion to the changed shards' rows, plus one filtered read of the key
columns of the other shards' rows files. The prompt versions' labels are applied last, from the
merged partials, so a new prompt version that relabels older caption sets costs nothing here.
A change of the pass itself, of which tables exist, of ``annotations.train_rule``, or of more
than half of the inputs computes everything again (the same SQL without the key filter).

Crash safety: new rows files get new names (their digest), the new generation is written in
full before ``keyed.json`` names it, and files that no manifest names are removed afterwards;
a run killed at any point leaves the previous manifest and every file it names in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from paradiffusion.log import get_logger
from stats.aggregates import HAS_WORDS as HW
from stats.aggregates import KEYED, _files_sql, _lit, _pv_sql, _q, part_files

log = get_logger("stats")

#: Bumped when the pass or its files change: everything is computed again.
KEYED_VERSION = 6

#: The kept totals: name -> (group columns, summed columns). A group whose first summed column
#: reaches 0 is dropped (no distinct image left), as the raw query would have no row for it.
TOTALS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "table1": (("src", "sid"), ("images", "ss_sum", "ss_n")),
    "captioners": (("sid",), ("images",)),
    "pairs": (("sid_a", "sid_b"), ("n", "sa", "na", "sb", "nb", "sd", "nd", "gab", "gba")),
    "funnel": (("step",), ("t", "p")),
}

#: The per-key flag each funnel step (stats.queries.FUNNEL_STEPS) counts.
STEP_FLAGS = {
    "urls": "u",
    "downloaded": "d",
    "scored": "s",
    "kept": "k",
    "captioned": "c",
    "candidates": "cand",
    "annotated": "an",
    "approved": "ap",
}


def _read(files: list[str]) -> str:
    return _files_sql(files) if files else ""


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _fingerprint_file(url: str) -> list:
    """What an input file of an uncached table is: size and time (or ETag) from its filesystem."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    info = fs.info(path)
    return [info.get("size"), str(info.get("mtime") or info.get("LastModified") or info.get("ETag") or "")]


# --------------------------------------------------------------------------- the inputs
def _inputs(state, sources, cfg) -> dict[str, dict[str, tuple[dict, str]]]:
    """table -> input id -> (identity, SQL of its lean rows). One input per committed shard of a
    cached table (read from its per-row cache), per file of images / candidates, and one for all
    of the annotations (per-key flags: the review state of a key depends on its rows only)."""
    from captioning.small.texts import approved_sql, texts_sql
    from stats.views import files_sql

    have = {n for n, s in sources.items() if s.exists}
    out: dict[str, dict[str, tuple[dict, str]]] = {}
    for table, lean in (
        ("captions", "kh AS key, sid, n_words, finish_reason, created_at"),
        ("scores", "kh AS key, kept, least(width, height) AS short_side"),
    ):
        if table not in have:
            continue
        folder = Path(state.folders[table])
        out[table] = {
            shard: (ident, f"SELECT {lean} FROM read_parquet({_lit(str(folder / f'{shard}.parquet'))})")
            for shard, ident in state.idents[table].items()
        }
    for table, lean in (("images", "hash(key) AS key, status"), ("candidates", "hash(key) AS key")):
        if table in have:
            out[table] = {
                hashlib.sha1(f.encode()).hexdigest()[:16]: (
                    {"file": f, "stat": _fingerprint_file(f)},
                    f"SELECT {lean} FROM {files_sql([f])}",
                )
                for f in sources[table].files
            }
    if "annotations" in have:
        src = sources["annotations"]
        email = "" if "annotator_email" in src.columns else ", NULL::VARCHAR AS annotator_email"
        ann = f"(SELECT * REPLACE (hash(key) AS key){email} FROM {files_sql(src.files)})"
        rule = cfg.annotations.train_rule
        sql = (
            "SELECT key, bool_or(an) AS an, bool_or(ap) AS ap, bool_or(ta) AS ta FROM ("
            f"SELECT key, parent_version IS NULL AS an, false AS ap, false AS ta FROM {ann} "
            f"UNION ALL SELECT key, false, state = 'approved', false FROM ({texts_sql(ann)}) "
            f"UNION ALL SELECT key, false, false, true FROM ({approved_sql(ann, rule)})"
            ") GROUP BY key"
        )
        out["annotations"] = {"all": ({"files": [[f, _fingerprint_file(f)] for f in src.files]}, sql)}
    return out


# --------------------------------------------------------------------------- contributions
def _contrib(con, files: dict[str, list[str]], have: set[str], keys: str | None, prefix: str) -> None:
    """Temp tables ``<prefix>_<total>``: what the keys in ``keys`` (a table of ``key``; None: every
    key) contribute to each total, from the rows files in ``files`` (table -> files)."""
    from stats.queries import funnel_plan

    for table in ("captions", "scores", "images", "candidates", "annotations"):
        src = _read(files.get(table, []))
        if table in have and src:
            where = f" WHERE key IN (SELECT key FROM {keys})" if keys else ""
            con.execute(f"CREATE OR REPLACE TEMP TABLE {prefix}_r_{table} AS SELECT * FROM {src}{where}")
        elif table in have:  # present, but no rows among these files
            cols = {
                "captions": "NULL::UBIGINT AS key, NULL::UBIGINT AS sid, NULL::INT AS n_words, "
                "NULL::VARCHAR AS finish_reason, NULL::TIMESTAMPTZ AS created_at",
                "scores": "NULL::UBIGINT AS key, NULL::BOOLEAN AS kept, NULL::INT AS short_side",
                "images": "NULL::UBIGINT AS key, NULL::VARCHAR AS status",
                "candidates": "NULL::UBIGINT AS key",
                "annotations": "NULL::UBIGINT AS key, NULL::BOOLEAN AS an, NULL::BOOLEAN AS ap, NULL::BOOLEAN AS ta",
            }[table]
            con.execute(f"CREATE OR REPLACE TEMP TABLE {prefix}_r_{table} AS SELECT {cols} WHERE false")
    r = {t: f"{prefix}_r_{t}" for t in have}
    # one row per (caption set, key), shared by Table 1, captioners and the pairs; the words of the
    # newest non-error caption, as the raw captioner_pairs query takes them
    if "captions" in have:
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE {prefix}_sk AS SELECT sid, key, bool_or(hw) AS hw, "
            "count(*) FILTER (ne) AS ne, arg_max(n_words, row(created_at, n_words)) FILTER (ne) AS words FROM ("
            f"SELECT *, {HW} AS hw, finish_reason IS DISTINCT FROM 'error' AS ne FROM {r['captions']}) GROUP BY ALL"
        )
    if "scores" in have:
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE {prefix}_sg AS SELECT key, max(short_side) AS short_side "
            f"FROM {r['scores']} GROUP BY key"
        )
        parts = [
            f"SELECT 'alt_text' AS src, NULL::UBIGINT AS sid, key, max(short_side) AS ss FROM {r['scores']} "
            "WHERE kept GROUP BY key"
        ]
        if "captions" in have:
            parts.append(
                f"SELECT 'vlm', k.sid, k.key, s.short_side FROM {prefix}_sk k LEFT JOIN {prefix}_sg s USING (key) WHERE k.hw"
            )
        if "annotations" in have:
            parts.append(
                f"SELECT 'annotations_approved', NULL, a.key, s.short_side FROM {r['annotations']} a "
                f"LEFT JOIN {prefix}_sg s USING (key) WHERE a.ta"
            )
        t1 = (
            "SELECT src, sid, count(*)::BIGINT AS images, sum(ss)::BIGINT AS ss_sum, count(ss)::BIGINT AS ss_n FROM ("
            + " UNION ALL ".join(parts)
            + ") GROUP BY src, sid"
        )
    else:
        t1 = "SELECT NULL::VARCHAR AS src, NULL::UBIGINT AS sid, 0::BIGINT AS images, 0::BIGINT AS ss_sum, 0::BIGINT AS ss_n WHERE false"
    con.execute(f"CREATE OR REPLACE TEMP TABLE {prefix}_table1 AS {t1}")
    if "captions" in have:
        cap = f"SELECT sid, count(*)::BIGINT AS images FROM {prefix}_sk GROUP BY sid"
        pairs = (
            "SELECT a.sid AS sid_a, b.sid AS sid_b, count(*)::BIGINT AS n, sum(a.words)::BIGINT AS sa, "
            "count(a.words)::BIGINT AS na, sum(b.words)::BIGINT AS sb, count(b.words)::BIGINT AS nb, "
            "sum(abs(a.words - b.words))::BIGINT AS sd, count(a.words - b.words)::BIGINT AS nd, "
            "count(*) FILTER (a.words > b.words)::BIGINT AS gab, count(*) FILTER (b.words > a.words)::BIGINT AS gba "
            f"FROM {prefix}_sk a JOIN {prefix}_sk b ON a.key = b.key AND a.sid < b.sid WHERE a.ne > 0 AND b.ne > 0 "
            "GROUP BY ALL"
        )
    else:
        cap = "SELECT NULL::UBIGINT AS sid, 0::BIGINT AS images WHERE false"
        pairs = (
            "SELECT NULL::UBIGINT AS sid_a, NULL::UBIGINT AS sid_b"
            + "".join(f", 0::BIGINT AS {c}" for c in TOTALS["pairs"][1])
            + " WHERE false"
        )
    con.execute(f"CREATE OR REPLACE TEMP TABLE {prefix}_captioners AS {cap}")
    con.execute(f"CREATE OR REPLACE TEMP TABLE {prefix}_pairs AS {pairs}")
    # the funnel: one row of flags per key, then each step's population counted from them
    plan = funnel_plan(have)
    flag_parts: dict[str, dict[str, str]] = {
        "images": {"u": "true", "d": "status = 'success'"},
        "scores": {"s": "true", "k": "kept"},
        "captions": {"c": HW},
        "candidates": {"cand": "true"},
        "annotations": {"an": "an", "ap": "ap"},
    }
    used = [t for t in flag_parts if t in have and any(step[2] == t for step in plan)]
    if plan and used:
        flags = [f for t in used for f in flag_parts[t]]
        unions = []
        for t in used:
            own = flag_parts[t]
            sel = [f"coalesce({own[f]}, false) AS {f}" if f in own else f"false AS {f}" for f in flags]
            unions.append(f"SELECT key, {', '.join(sel)} FROM {r[t]}")
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE {prefix}_flags AS SELECT key, "
            + ", ".join(f"bool_or({f}) AS {f}" for f in flags)
            + " FROM ("
            + " UNION ALL ".join(unions)
            + ") GROUP BY key"
        )
        pop: dict[str, str] = {}
        cols = []
        for i, (name, _label, _table, _sql, parent) in enumerate(plan, start=1):
            t = STEP_FLAGS[name]
            pop[name] = t if parent is None else f"({t} AND {pop[parent]})"
            cols.append(
                f"SELECT {i} AS step, count(*) FILTER ({t})::BIGINT AS t, count(*) FILTER ({pop[name]})::BIGINT AS p FROM {prefix}_flags"
            )
        funnel = " UNION ALL ".join(cols)
    else:
        funnel = "SELECT NULL::INT AS step, 0::BIGINT AS t, 0::BIGINT AS p WHERE false"
    con.execute(f"CREATE OR REPLACE TEMP TABLE {prefix}_funnel AS {funnel}")


def _merge(con, name: str, old: str | None, plus: str, minus: str | None) -> str:
    """SQL: the totals ``old`` + ``plus`` - ``minus`` (groups left at 0 dropped)."""
    groups, sums = TOTALS[name]
    g = ", ".join(groups)
    parts = [f"SELECT {g}, {', '.join(sums)} FROM {plus}"]
    if old:
        parts.append(f"SELECT {g}, {', '.join(sums)} FROM {old}")
    if minus:
        parts.append(f"SELECT {g}, {', '.join(f'-{c}' for c in sums)} FROM {minus}")
    having = "" if name == "funnel" else f" HAVING sum({sums[0]}) <> 0"
    return (
        f"SELECT {g}, {', '.join(f'sum({c})::BIGINT AS {c}' for c in sums)} FROM ("
        + " UNION ALL ".join(parts)
        + f") GROUP BY {g}{having}"
    )


# --------------------------------------------------------------------------- results
def _results(have: set[str], pv: str | None, gen: Path) -> dict[str, str]:
    """SQL of each labelled result over the totals in ``gen`` (``pv``: the merged prompt versions)."""
    from stats.queries import funnel_plan

    tot = {n: f"read_parquet({_lit(str(gen / f'totals_{n}.parquet'))})" for n in TOTALS}
    lab = (
        f"(SELECT sid, source FROM ({pv}))"
        if pv
        else "(SELECT NULL::UBIGINT AS sid, NULL::VARCHAR AS source WHERE false)"
    )
    out = {
        "table1": (
            f"SELECT coalesce(v.source, t.src) AS source, t.images, t.ss_sum, t.ss_n FROM {tot['table1']} t "
            f"LEFT JOIN {lab} v ON t.src = 'vlm' AND v.sid = t.sid"
        ),
        "captioners": f"SELECT v.source, t.images FROM {tot['captioners']} t JOIN {lab} v USING (sid)",
    }
    # a pair is kept once per two caption sets (sid_a < sid_b); its columns follow the labels' order
    sw = "la > lb"

    def side(x, y):
        return f"CASE WHEN {sw} THEN {y} ELSE {x} END"

    out["pairs"] = (
        "SELECT least(la, lb) AS source_a, greatest(la, lb) AS source_b, n AS common_images, "
        f"round({side('sa', 'sb')}::DOUBLE / nullif({side('na', 'nb')}, 0), 1) AS mean_words_a, "
        f"round({side('sb', 'sa')}::DOUBLE / nullif({side('nb', 'na')}, 0), 1) AS mean_words_b, "
        "round(sd::DOUBLE / nullif(nd, 0), 1) AS mean_abs_diff, "
        f"round(100 * ({side('gab', 'gba')}::DOUBLE / nullif(nd, 0)), 1) AS pct_a_longer FROM ("
        f"SELECT t.*, a.source AS la, b.source AS lb FROM {tot['pairs']} t "
        f"JOIN {lab} a ON a.sid = t.sid_a JOIN {lab} b ON b.sid = t.sid_b)"
    )
    plan = funnel_plan(have)
    if plan:
        step_of = {n: j for j, (n, *_r) in enumerate(plan, start=1)}
        rows = []
        for i, (_name, label, _t, _s, parent) in enumerate(plan, start=1):

            def val(col, step):
                return f"(SELECT {col} FROM {tot['funnel']} WHERE step = {step})::BIGINT"

            rows.append(
                f"SELECT {i} AS step, '{label}' AS stage, coalesce({val('p', i)}, 0) AS images, "
                + (
                    f"{step_of[parent]} AS of_step, coalesce({val('p', step_of[parent])}, 0) AS parent_images, "
                    if parent
                    else "NULL::INT AS of_step, NULL::BIGINT AS parent_images, "
                )
                + f"coalesce({val('t - p', i)}, 0) AS outside"
            )
        out["funnel"] = (
            "SELECT step, stage, images, of_step, round(100.0 * images / nullif(parent_images, 0), 1) AS pct_of_parent, "
            "outside FROM (" + " UNION ALL ".join(rows) + ") ORDER BY step"
        )
    else:
        out["funnel"] = "SELECT NULL::INT AS step WHERE false"
    return out


# --------------------------------------------------------------------------- the pass
@dataclass
class Keyed:
    """What :func:`refresh_keyed` did."""

    folder: str  # the generation holding the results (what the keyed_* views read)
    mode: str  # "kept" (nothing changed), "touched" (updated for the touched keys) or "full"
    inputs: int  # shards / files read by the pass
    changed: int  # of them added, replaced or removed since the last run
    touched_keys: int | None  # keys recomputed ("touched" only)
    seconds: float

    @property
    def recomputed(self) -> bool:
        return self.mode != "kept"


def refresh_keyed(con, out: Path, state, sources, cfg) -> Keyed:
    """Bring the key-level results up to date (see the module docstring)."""
    t0 = time.perf_counter()
    folder = Path(out) / "derived" / "keyed"
    folder.mkdir(parents=True, exist_ok=True)
    have = {n for n, s in sources.items() if s.exists}
    glob_fp = {"version": KEYED_VERSION, "have": sorted(have), "train_rule": cfg.annotations.train_rule}
    inputs = _inputs(state, sources, cfg)
    meta = folder / "keyed.json"
    old = json.loads(meta.read_text()) if meta.exists() else None
    if old is not None:
        named = [folder / f for t in old.get("shards", {}).values() for _i, f in t.values()]
        gen_ok = (folder / old.get("generation", "-")).is_dir() and all(
            (folder / old["generation"] / f"{n}.parquet").exists() for n in (*KEYED, *(f"totals_{t}" for t in TOTALS))
        )
        if old.get("global") != glob_fp or not gen_ok or not all(f.exists() for f in named):
            old = None  # computed again from scratch
    old_shards: dict[str, dict[str, list]] = old["shards"] if old else {}
    changed_old: dict[str, list[str]] = {}  # table -> rows files of the inputs that changed or went
    changed_new: dict[str, list[str]] = {}
    new_shards: dict[str, dict[str, list]] = {}
    n_inputs = n_changed = 0
    for table, ins in inputs.items():
        prev = old_shards.get(table, {})
        new_shards[table] = {}
        for iid, (ident, sql) in ins.items():
            n_inputs += 1
            if iid in prev and prev[iid][0] == ident:
                new_shards[table][iid] = prev[iid]
                continue
            n_changed += 1
            name = f"rows/{table}/{iid}-{_digest(ident)}.parquet"
            dest = folder / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.tmp")
            con.execute(f"COPY ({sql}) TO '{_q(str(tmp))}' (FORMAT parquet)")
            os.replace(tmp, dest)
            new_shards[table][iid] = [ident, name]
            changed_new.setdefault(table, []).append(str(dest))
            if iid in prev:
                changed_old.setdefault(table, []).append(str(folder / prev[iid][1]))
        for iid, (_ident, name) in prev.items():
            if iid not in ins:
                n_changed += 1
                changed_old.setdefault(table, []).append(str(folder / name))
    for table, prev in old_shards.items():
        if table not in inputs:  # cannot happen while `have` is the same (then old is None)
            n_changed += len(prev)
    if old is not None and n_changed == 0:
        return Keyed(str(folder / old["generation"]), "kept", n_inputs, 0, None, time.perf_counter() - t0)
    new_files = {t: [str(folder / f) for _i, f in s.values()] for t, s in new_shards.items()}
    full = old is None or n_changed * 2 > max(1, n_inputs)
    n_touched = None
    if full:
        _contrib(con, new_files, have, None, "kn")
        merged = {n: _merge(con, n, None, f"kn_{n}", None) for n in TOTALS}
    else:
        old_files = {t: [str(folder / f) for _i, f in s.values()] for t, s in old_shards.items()}
        touched = [f"SELECT key FROM {_read(fs)}" for d in (changed_old, changed_new) for fs in d.values() if fs]
        con.execute(
            "CREATE OR REPLACE TEMP TABLE touched AS SELECT DISTINCT key FROM (" + " UNION ALL ".join(touched) + ")"
        )
        n_touched = con.execute("SELECT count(*) FROM touched").fetchone()[0]
        _contrib(con, old_files, have, "touched", "ko")
        _contrib(con, new_files, have, "touched", "kn")
        prev_gen = folder / old["generation"]
        merged = {
            n: _merge(con, n, f"read_parquet({_lit(str(prev_gen / f'totals_{n}.parquet'))})", f"kn_{n}", f"ko_{n}")
            for n in TOTALS
        }
    gen_name = f"gen-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    gen = folder / gen_name
    tmp_gen = folder / f".{gen_name}.tmp"
    tmp_gen.mkdir()
    for n, sql in merged.items():
        con.execute(f"COPY ({sql}) TO '{_q(str(tmp_gen / f'totals_{n}.parquet'))}' (FORMAT parquet)")
    pv = None
    if "captions" in have and state.idents.get("captions"):
        pv = _pv_sql(_read(part_files(state.folders["captions"], sorted(state.idents["captions"]), "sets")))
    for n, sql in _results(have, pv, tmp_gen).items():
        con.execute(f"COPY ({sql}) TO '{_q(str(tmp_gen / f'{n}.parquet'))}' (FORMAT parquet)")
    # the results name the totals by path only while written; the folder is renamed whole
    os.replace(tmp_gen, gen)
    doc = {"global": glob_fp, "generation": gen_name, "shards": new_shards}
    tmp = folder / ".keyed.json.tmp"
    tmp.write_text(json.dumps(doc, default=str))
    os.replace(tmp, meta)
    _remove_unnamed(folder, doc)
    secs = time.perf_counter() - t0
    log.info(
        "key-level results (distinct images, funnel, caption-set pairs): %s in %.1f s (%d of %d inputs changed)",
        "computed in full" if full else "updated for the touched keys",
        secs,
        n_changed,
        n_inputs,
    )
    return Keyed(str(gen), "full" if full else "touched", n_inputs, n_changed, n_touched, secs)


def _remove_unnamed(folder: Path, doc: dict) -> None:
    """Remove the rows files and generations the manifest no longer names (and older leftovers)."""
    keep = {doc["generation"], "keyed.json", "rows"}
    for p in folder.iterdir():
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    named = {f for t in doc["shards"].values() for _i, f in t.values()}
    rows = folder / "rows"
    if rows.is_dir():
        for p in rows.rglob("*.parquet"):
            if str(p.relative_to(folder)) not in named:
                p.unlink(missing_ok=True)
