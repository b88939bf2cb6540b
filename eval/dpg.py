"""DPG-Bench scoring: yes/no questions with dependencies, asked of a VQA judge.

DPG-Bench (ELLA, arXiv 2403.05135) scores an image by asking a VQA model the yes/no
questions of its prompt, as written in the official question file ``dpg_bench.csv``
(github.com/TencentQQGYLab/ELLA, ``dpg_bench/``; Apache-2.0). One row per question::

    item_id,text,keywords,proposition_id,dependency,category_broad,category_detailed,tuple,question_natural_language
    partiprompts97,<prompt>,...,2,1,attribute,color,"attribute - color (taxi, yellow)",Is the taxi yellow?

``item_id`` is the prompt file's name (``prompts/<item_id>.txt``), ``proposition_id``
the question id within the prompt, ``dependency`` the parent question ids (``0``: none;
``1,2``: two parents), ``tuple`` the proposition, whose text before ``(`` is the
level-2 category (``attribute - color``) and whose text before ``-`` is the level-1
category (``attribute``).

How the official script (``dpg_bench/compute_dpg_bench.py`` at commit 3c228f1) scores,
reproduced by :func:`score_item` and :func:`aggregate_items` with
``arithmetic="official"``:

- Four images of a prompt are tiled into one 2x2 grid file; the script crops them back
  with the boxes ``(0,0,r,r)``, ``(r,0,2r,r)``, ``(0,r,r,2r)``, ``(r,r,2r,2r)`` (``r`` =
  ``--resolution``, ``--pic-num 4``): top-left, top-right, bottom-left, bottom-right.
  We judge the four lowest-seed images of the prompt directly, in seed order, which
  are the same pixels (:func:`make_grid` / :func:`grid_crops` show the round trip) and
  also works for non-square images.
- Per crop, every question gets 1 if the answer is ``yes``, else 0. Then, in file
  order, a question any of whose parents (ids other than 0) scored 0 is set to 0; the
  scores are changed in place, so a zeroed parent that comes *earlier* in the file
  also zeroes its grandchildren, one that comes later does not. The crop's score is the
  mean over the prompt's questions; the prompt's score the mean over its crops; the
  DPG-Bench score the mean over prompts, x100.
- Category scores are means of per-question scores taken *before* the dependency
  rule, over all prompts, and come from the *last* crop only (the script keeps the
  copy of the last loop iteration); level 1 pools the level-2 lists.
- The first data row of the file is skipped (``if i == 0: continue`` after pandas has
  already consumed the header), so the first prompt loses its first question, and if
  one of its questions depends on that one, the script fails on the prompt (KeyError)
  and leaves it out of every score. A prompt with no questions is left out too.

The last two points are reported upstream as bugs (ELLA issues #60 and #61).
``arithmetic="corrected"`` fixes exactly those two: every question of the file counts,
and category scores pool all crops. Both are computed; the official one is the
number to compare with published DPG-Bench scores.

The judge differs from the official one: the script asks ModelScope's mPLUG-large VQA
model (``damo/mplug_visual-question-answering_coco_large_en``), which answers with one
lowercase word, and counts exactly ``"yes"``. Here the judge is any VLM the captioner
registry loads (``caption.captioners``), asked ``eval.metrics.dpg.question_template``
(by default the question plus "Answer yes or no."), and an answer counts as yes when
its first word is "yes" (case and punctuation ignored; :func:`parse_answer`). Scores
from another judge are comparable with each other, not with published mPLUG numbers.
"""

from __future__ import annotations

import csv
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: The columns the official question file has (and the official script reads).
COLUMNS = (
    "item_id",
    "text",
    "keywords",
    "proposition_id",
    "dependency",
    "category_broad",
    "category_detailed",
    "tuple",
    "question_natural_language",
)
ARITHMETICS = ("official", "corrected")
#: Crop boxes of the official script for tile size ``r``, in its order (first ``pic_num`` used).
GRID_ORDER = ((0, 0), (1, 0), (0, 1), (1, 1))


@dataclass(frozen=True)
class DpgQuestion:
    """One row of the question file."""

    item_id: str
    qid: int
    question: str
    tuple: str
    dependency: tuple[int, ...]
    row: int  # 0-based data row in the file (the official script skips row 0)

    @property
    def category(self) -> str:
        """Level-2 category, as the official script takes it: the tuple up to ``(``."""
        return self.tuple.split("(")[0].strip()

    @property
    def category_l1(self) -> str:
        """Level-1 category: the level-2 one up to ``-``."""
        return self.category.split("-")[0].strip()


