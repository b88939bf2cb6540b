"""DPG-Bench in `make eval`: ask the VQA judge every question about every image, then score.

For each prompt set of kind ``dpg_bench`` (or ``eval.metrics.dpg.prompt_sets``), the
``eval.metrics.dpg.images_per_prompt`` lowest-seed images of each model and prompt are
the crops of the official 2x2 grid (crop = rank by seed). Every question of the prompt
(``eval.metrics.dpg.questions``) is asked of the judge, one call per question over all
pending images of that prompt (every model at once, ``batch_size`` at most).

Answers go to ``<metrics>/dpg_answers`` (:data:`eval.schemas.DPG_ANSWERS`), committed
every ``images_per_shard`` whole images: a rerun skips every image already judged, and
a kill loses at most the images of the shard in flight. An image the judge fails on is
not written (counted) and is asked again on the next run. Scoring (:mod:`eval.dpg`)
then reads all answers; ``_dpg.json`` in the metrics folder holds the DPG-Bench score
by the official arithmetic and the corrected one, with level-1 and level-2 categories,
per model x prompt set.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from eval.dpg import (
    ARITHMETICS,
    DpgItemFailed,
    DpgQuestions,
    aggregate_items,
    load_dpg_questions,
    parse_answer,
    score_answers,
    score_item,
)
from eval.paths import dpg_answers_url
from eval.schemas import DPG_ANSWERS
from eval.stats import bootstrap_mean
from paradiffusion.config import ConfigError, RootConfig
from paradiffusion.log import get_logger
from paradiffusion.stage import StageSummary, progress
from paradiffusion.storage import Table, rows_to_table

log = get_logger("eval.dpg")

NOTE = (
    "DPG-Bench (ELLA): yes/no questions per prompt with dependencies, asked of each of the {n} lowest-seed images "
    "of the prompt (the official 2x2 grid holds 4). 'Official arithmetic' reproduces dpg_bench/compute_dpg_bench.py (ELLA commit 3c228f1): "
    "its first data row is skipped and category scores come from the last of the four images only (upstream issues "
    "#61, #60); 'corrected' fixes those two. Category scores use the answers before the dependency rule, as the "
    "script does. The official judge is mPLUG-large (exact answer 'yes'); this judge is a different VLM (first word "
    "'yes'), so compare scores with each other, not with published numbers."
)


def dpg_prompt_sets(cfg: RootConfig) -> list[str]:
    """The prompt sets DPG-Bench scoring applies to."""
    d = cfg.eval.metrics.dpg
    if d.prompt_sets is not None:
        return list(d.prompt_sets)
    return [name for name, ps in cfg.eval.prompt_sets.items() if ps.kind == "dpg_bench"]


def load_judge(cfg: RootConfig):
    """The judge named by ``eval.metrics.dpg.judge``, loaded through the captioner registry."""
    d = cfg.eval.metrics.dpg
    known = sorted(cfg.caption.captioners)
    if not d.judge:
        raise ConfigError(f"eval.metrics.dpg.judge is not set: name a VLM from caption.captioners ({known})")
    if d.judge not in cfg.caption.captioners:
        raise ConfigError(f"eval.metrics.dpg.judge: {d.judge!r} is not in caption.captioners; defined: {known}")
    from captioning.captioners import load_captioner
    from captioning.config import GenerationSettings

    return load_captioner(
        cfg.caption.captioners[d.judge], GenerationSettings(max_new_tokens=d.max_new_tokens, do_sample=False)
    )


def _judge_name(judge) -> str:
    rev = getattr(judge, "revision", None)
    return f"{getattr(judge, 'model_id', type(judge).__name__)}" + (f"@{rev}" if rev else "")


@dataclass
class DpgRun:
    """What the DPG step produced, for the metrics table and the report."""

    scores: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)  # key -> (official, corrected)
    expected: set[str] = field(default_factory=set)  # image keys that should be judged
    doc: dict = field(default_factory=dict)  # _dpg.json

    def complete(self, keys) -> bool:
        """Whether every image among ``keys`` that should be judged has been."""
        return all(k in self.scores for k in keys if k in self.expected)


def _crops(rows: list[dict], sets: set[str], n: int) -> tuple[dict[str, int], Counter]:
    """image key -> crop index (rank by seed among the prompt's usable images, < n)."""
    by_prompt: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r["prompt_set"] in sets and not r.get("error") and r.get("image_path"):
            by_prompt[(r["model"], r["prompt_set"], r["prompt_id"])].append(r)
    crop, fewer = {}, Counter()
    for (model, ps, _), rs in by_prompt.items():
        rs.sort(key=lambda r: int(r["seed"]))
        if len(rs) < n:
            fewer[f"{model}/{ps}"] += 1
        for i, r in enumerate(rs[:n]):
            crop[r["key"]] = i
    return crop, fewer


def judge_dpg(cfg: RootConfig, images: Table, summary: StageSummary, judge=None) -> DpgRun | None:
    """Judge every pending DPG-Bench image, then score all answers. None when there is
    nothing to score (no DPG-Bench images, or scoring not configured: the summary says)."""
    from eval.metrics import _open_image  # the same image reader as the other metrics

    d = cfg.eval.metrics.dpg
    sets = set(dpg_prompt_sets(cfg))
    rows = [r for r in images.read().to_pylist() if r["prompt_set"] in sets]
    if not rows:
        return None
    if not d.questions:
        summary.extra["dpg"] = (
            f"not scored: {len(rows)} DPG-Bench images, but eval.metrics.dpg.questions is not set "
            "(make fetch-benchmarks puts dpg_bench.csv in benchmarks/dpg_bench/)"
        )
        return None
    try:
        questions = load_dpg_questions(d.questions)
    except FileNotFoundError:
        raise ConfigError(
            f"eval.metrics.dpg.questions: {d.questions} does not exist (`make fetch-benchmarks` fetches the official "
            "dpg_bench.csv into benchmarks/dpg_bench/)"
        ) from None
    crop, fewer = _crops(rows, sets, d.images_per_prompt)
    answers = Table(dpg_answers_url(cfg), schema=DPG_ANSWERS)
    answers.clean_tmp()
    done = set(answers.read(columns=["key"]).column("key").to_pylist()) if answers.done_shards() else set()
    pending = [r for r in rows if r["key"] in crop and r["key"] not in done]
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in pending:
        groups[(r["prompt_set"], r["prompt_id"])].append(r)
    summary.extra["dpg_images"] = f"{len(crop)} to judge, {len(crop) - len(pending)} already judged"
    if pending:
        judge = judge or load_judge(cfg)
        _judge_groups(groups, questions, judge, d, crop, images, answers, summary, _open_image)
    return _score(cfg, questions, answers, crop, fewer, judge)


def _judge_groups(
    groups: dict[tuple[str, str], list[dict]],
    questions: DpgQuestions,
    judge,
    d,
    crop: dict[str, int],
    images: Table,
    answers: Table,
    summary: StageSummary,
    open_image,
) -> None:
    """Ask every question of each prompt about its pending images; commit whole images."""
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    buffer: list[dict] = []
    n_images, n_shards = 0, 0
    judge_name = _judge_name(judge)

    def flush() -> None:
        nonlocal buffer, n_images, n_shards
        if buffer:
            answers.write_shard(f"{run_id}-{n_shards:05d}", rows_to_table(buffer, DPG_ANSWERS))
            n_shards += 1
        buffer, n_images = [], 0

    total = sum(len(v) for v in groups.values())
    with progress(range(total), total=total, desc="dpg-judge", unit="img") as bar:
        for (ps, pid), group in sorted(groups.items()):
            qs = questions.items.get(pid)
            if not qs:
                summary.reject("dpg_prompt_without_questions", len(group))
                bar.update(len(group))
                continue
            loaded = []
            for r in sorted(group, key=lambda r: (r["model"], int(r["seed"]))):
                try:
                    loaded.append((r, open_image(images, r["image_path"])))
                except Exception as exc:  # noqa: BLE001 - counted per image
                    summary.reject("dpg_image_unreadable")
                    log.warning("DPG: cannot read %s (%s)", r["image_path"], exc)
            for start in range(0, len(loaded), d.batch_size):
                chunk = loaded[start : start + d.batch_size]
                per_image: list[list[dict]] = [[] for _ in chunk]
                failed = [False] * len(chunk)
                for q in qs:
                    asked = d.question_template.format(question=q.question)
                    results = judge.caption([im for _, im in chunk], asked)
                    now = time.time()
                    for j, ((r, _), res) in enumerate(zip(chunk, results, strict=True)):
                        if res.error or res.caption is None:
                            failed[j] = True
                            continue
                        yes, clear = parse_answer(res.caption)
                        if not clear:
                            summary.flag("dpg_unclear_answer (scored as no)")
                        per_image[j].append(
                            {
                                "key": r["key"],
                                "model": r["model"],
                                "prompt_set": ps,
                                "prompt_id": pid,
                                "seed": int(r["seed"]),
                                "crop": crop[r["key"]],
                                "qid": q.qid,
                                "question": asked,
                                "category": q.category,
                                "answer": res.caption,
                                "yes": yes,
                                "clear": clear,
                                "judge": judge_name,
                                "created_at": now,
                            }
                        )
                for j, rows_j in enumerate(per_image):
                    if failed[j]:
                        summary.reject("dpg_judge_error (asked again next run)")
                        continue
                    buffer.extend(rows_j)
                    n_images += 1
                    if n_images >= d.images_per_shard:
                        flush()
                bar.update(len(chunk))
            bar.update(len(group) - len(loaded))
    flush()


def _score(cfg, questions: DpgQuestions, answers: Table, crop: dict[str, int], fewer: Counter, judge) -> DpgRun:
    d = cfg.eval.metrics.dpg
    all_rows = answers.read().to_pylist() if answers.done_shards() else []
    latest: dict[tuple[str, int], dict] = {}
    for r in all_rows:  # one answer per image and question (the newest, should a key ever be judged twice)
        k = (r["key"], int(r["qid"]))
        if k not in latest or r["created_at"] > latest[k]["created_at"]:
            latest[k] = r
    per_image: dict[str, dict] = {}
    for r in latest.values():
        if r["key"] not in crop:  # an image no longer in eval_images (or past images_per_prompt)
            continue
        img = per_image.setdefault(
            r["key"], {"model": r["model"], "ps": r["prompt_set"], "pid": r["prompt_id"], "answers": {}}
        )
        img["answers"][int(r["qid"])] = bool(r["yes"])
    run = DpgRun(expected=set(crop))
    for key, img in per_image.items():
        qs = questions.items.get(img["pid"], [])
        vals = []
        for arithmetic in ARITHMETICS:
            try:
                vals.append(100 * score_item(qs, [img["answers"]], arithmetic, questions.first_row).score)
            except DpgItemFailed:
                vals.append(None)
        run.scores[key] = (vals[0], vals[1])
    results = {}
    by_set: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for key, img in per_image.items():
        by_set[f"{img['model']}/{img['ps']}"][img["pid"]].append((crop[key], img["answers"]))
    unclear = Counter(f"{r['model']}/{r['prompt_set']}" for r in latest.values() if not r["clear"])
    for name, items in sorted(by_set.items()):
        answers_by_item = {pid: [a for _, a in sorted(crops, key=lambda c: c[0])] for pid, crops in items.items()}
        res = {}
        for arithmetic in ARITHMETICS:
            scored, left_out = score_answers(questions, answers_by_item, arithmetic)
            agg = aggregate_items(scored, left_out)
            if scored:
                e = bootstrap_mean(
                    [s.score for s in scored.values()], list(scored), cfg.eval.metrics.bootstrap, 0.95, cfg.project.seed
                )
                agg.update(ci_low=e.low * 100, ci_high=e.high * 100)
            res[arithmetic] = agg
        res["n_images"] = sum(len(c) for c in items.values())
        res["prompts_with_fewer_images"] = fewer.get(name, 0)
        res["unclear_answers"] = unclear.get(name, 0)
        results[name] = res
    judges = sorted({r["judge"] for r in latest.values()})
    run.doc = {
        "judge": ", ".join(judges) or (_judge_name(judge) if judge else "-"),
        "official_judge": "mPLUG-large (damo/mplug_visual-question-answering_coco_large_en, ModelScope)",
        "questions": d.questions,
        "n_questions": questions.n_questions,
        "question_template": d.question_template,
        "images_per_prompt": d.images_per_prompt,
        "note": NOTE.format(n=d.images_per_prompt),
        "results": results,
    }
    return run
