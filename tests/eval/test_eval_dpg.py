"""DPG-Bench scoring: the question file reader, the arithmetic on hand-worked cases, the
2x2 grid, and the judge step (tiny VLM through the captioner registry; resume per image)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from eval_prompt_files import SAMPLE_PROMPTS, trimmed_dpg_questions
from PIL import Image

from eval.dpg import (
    DpgItemFailed,
    DpgQuestion,
    grid_crops,
    load_dpg_questions,
    make_grid,
    parse_answer,
    score_item,
)
from eval.schemas import EVAL_IMAGES
from paradiffusion.stage import StageSummary
from paradiffusion.storage import Table, rows_to_table

QUESTIONS = SAMPLE_PROMPTS / "dpg" / "dpg_bench_sample.csv"
HEADER = (
    "item_id,text,keywords,proposition_id,dependency,category_broad,category_detailed,tuple,question_natural_language\n"
)


def _q(qid: int, deps=(0,), tup: str = "entity - whole (x)", item: str = "p") -> DpgQuestion:
    return DpgQuestion(item, qid, f"question {qid}?", tup, tuple(deps), qid - 1)


def test_reader_reads_the_official_format():
    q = load_dpg_questions(QUESTIONS)
    assert sorted(q.items) == ["sample_0", "sample_1"] and q.n_questions == 17
    assert q.first_row == ("sample_0", 1)
    rel = next(x for x in q.items["sample_0"] if x.qid == 8)
    assert rel.dependency == (1, 2) and rel.category == "relation - spatial" and rel.category_l1 == "relation"
    assert [x.qid for x in q.items["sample_1"]] == list(range(1, 9))


@pytest.mark.parametrize(
    "body, message",
    [
        ("a,t,k,1,0,entity,whole,entity - whole (x),Q?\na,t,k,1,0,entity,whole,entity - whole (y),Q2?\n", "twice"),
        (
            "a,t,k,1,0,e,w,entity - whole (x),Q?\nb,t,k,1,0,e,w,entity - whole (y),Q?\na,t,k,2,0,e,w,e (z),Q?\n",
            "contiguous",
        ),
        (
            "a,t,k,1,0,e,w,entity - whole (x),Q?\na,t,k,2,3,e,w,attribute - color (x),Q2?\n",
            r"q.csv:3: item .a. question 2 depends on \[3\]",
        ),
        ("a,t,k,one,0,e,w,entity - whole (x),Q?\n", "integers"),
        ("a,t,k,1,x,e,w,entity - whole (x),Q?\n", "integers"),
    ],
)
def test_reader_refuses_broken_files_with_the_line(tmp_path, body, message):
    f = tmp_path / "q.csv"
    f.write_text(HEADER + body)
    with pytest.raises(ValueError, match=message):
        load_dpg_questions(f)
    f.write_text("item_id,question\na,b\n")
    with pytest.raises(ValueError, match="not a DPG-Bench question file"):
        load_dpg_questions(f)


def test_parse_answer():
    assert parse_answer("yes") == (True, True) and parse_answer("Yes, there is a cat.") == (True, True)
    assert parse_answer(" NO.") == (False, True) and parse_answer("no") == (False, True)
    assert parse_answer("There is a cat") == (False, False) and parse_answer("") == (False, False)
    assert parse_answer(None) == (False, False) and parse_answer("yesterday") == (False, False)


def test_dependency_rule_in_file_order():
    # 1 <- 2 <- 3 (a cascade); 7 <- 5 <- 4 with 4 before 5 in the file; 6 <- (1, 4)
    qs = [_q(1), _q(2, (1,)), _q(3, (2,)), _q(4, (5,)), _q(5, (7,)), _q(6, (1, 4)), _q(7)]
    crop = {1: False, 2: True, 3: True, 4: True, 5: True, 6: True, 7: False}
    # 2 is zeroed by 1, and 3 through 2 (scores change in place); 4 keeps its 1 because its parent 5 is
    # zeroed (by 7) only after 4 was checked; 6: parent 1 is 0 -> 0
    s = score_item(qs, [crop], "corrected")
    assert s.score == pytest.approx(1 / 7)
    crop2 = {**crop, 1: True}  # 1, 2, 3 stand; 4 stands (5 zeroed later); 5 zeroed by 7; 6 has 1 and 4
    assert score_item(qs, [crop2], "corrected").score == pytest.approx(5 / 7)


def test_official_and_corrected_arithmetic_differ_where_the_script_does():
    qs = [_q(1), _q(2, (0,), "attribute - color (x, red)"), _q(3, (2,), "relation - spatial (x, y, on)")]
    crops = [{1: True, 2: True, 3: True}, {1: False, 2: False, 3: True}]
    first = ("p", 1)  # this prompt holds the file's first row: the script skips question 1
    off = score_item(qs, crops, "official", first)
    cor = score_item(qs, crops, "corrected", first)
    assert off.crop_scores == [1.0, 0.0] and off.score == 0.5  # questions 2 and 3 only
    assert cor.crop_scores == pytest.approx([1.0, 0.0]) and cor.score == 0.5  # 3 is zeroed by 2 in crop 2
    # categories: answers before the dependency rule; official from the last crop only
    assert off.categories == {"attribute - color": [0.0], "relation - spatial": [1.0]}
    assert cor.categories == {
        "entity - whole": [1.0, 0.0],
        "attribute - color": [1.0, 0.0],
        "relation - spatial": [1.0, 1.0],
    }
    # a question depending on the skipped first row: the script fails on the prompt
    qs_dep = [_q(1), _q(2, (1,))]
    with pytest.raises(DpgItemFailed) as err:
        score_item(qs_dep, [{1: True, 2: True}], "official", first)
    assert err.value.reason == "missing_parent"
    assert score_item(qs_dep, [{1: True, 2: True}], "corrected", first).score == 1.0
    with pytest.raises(DpgItemFailed, match="unanswered"):
        score_item(qs, [{1: True}], "corrected")


def test_grid_round_trip_matches_the_official_crop_boxes():
    rng = np.random.default_rng(0)
    tiles = [Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)) for _ in range(4)]
    grid = make_grid(tiles)
    assert grid.size == (48, 48)
    crops = grid_crops(grid, 24)
    assert [c.tobytes() for c in crops] == [t.tobytes() for t in tiles]  # TL, TR, BL, BR = image 0, 1, 2, 3
    assert grid.getpixel((30, 5)) == tiles[1].getpixel((6, 5)) and grid.getpixel((5, 30)) == tiles[2].getpixel((5, 6))
    assert len(grid_crops(grid, 24, pic_num=1)) == 1


# --------------------------------------------------------------------------- the judge step
def _dpg_images(root: Path, models=("alpha", "beta"), seeds=(0, 1, 2, 3, 4)) -> Table:
    """An eval_images table for the two sample DPG prompts (sample_0, sample_1)."""
    table = Table(str(root), schema=EVAL_IMAGES)
    rows, rng = [], np.random.default_rng(1)
    for m in models:
        for pid in ("sample_0", "sample_1"):
            for s in seeds:
                rel = f"png/{m}/dpg/{pid}_s{s}.png"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / rel)
                rows.append(
                    {
                        "key": f"{m}/dpg/{pid}/{s}",
                        "model": m,
                        "prompt_set": "dpg",
                        "prompt_id": pid,
                        "category": "sample",
                        "prompt": (SAMPLE_PROMPTS / "dpg" / "prompts" / f"{pid}.txt").read_text(),
                        "seed": s,
                        "image_path": rel,
                        "width": 32,
                        "height": 32,
                        "error": None,
                    }
                )
    table.write_shard("dpg", rows_to_table(rows, EVAL_IMAGES), meta={"prompt_set": "dpg"})
    return table


def _config(
    tmp_path: Path,
    judge_dir: str | None = None,
    images_per_shard: int = 2,
    judge: str = "tiny",
    questions: Path = QUESTIONS,
):
    from pipelines.config import load_config

    doc = {
        "project": {"data_root": str(tmp_path / "data")},
        "caption": {
            "captioner": "tiny",
            "captioners": {
                "tiny": {"type": "transformers", "model": judge_dir or "none", "dtype": "float32", "device": "cpu"}
            },
        },
        "eval": {
            "prompt_sets": {"dpg": {"kind": "dpg_bench", "path": str(SAMPLE_PROMPTS / "dpg" / "prompts")}},
            "metrics": {
                "dpg": {
                    "questions": str(questions),
                    "judge": judge,
                    "images_per_shard": images_per_shard,
                    "max_new_tokens": 3,
                    "batch_size": 3,
                }
            },
        },
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(doc))
    return load_config([str(f)])


class Scripted:
    """A judge that answers by rule, with the Captioner interface (caption(images, prompt))."""

    model_id, revision = "scripted", None

    def __init__(self, rule, fail_after: int | None = None):
        self.rule, self.calls, self.fail_after = rule, [], fail_after

    def caption(self, images, prompt):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls.append((len(images), prompt))
        return [self.rule(im, prompt) for im in images]


def test_judge_step_scores_and_resumes_per_image(tmp_path):
    from captioning.captioners import CaptionResult
    from eval.dpg_judge import judge_dpg
    from eval.paths import dpg_answers_url

    images = _dpg_images(tmp_path / "data" / "eval" / "images")
    cfg = _config(tmp_path, images_per_shard=2)

    def rule(im, prompt):  # "yes" to every question but colour ones; one unclear answer kind
        if "yellow" in prompt or "blue" in prompt:
            return CaptionResult("No.")
        if "wet" in prompt:
            return CaptionResult("The street looks damp")
        return CaptionResult("Yes, it is.")

    # killed in the second batch of the first prompt: the first batch's 3 images are judged, 2 of them committed
    killed = Scripted(rule, fail_after=12)
    with pytest.raises(KeyboardInterrupt):
        judge_dpg(cfg, images, StageSummary("t"), judge=killed)
    answers = Table(dpg_answers_url(cfg))
    assert len(answers.done_shards()) == 1 and len({r["key"] for r in answers.read().to_pylist()}) == 2
    assert all(n <= 3 and p.endswith("Answer yes or no.") for n, p in killed.calls)  # batch_size, template
    judge = Scripted(rule)
    summary = StageSummary("t")
    run = judge_dpg(cfg, images, summary, judge=judge)
    rows = answers.read().to_pylist()
    # 2 models x 2 prompts x 4 lowest seeds (seed 4 is past images_per_prompt), every question once
    assert len({r["key"] for r in rows}) == 16 and len(rows) == 8 * 9 + 8 * 8
    asked_q1 = sum(n for n, p in judge.calls if p.startswith("Is there a taxi?"))
    assert asked_q1 == 6  # the 2 images committed before the kill are not asked again
    assert {r["crop"] for r in rows if r["key"].endswith("/0")} == {0} and max(r["crop"] for r in rows) == 3
    assert len(answers.done_shards()) == 8  # every 2 images, a committed shard
    assert summary.flagged["dpg_unclear_answer (scored as no)"] == 6  # this run's: "wet" for 6 sample_0 images
    assert run.doc["results"]["alpha/dpg"]["unclear_answers"] == 4
    # sample_0 (first rows of the file): question 1 skipped and 5 depends on it -> the script leaves it out
    off = run.doc["results"]["alpha/dpg"]["official"]
    assert off["n_prompts"] == 1 and off["left_out"] == {"missing_parent": 1}
    # sample_1: 8 questions, 4 (blue) no -> 7/8 for every image
    assert off["score"] == pytest.approx(100 * 7 / 8)
    cor = run.doc["results"]["alpha/dpg"]["corrected"]
    # sample_0: 9 questions; 5 (yellow) no, 7 (wet) unclear -> no: 7/9
    assert cor["n_prompts"] == 2 and cor["score"] == pytest.approx(100 * (7 / 9 + 7 / 8) / 2)
    assert cor["l1"]["attribute"] == pytest.approx(100 * 3 / 6) and cor["l2"]["attribute - color"] == pytest.approx(
        100 / 3
    )
    assert run.scores["alpha/dpg/sample_1/2"] == pytest.approx((87.5, 87.5))
    assert run.scores["beta/dpg/sample_0/0"][0] is None and run.scores["beta/dpg/sample_0/0"][1] == pytest.approx(
        700 / 9
    )
    assert "alpha/dpg/sample_0/4" not in run.scores and run.complete(["alpha/dpg/sample_0/4"])
    # a rerun judges nothing: every image was committed
    again = judge_dpg(cfg, images, StageSummary("t"), judge=Scripted(rule, fail_after=0))
    assert again.doc["results"] == run.doc["results"] and len(answers.read()) == len(rows)


def test_judge_errors_are_counted_and_asked_again(tmp_path):
    from captioning.captioners import CaptionResult
    from eval.dpg_judge import judge_dpg
    from eval.paths import dpg_answers_url

    images = _dpg_images(tmp_path / "data" / "eval" / "images", models=("alpha",), seeds=(0,))
    cfg = _config(tmp_path, images_per_shard=1)
    flaky = Scripted(
        lambda im, p: (
            CaptionResult(None, finish_reason="error", error="CUDA OOM") if "mugs" in p else CaptionResult("yes")
        )
    )
    summary = StageSummary("t")
    run = judge_dpg(cfg, images, summary, judge=flaky)
    assert summary.rejected["dpg_judge_error (asked again next run)"] == 1
    assert set(run.scores) == {"alpha/dpg/sample_0/0"} and not run.complete(["alpha/dpg/sample_1/0"])
    good = Scripted(lambda im, p: CaptionResult("yes"))
    run = judge_dpg(cfg, images, StageSummary("t"), judge=good)
    assert set(run.scores) == {"alpha/dpg/sample_0/0", "alpha/dpg/sample_1/0"}
    assert len(good.calls) == 8 and not any("taxi" in p for _, p in good.calls)  # only sample_1, again
    assert len(Table(dpg_answers_url(cfg)).read()) == 9 + 8


def test_judge_step_with_the_tiny_vlm(tmp_path, tiny_vlm):
    """The real path: the judge is loaded by name through captioning's registry (a tiny random LLaVA)."""
    from eval.dpg_judge import judge_dpg
    from eval.paths import dpg_answers_url
    from paradiffusion.config import ConfigError

    images = _dpg_images(tmp_path / "data" / "eval" / "images", models=("alpha",), seeds=(0, 1))
    questions = trimmed_dpg_questions(tmp_path)  # 3 questions per prompt: 6 judge calls
    cfg = _config(tmp_path, judge_dir=tiny_vlm, questions=questions)
    summary = StageSummary("t")
    run = judge_dpg(cfg, images, summary)
    rows = Table(dpg_answers_url(cfg)).read().to_pylist()
    assert len(rows) == 2 * 3 + 2 * 3 and all(r["judge"] == tiny_vlm for r in rows)
    assert all(isinstance(r["answer"], str) and r["answer"] for r in rows)  # random words: it never says yes
    assert summary.flagged["dpg_unclear_answer (scored as no)"] == sum(not r["clear"] for r in rows)
    assert run.doc["results"]["alpha/dpg"]["corrected"]["n_prompts"] == 2
    doc = json.dumps(run.doc)
    assert "mPLUG" in doc and "tiny_vlm" in run.doc["judge"]
    bad = _config(tmp_path / "b", judge="missing")
    with pytest.raises(ConfigError, match="not in caption.captioners"):
        judge_dpg(
            bad, _dpg_images(tmp_path / "b" / "data" / "eval" / "images", models=("a",), seeds=(0,)), StageSummary("t")
        )