@dataclass
class DpgQuestions:
    """A parsed question file: questions per prompt (``item_id``), in file order."""

    path: str
    items: dict[str, list[DpgQuestion]]
    first_row: tuple[str, int] | None  # (item_id, qid) of the file's first data row

    @property
    def n_questions(self) -> int:
        return sum(len(v) for v in self.items.values())


def load_dpg_questions(path: str | Path) -> DpgQuestions:
    """Read ``dpg_bench.csv`` (or a file of ours in its format).

    The file is checked rather than trusted: a missing column, a non-integer id, a
    question id used twice in a prompt, a prompt whose rows are not contiguous (the
    official script would keep only the last block) or a dependency on a question the
    prompt does not have stops with a message naming the line.
    """
    path = Path(path)
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        missing = [
            c
            for c in ("item_id", "proposition_id", "dependency", "tuple", "question_natural_language")
            if c not in (reader.fieldnames or [])
        ]
        if missing:
            raise ValueError(
                f"{path}: not a DPG-Bench question file: columns {missing} missing (have {reader.fieldnames})"
            )
        rows = list(reader)
    items: dict[str, list[DpgQuestion]] = {}
    closed: set[str] = set()
    previous = None
    for i, row in enumerate(rows):
        line = i + 2  # 1-based, after the header
        item = (row["item_id"] or "").strip()
        if not item:
            raise ValueError(f"{path}:{line}: empty item_id")
        try:
            qid = int(str(row["proposition_id"]).strip())
            deps = tuple(int(d.strip()) for d in str(row["dependency"]).split(","))
        except ValueError as exc:
            raise ValueError(f"{path}:{line}: proposition_id and dependency must be integers ({exc})") from None
        if item != previous:
            if item in closed:
                raise ValueError(f"{path}:{line}: the rows of item {item!r} are not contiguous")
            if previous is not None:
                closed.add(previous)
            previous = item
        qs = items.setdefault(item, [])
        if any(q.qid == qid for q in qs):
            raise ValueError(f"{path}:{line}: item {item!r} has question {qid} twice")
        qs.append(DpgQuestion(item, qid, (row["question_natural_language"] or "").strip(), row["tuple"] or "", deps, i))
    for item, qs in items.items():
        ids = {q.qid for q in qs}
        for q in qs:
            dangling = [d for d in q.dependency if d != 0 and d not in ids]
            if dangling:
                raise ValueError(
                    f"{path}:{q.row + 2}: item {item!r} question {q.qid} depends on {dangling}, which it does not have"
                )
    first = (rows[0]["item_id"].strip(), int(rows[0]["proposition_id"])) if rows else None
    return DpgQuestions(str(path), items, first)


def parse_answer(text: str | None) -> tuple[bool, bool]:
    """``(yes, clear)`` from a judge's answer: yes when the first word is "yes"; clear when
    it is "yes" or "no". An unclear answer scores 0, as anything but "yes" does officially."""
    words = re.findall(r"[a-z]+", (text or "").lower())
    first = words[0] if words else ""
    return first == "yes", first in ("yes", "no")


