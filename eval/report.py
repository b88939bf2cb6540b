"""`make eval-report`: one HTML page with the human voting rates (95 % CIs), the
automatic metrics beside them, and image grids per prompt.

How votes count (stated on the page too): each answer is one vote for model A, for
model B, or a tie. For a comparison "X vs Y" the page shows the share of votes for X,
for tie and for Y (ties are their own share: neither dropped nor split), the gap
(share X minus share Y), and X's rate with ties split half-half. The ParaDiffusion
paper reports voting rates per question (visual appeal, text faithfulness) against
each baseline; its "+15 %" / "+45 %" read as the gap. Intervals: percentile cluster
bootstrap over prompts.

Which votes count: votes from admin tokens never count (an admin sees the models;
databases from before admins were refused may hold some), and votes of voters revoked
later are left out unless ``eval.vote.count_revoked`` is true. The page says how many
votes it counted and how many it left out, and why.

Every interval is printed with the number of prompts behind it (``n=``); rows with
fewer than ``eval.report.min_prompts`` prompts (default 10) are flagged, because a
bootstrap over a handful of prompts gives intervals that are too narrow to trust (one
prompt gives a zero-width one).

The page is written with ``html.escape`` and f-strings: it is one static page, and a
template engine would add a dependency for no gain. It has a viewport tag; on a
narrow screen (a 390 px phone) the voting table stacks each row into a card of
"column: value" lines instead of scrolling sideways, the other tables scroll inside
their own box, and the win rates with their intervals are an inline SVG plot (one bar
per comparison and question) that scales to the screen.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import html
import os
from collections import Counter, defaultdict
from pathlib import Path

from eval.paths import images_url, metrics_url, report_folder, votes_folder
from eval.schemas import EVAL_IMAGES
from eval.stats import LOSS, TIE, WIN, VotingRate, voting_rate
from eval.vote.db import QUESTIONS
from paradiffusion.config import RootConfig
from paradiffusion.stage import StageSummary, announce
from paradiffusion.storage import Table

STAGE = "eval-report"
TIES_NOTE = (
    "Each answer is a vote for A, for B, or a tie. Shares: votes for the first model / tie / the second "
    'model (ties are their own share). Gap = first share minus second share (how we read the paper\'s "+x %"). '
    "Ties-half = first share + tie share / 2. 95 % intervals: percentile bootstrap over prompts."
)

CSS = """body{font-family:system-ui,sans-serif;margin:16px;color:#222;max-width:1400px;overflow-wrap:anywhere}
.scroll{overflow-x:auto;max-width:100%;margin:8px 0 20px}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:3px 8px;font-size:.9em;text-align:right;overflow-wrap:normal;white-space:nowrap}
th{background:#f3f3f3}td.l,th.l{text-align:left}.ci{color:#777;font-size:.85em}.note{color:#555;max-width:1000px}
tr.few td{background:#fff7e0}.flag{color:#a15c00;font-weight:bold}
.banner{background:#fff3cd;border:1px solid #e0c36a;padding:8px 12px;margin:10px 0}
.grid{display:flex;gap:8px;flex-wrap:wrap}.grid figure{margin:0;text-align:center;font-size:.8em;max-width:45vw}
.grid img{width:192px;max-width:100%;height:auto;border:1px solid #ccc;image-rendering:pixelated}
.prompt{max-width:1000px;font-size:.9em}
svg.winrate{width:100%;max-width:720px;height:auto;display:block;margin:8px 0 20px}
svg.winrate text{font-size:12px;fill:#222}svg.winrate .tick{fill:#777;font-size:11px}
@media (max-width:640px){table.stack,table.stack tbody,table.stack tr,table.stack td{display:block}
table.stack tr.head{display:none}table.stack tr{border:1px solid #ccc;margin:0 0 10px;padding:4px 6px}
table.stack td{border:0;text-align:left;white-space:normal;padding:2px 0;font-size:.95em}
table.stack td::before{content:attr(data-label) ": ";color:#555;font-weight:600}}
"""
#: The voting table's columns: what a narrow screen prints before each value (stacked rows).
VOTE_COLUMNS = (
    "comparison (X vs Y)",
    "prompt set",
    "question",
    "votes",
    "prompts",
    "X wins",
    "tie",
    "Y wins",
    "gap X\u2212Y",
    "X, ties half",
)


def _table(head: str, rows: list[str]) -> str:
    """A table that scrolls sideways inside its own box (a phone never gets a page wider than itself)."""
    return f"<div class=scroll><table>{head}{''.join(rows)}</table></div>"


def _few(n_prompts: int, min_prompts: int) -> str:
    """The flag for a row with too few prompts to trust its interval ('' when enough)."""
    if n_prompts >= min_prompts:
        return ""
    return (
        f' <span class=flag title="fewer than {min_prompts} prompts: the interval is too narrow to trust">'
        f"&#9888; {n_prompts} prompt{'s' if n_prompts != 1 else ''}</span>"
    )


def _fmt(est, pct: bool = False) -> str:
    """``mean [low, high] n=prompts``: every interval with the number of prompts behind it."""
    if est is None:
        return ""
    if isinstance(est, dict):
        mean, lo, hi, n = est["mean"], est["ci_low"], est["ci_high"], est.get("n_prompts")
    else:
        mean, lo, hi, n = est.mean, est.low, est.high, est.n_prompts
    if mean != mean:  # NaN
        return "-"
    k, unit = (100, " %") if pct else (1, "")
    count = f" n={n}" if n is not None else ""
    return f"{mean * k:.1f}{unit} <span class=ci>[{lo * k:.1f}, {hi * k:.1f}]{count}</span>"


def counted_votes(rows: list[dict], count_revoked: bool = False) -> tuple[list[dict], Counter]:
    """The votes the report counts, and how many it leaves out by reason.

    Admin-token votes never count; revoked voters' votes count only with ``count_revoked``.
    """
    kept, left_out = [], Counter()
    for r in rows:
        if r.get("voter_role", "voter") != "voter":
            left_out["from admin tokens (an admin sees the models)"] += 1
        elif r.get("voter_revoked") and not count_revoked:
            left_out["from revoked voters (eval.vote.count_revoked: false)"] += 1
        else:
            kept.append(r)
    return kept, left_out


def voting_rates(rows: list[dict], n_boot: int, confidence: float, seed: int = 0) -> list[tuple[str, VotingRate]]:
    """Voting rates per comparison x question, for each prompt set and for all of them."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        for ps in (r["prompt_set"], "ALL"):
            groups[(r["model_x"], r["model_y"], r["question"], ps)].append(r)
    out = []
    for (mx, my, q, ps), rs in sorted(
        groups.items(),
        key=lambda kv: (
            kv[0][0],
            kv[0][1],
            kv[0][3] != "ALL",
            kv[0][3],
            list(QUESTIONS).index(kv[0][2]) if kv[0][2] in QUESTIONS else 99,
        ),
    ):
        outcomes = [WIN if r["winner"] == mx else TIE if r["winner"] is None else LOSS for r in rs]
        ids = [f"{r['prompt_set']}/{r['prompt_id']}" for r in rs]
        out.append((ps, voting_rate(outcomes, ids, mx, my, q, n_boot, confidence, seed)))
    return out


def _votes_section(cfg: RootConfig) -> tuple[str, int, int]:
    """The voting table; also the votes counted and the rows flagged for too few prompts."""
    from eval.vote.db import VoteStore

    db = Path(votes_folder(cfg)) / "votes.sqlite"
    if not db.is_file():
        return "<p>No voting database yet (run <code>make vote</code>).</p>", 0, 0
    store = VoteStore(db)
    all_rows = store.votes_rows()
    parts = []
    simulated = store.get_meta("simulated")
    if simulated:
        parts.append(
            f"<div class=banner><b>Simulated votes.</b> {html.escape(simulated)} They say nothing about "
            "the models.</div>"
        )
    if not all_rows:
        return "".join(parts) + "<p>No votes yet.</p>", 0, 0
    rc = cfg.eval.report
    rows, left_out = counted_votes(all_rows, cfg.eval.vote.count_revoked)
    n_voters = len({r["voter"] for r in rows})
    counted = (
        f"Counted {len(rows)} of {len(all_rows)} votes, from {n_voters} voter{'s' if n_voters != 1 else ''}"
        + (
            "; left out: " + "; ".join(f"{n} {html.escape(why)}" for why, n in sorted(left_out.items()))
            if left_out
            else "; none left out"
        )
        + (
            ". Revoked voters' votes are counted (eval.vote.count_revoked: true)."
            if cfg.eval.vote.count_revoked
            else "."
        )
    )
    parts.append(f"<p class=note id=votes-counted>{counted}</p>")
    if not rows:
        return "".join(parts), 0, 0
    parts.append(f"<p class=note>{html.escape(TIES_NOTE)}</p>")
    rates = voting_rates(rows, rc.bootstrap, rc.confidence, cfg.project.seed)
    parts.append(winrate_plot([r for ps, r in rates if ps == "ALL"], rc.confidence))
    head = (
        "<tr class=head>"
        + "".join(f"<th{' class=l' if i < 3 else ''}>{html.escape(c)}</th>" for i, c in enumerate(VOTE_COLUMNS))
        + "</tr>"
    )
    body, flagged = [], 0
    for ps, r in rates:
        few = _few(r.n_prompts, rc.min_prompts)
        flagged += bool(few)
        cells = [
            f"{html.escape(r.a)} vs {html.escape(r.b)}{few}",
            html.escape(ps),
            html.escape(r.question),
            str(r.n_votes),
            str(r.n_prompts),
            *(_fmt(e, True) for e in (r.win, r.tie, r.loss, r.gap, r.win_ties_half)),
        ]
        tds = "".join(
            f'<td{" class=l" if i < 3 else ""} data-label="{html.escape(VOTE_COLUMNS[i])}">{c}</td>'
            for i, c in enumerate(cells)
        )
        body.append(f"<tr{' class=few' if few else ''}>{tds}</tr>")
    parts.append(f"<div class=scroll><table class=stack id=voting-rates>{head}{''.join(body)}</table></div>")
    return "".join(parts), len(rows), flagged


def winrate_plot(rates: list[VotingRate], confidence: float = 0.95) -> str:
    """X's win rate (ties half) with its interval, one bar per comparison and question, as
    an inline SVG (no script, no dependency; it scales to the screen's width). A line
    marks 50 %: a bar whose interval stays clear of it is a real preference."""
    if not rates:
        return ""
    width, left, right, row_h, top = 400, 8, 8, 40, 22
    plot_w = width - left - right
    height = top + row_h * len(rates) + 8

    def x(v: float) -> float:
        return left + plot_w * min(max(v, 0.0), 1.0)

    out = [
        f'<svg class=winrate id=winrate viewBox="0 0 {width} {height}" role=img '
        f'aria-label="win rate with {confidence:.0%} intervals, one bar per comparison">'
    ]
    for t in (0, 0.25, 0.5, 0.75, 1):
        anchor = "start" if t == 0 else "end" if t == 1 else "middle"
        style = 'stroke="#444" stroke-width="1.5" stroke-dasharray="4 3"' if t == 0.5 else 'stroke="#ddd"'
        out.append(
            f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{top - 4}" y2="{height - 8}" {style}/>'
            f'<text class=tick x="{x(t):.1f}" y="12" text-anchor="{anchor}">{t:.0%}</text>'
        )
    for i, r in enumerate(rates):
        e = r.win_ties_half
        y0 = top + i * row_h
        label = f"{r.a} vs {r.b} \u00b7 {r.question.replace('_', ' ')}: {e.mean:.0%} [{e.low:.0%}, {e.high:.0%}]"
        out.append(
            f'<g class=bar data-mean="{e.mean:.4f}" data-low="{e.low:.4f}" data-high="{e.high:.4f}">'
            f"<title>{html.escape(label)} (n={r.n_prompts} prompts, {r.n_votes} votes)</title>"
            f'<text x="{left}" y="{y0 + 11}">{html.escape(label)}</text>'
            f'<rect x="{left}" y="{y0 + 16}" width="{x(e.mean) - left:.1f}" height="14" fill="#5b8def"/>'
            f'<line x1="{x(e.low):.1f}" x2="{x(e.high):.1f}" y1="{y0 + 23}" y2="{y0 + 23}" stroke="#111" '
            'stroke-width="2"/>'
            f'<line x1="{x(e.low):.1f}" x2="{x(e.low):.1f}" y1="{y0 + 18}" y2="{y0 + 28}" stroke="#111" stroke-width="2"/>'
            f'<line x1="{x(e.high):.1f}" x2="{x(e.high):.1f}" y1="{y0 + 18}" y2="{y0 + 28}" stroke="#111" '
            'stroke-width="2"/></g>'
        )
    out.append("</svg>")
    caption = (
        f"<p class=note>Win rate of the first model, ties counted half, with its {confidence:.0%} interval "
        "(bootstrap over prompts), all prompt sets; the dashed line is 50 % (no preference).</p>"
    )
    return caption + "".join(out)


def _metrics_section(cfg: RootConfig) -> tuple[str, int]:
    """The metrics table (and FID, DPG-Bench); also the rows flagged for too few prompts."""
    from eval.metrics import METRIC_COLUMNS

    table = Table(metrics_url(cfg))
    agg = table.load_json("_aggregate.json")
    if not agg:
        return "<p>No metrics yet (run <code>make eval</code>).</p>", 0
    min_prompts = cfg.eval.report.min_prompts
    rows = agg["rows"]
    cols = [m for m in METRIC_COLUMNS if any(m in r for r in rows)]
    parts = [
        f"<p class=note>Mean per image with 95 % interval ({html.escape(agg['ci_method'])}); n = prompts behind "
        f"the interval; rows with fewer than {min_prompts} prompts are flagged. "
        f"CLIP score: {html.escape(agg['clip_score_note'])}.</p>"
    ]
    head = (
        "<tr><th class=l>model</th><th class=l>prompt set</th><th class=l>category</th><th>images</th>"
        "<th>prompts</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>"
    )
    body, flagged = [], 0
    for r in rows:
        few = _few(int(r["n_prompts"]), min_prompts)
        flagged += bool(few)
        body.append(
            f"<tr{' class=few' if few else ''}><td class=l>{html.escape(r['model'])}{few}</td>"
            f"<td class=l>{html.escape(r['prompt_set'])}</td><td class=l>{html.escape(r['category'])}</td>"
            f"<td>{r['n_images']}</td><td>{r['n_prompts']}</td>"
            + "".join(f"<td>{_fmt({'n_prompts': r['n_prompts'], **r[c]} if c in r else None)}</td>" for c in cols)
            + "</tr>"
        )
    parts.append(_table(head, body))
    notes = agg.get("preference_notes") or {}
    if notes:
        parts.append(
            "<p class=note>Preference models: "
            + "; ".join(f"{html.escape(k)}: {html.escape(v)}" for k, v in notes.items())
            + "</p>"
        )
    fid = table.load_json("_fid.json")
    if fid:
        parts.append(
            f"<h3>FID ({html.escape(fid['features'])} features, reference {html.escape(str(fid['reference']))})"
            f"</h3><p class=note>{html.escape(fid['note'])}</p>"
        )
        parts.append(
            _table(
                "<tr><th class=l>model / prompt set</th><th>FID</th><th>images</th><th>reference images</th></tr>",
                [
                    f"<tr><td class=l>{html.escape(k)}</td><td>{v['fid']:.3f}</td><td>{v['n_images']}</td>"
                    f"<td>{v['n_reference']}</td></tr>"
                    for k, v in fid["results"].items()
                ],
            )
        )
    dpg = table.load_json("_dpg.json")
    if dpg:
        dpg_html, dpg_flagged = _dpg_section(dpg, min_prompts)
        parts.append(dpg_html)
        flagged += dpg_flagged
    return "".join(parts), flagged


def _dpg_section(doc: dict, min_prompts: int) -> tuple[str, int]:
    """DPG-Bench: the score by the official arithmetic and the corrected one, per category."""
    parts = [
        f"<h3>DPG-Bench (judge: {html.escape(str(doc['judge']))})</h3>",
        f"<p class=note>{html.escape(doc['note'])}</p>",
    ]
    head = (
        "<tr><th class=l>model / prompt set</th><th>DPG score (official arithmetic)</th>"
        "<th>corrected</th><th>prompts scored</th><th>prompts left out</th><th>unclear answers</th>"
        "<th class=l>level-1 categories (official)</th></tr>"
    )
    body, flagged = [], 0
    for name, res in doc["results"].items():
        off, cor = res["official"], res["corrected"]
        few = _few(int(off["n_prompts"]), min_prompts)
        flagged += bool(few)
        l1 = ", ".join(f"{html.escape(k)} {v:.1f}" for k, v in sorted(off["l1"].items()))
        left = "; ".join(f"{n} {html.escape(why)}" for why, n in sorted(off["left_out"].items())) or "none"
        body.append(
            f"<tr{' class=few' if few else ''}><td class=l>{html.escape(name)}{few}</td>"
            f"<td>{_fmt_score(off)}</td><td>{_fmt_score(cor)}</td><td>{off['n_prompts']}</td>"
            f"<td class=l>{left}</td><td>{res.get('unclear_answers', 0)}</td><td class=l>{l1}</td></tr>"
        )
    parts.append(_table(head, body))
    l2_head = "<tr><th class=l>model / prompt set</th><th class=l>level-2 category</th><th>official</th><th>corrected</th></tr>"

    def cell(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    l2_rows = [
        f"<tr><td class=l>{html.escape(name)}</td><td class=l>{html.escape(cat)}</td>"
        f"<td>{cell(res['official']['l2'].get(cat))}</td><td>{cell(res['corrected']['l2'].get(cat))}</td></tr>"
        for name, res in doc["results"].items()
        for cat in sorted(set(res["official"]["l2"]) | set(res["corrected"]["l2"]))
    ]
    parts.append("<details><summary>Level-2 categories</summary>" + _table(l2_head, l2_rows) + "</details>")
    return "".join(parts), flagged


def _fmt_score(res: dict) -> str:
    """A DPG score (0-100) with its bootstrap interval over prompts and the prompt count."""
    if res.get("score") is None:
        return "-"
    return f"{res['score']:.2f} <span class=ci>[{res['ci_low']:.2f}, {res['ci_high']:.2f}] n={res['n_prompts']}</span>"


def _grids_section(cfg: RootConfig, out_dir: str) -> str:
    images = Table(images_url(cfg), schema=EVAL_IMAGES)
    if not images.done_shards():
        return "<p>No images yet (run <code>make eval-generate</code>).</p>"
    rows = [r for r in images.read().to_pylist() if not r["error"] and r["image_path"]]
    local = "://" not in images.url
    by_prompt: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_prompt[(r["prompt_set"], r["prompt_id"])][r["model"]].append(r)
    models = sorted({r["model"] for r in rows})
    parts, shown = [], defaultdict(int)
    for (ps, pid), per_model in sorted(by_prompt.items()):
        if shown[ps] >= cfg.eval.report.grid_prompts:
            continue
        shown[ps] += 1
        first = next(iter(per_model.values()))[0]
        parts.append(
            f"<h4>{html.escape(ps)} / {html.escape(pid)} <span class=ci>({html.escape(str(first['category']))})"
            f"</span></h4><p class=prompt>{html.escape(first['prompt'])}</p><div class=grid>"
        )
        for m in models:
            for r in sorted(per_model.get(m, []), key=lambda r: r["seed"]):
                src = (
                    os.path.relpath(os.path.join(images.path, r["image_path"]), out_dir)
                    if local
                    else f"{images.url}/{r['image_path']}"
                )
                parts.append(
                    f'<figure><img loading=lazy src="{html.escape(src)}" alt=""><figcaption>'
                    f"{html.escape(m)} &middot; seed {r['seed']}</figcaption></figure>"
                )
        parts.append("</div>")
    return "".join(parts)


def build_report(cfg: RootConfig) -> tuple[str, dict]:
    """The HTML page and a few counts for the summary."""
    out_dir = os.path.abspath(report_folder(cfg)) if "://" not in report_folder(cfg) else report_folder(cfg)
    votes_html, n_votes, flagged_votes = _votes_section(cfg)
    metrics_html, flagged_metrics = _metrics_section(cfg)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    page = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1"><title>Evaluation report</title>'
        f"<style>{CSS}</style></head><body><h1>Evaluation report</h1><p class=note>Written {now}. Images: "
        f"{html.escape(images_url(cfg))}; metrics: {html.escape(metrics_url(cfg))}; votes: "
        f"{html.escape(votes_folder(cfg))}.</p>"
        f"<h2>Human voting rates</h2>{votes_html}"
        f"<h2>Automatic metrics</h2>{metrics_html}"
        f"<h2>Images per prompt</h2>{_grids_section(cfg, out_dir)}</body></html>"
    )
    return page, {"votes": n_votes, "rows_under_min_prompts": flagged_votes + flagged_metrics}


def run_report(cfg: RootConfig, args: argparse.Namespace) -> int:
    """The `eval-report` command."""
    out = Table(report_folder(cfg))
    announce(
        STAGE,
        {
            "images": images_url(cfg),
            "metrics": metrics_url(cfg),
            "votes": votes_folder(cfg),
            "output": f"{out.url}/index.html",
        },
    )
    summary = StageSummary(STAGE)
    page, counts = build_report(cfg)
    out.write_file("index.html", page.encode())
    out.save_config(cfg, STAGE, cfg.eval.report)
    summary.n_in = counts["votes"]
    summary.n_out = 1
    if counts["rows_under_min_prompts"]:
        summary.flag(
            f"rows under {cfg.eval.report.min_prompts} prompts (flagged on the page)", counts["rows_under_min_prompts"]
        )
    summary.extra["report"] = f"{out.url}/index.html"
    summary.finish()
    out.save_json("_summary.json", summary.to_dict())
    summary.print()
    return 0