class DpgItemFailed(Exception):
    """The official script would fail on this prompt (and leave it out); ``reason`` says why."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class ItemScore:
    """One prompt's DPG score (0-1), its crops' scores, and per-question values by category."""

    score: float
    crop_scores: list[float]
    categories: dict[str, list[float]] = field(default_factory=dict)


def _questions_for(questions: list[DpgQuestion], arithmetic: str, first_row) -> list[DpgQuestion]:
    if arithmetic not in ARITHMETICS:
        raise ValueError(f"arithmetic must be one of {ARITHMETICS}, got {arithmetic!r}")
    if arithmetic == "official":
        return [q for q in questions if (q.item_id, q.qid) != first_row]
    return list(questions)


def crop_scores_after_dependencies(questions: list[DpgQuestion], answers: dict[int, bool]) -> dict[int, float]:
    """Per-question scores of one crop after the dependency rule (in file order, in place)."""
    scores = {q.qid: float(bool(answers[q.qid])) for q in questions}
    for q in questions:
        for parent in q.dependency:
            if parent == 0:
                continue
            if parent not in scores:
                raise DpgItemFailed("missing_parent", f"{q.item_id} question {q.qid} depends on {parent}")
            if scores[parent] == 0:
                scores[q.qid] = 0.0
                break
    return scores


def score_item(
    questions: list[DpgQuestion],
    crops: Sequence[dict[int, bool]],
    arithmetic: str = "official",
    first_row: tuple[str, int] | None = None,
) -> ItemScore:
    """Score one prompt from the answers of each crop (``{qid: said yes}``), in crop order.

    ``official`` reproduces the script exactly (first data row skipped, categories from
    the last crop); ``corrected`` counts every question and pools every crop. Raises
    :class:`DpgItemFailed` where the official script would fail on the prompt.
    """
    qs = _questions_for(questions, arithmetic, first_row)
    if not qs:
        raise DpgItemFailed("no_questions")
    if not crops:
        raise DpgItemFailed("no_images")
    crop_scores, categories = [], defaultdict(list)
    for i, answers in enumerate(crops):
        missing = [q.qid for q in qs if q.qid not in answers]
        if missing:
            raise DpgItemFailed("unanswered", f"crop {i} has no answer for questions {missing}")
        scores = crop_scores_after_dependencies(qs, answers)
        crop_scores.append(sum(scores.values()) / len(scores))
        if arithmetic == "corrected" or i == len(crops) - 1:
            for q in qs:  # category values: the answers before the dependency rule
                categories[q.category].append(float(bool(answers[q.qid])))
    return ItemScore(sum(crop_scores) / len(crop_scores), crop_scores, dict(categories))


def aggregate_items(scores: dict[str, ItemScore], left_out: Counter | None = None) -> dict:
    """The DPG-Bench score (x100) over prompts, level-1 and level-2 category scores (x100)."""
    l2: dict[str, list[float]] = defaultdict(list)
    for item in scores.values():
        for cat, values in item.categories.items():
            l2[cat].extend(values)
    l1: dict[str, list[float]] = defaultdict(list)
    for cat in sorted(l2):
        l1[cat.split("-")[0].strip()].extend(l2[cat])
    values = [s.score for s in scores.values()]
    return {
        "score": float(np.mean(values) * 100) if values else None,
        "n_prompts": len(values),
        "l1": {k: float(np.mean(v) * 100) for k, v in sorted(l1.items())},
        "l2": {k: float(np.mean(v) * 100) for k, v in sorted(l2.items())},
        "left_out": dict(left_out or {}),
    }


def score_answers(
    questions: DpgQuestions, answers: dict[str, list[dict[int, bool]]], arithmetic: str
) -> tuple[dict[str, ItemScore], Counter]:
    """Score every prompt that has answers (``item_id -> [crop answers]``); prompts the
    official script would fail on are left out and counted by reason."""
    out, left_out = {}, Counter()
    for item_id, crops in sorted(answers.items()):
        qs = questions.items.get(item_id)
        if not qs:
            left_out["no_questions"] += 1
            continue
        try:
            out[item_id] = score_item(qs, crops, arithmetic, questions.first_row)
        except DpgItemFailed as exc:
            left_out[exc.reason] += 1
    return out, left_out


# --------------------------------------------------------------------------- the 2x2 grid
def make_grid(images: Sequence, tile: int | None = None):
    """Tile up to four images into the official 2x2 grid (``tile`` x ``tile`` each, default the
    first image's width), in the script's crop order. For scoring elsewhere or looking at."""
    from PIL import Image

    tile = tile or images[0].width
    grid = Image.new("RGB", (2 * tile, 2 * tile))
    for im, (cx, cy) in zip(images, GRID_ORDER, strict=False):
        grid.paste(im.convert("RGB").resize((tile, tile)), (cx * tile, cy * tile))
    return grid


def grid_crops(grid, resolution: int, pic_num: int = 4) -> list:
    """The crops the official script takes from a grid image: boxes of side ``resolution``
    in the order top-left, top-right, bottom-left, bottom-right, the first ``pic_num``."""
    return [
        grid.crop((cx * resolution, cy * resolution, (cx + 1) * resolution, (cy + 1) * resolution))
        for cx, cy in GRID_ORDER[:pic_num]
    ]
