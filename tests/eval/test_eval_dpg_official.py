"""Our DPG-Bench arithmetic equals the official script's.

The official scorer is ``dpg_bench/compute_dpg_bench.py`` in github.com/TencentQQGYLab/ELLA
(commit 3c228f1dc6c4d3cad0a47493816151a419f14db3, Apache-2.0). Its VQA model (mPLUG
through ModelScope) is replaced by a lookup in a made-up answers table
(``fixtures/dpg_official/answers.csv``); everything else (reading the question file,
cropping the 2x2 grids, the dependency rule, per-image, category and overall scores)
is the script's own code, run through its ``main()``.

- ``test_matches_recorded_official_output`` always runs: ours against the script's
  output recorded in ``fixtures/dpg_official/official_output.json``.
- ``test_matches_official_script_live`` runs the script itself when
  ``PARADIFFUSION_DPG_REFERENCE`` names a copy of ``compute_dpg_bench.py`` (it needs
  torch, accelerate, pandas; not ModelScope) and also checks that the recorded output is
  what the script prints. Skipped otherwise.

Re-record (after changing the fixtures)::

    PARADIFFUSION_DPG_REFERENCE=/path/to/ELLA/dpg_bench/compute_dpg_bench.py \\
        python tests/eval/test_eval_dpg_official.py --record
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from eval.dpg import aggregate_items, load_dpg_questions, make_grid, score_answers

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "dpg_official"
RECORDED = FIXTURES / "official_output.json"
#: question file -> what it exercises
CASES = {
    "questions.csv": "first row skipped (the prompt survives), cascades, a parent after its child, two parents, "
    "a prompt without questions",
    "questions_first_fails.csv": "the first prompt's first question is a parent: the script fails on that prompt",
}
RESOLUTION = 16
PIC_NUM = 4


def _answers() -> dict[tuple[str, int, int], str]:
    with open(FIXTURES / "answers.csv", newline="") as f:
        return {(r["item_id"], int(r["crop"]), int(r["qid"])): r["answer"] for r in csv.DictReader(f)}


def _items(answers: dict) -> list[str]:
    return sorted({k[0] for k in answers})


def _colour(item_index: int, crop: int) -> tuple[int, int, int]:
    return (10 + 20 * item_index, 10 + 60 * crop, 200)


def _write_grids(folder: Path, items: list[str]) -> None:
    """One 2x2 grid PNG per prompt, built with our make_grid; each tile's colour names its
    prompt and crop, which is how the stand-in VQA model knows what it is looking at."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, item in enumerate(items):
        tiles = [Image.new("RGB", (RESOLUTION, RESOLUTION), _colour(i, c)) for c in range(4)]
        make_grid(tiles).save(folder / f"{item}.png")


def _parse_results(text: str) -> dict:
    """The script's result file: one line per image, then the category and overall scores."""
    out: dict = {"per_image": {}, "l1": {}, "l2": {}, "score": None}
    section = None
    for line in text.splitlines():
        if line.endswith(".png") or ".png, " in line:
            path, *values = line.split(", ")
            out["per_image"][Path(path).stem] = [float(v) for v in values]
        elif line.startswith("L1 category scores"):
            section = "l1"
        elif line.startswith("L2 category scores"):
            section = "l2"
        elif line.startswith("\t") and section:
            name, value = line.strip().rsplit(": ", 1)
            out[section][name] = float(value)
        elif line.startswith("DPG-Bench score: "):
            out["score"] = float(line.split(": ", 1)[1])
            section = None
        elif line.startswith(("Image path", "Save results", "Model:")):
            section = None
    return out


def run_official(script: Path, questions_csv: Path, tmp: Path, monkeypatch) -> dict:
    """Run the official script's main() on grids of the made-up answers."""
    import torch

    spec = importlib.util.spec_from_file_location("compute_dpg_bench_reference", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    answers = _answers()
    items = _items(answers)
    qid_of = {}
    with open(questions_csv, newline="") as f:
        for r in csv.DictReader(f):
            qid_of[(r["item_id"], r["question_natural_language"])] = int(r["proposition_id"])

    class LookupVQA(torch.nn.Module):
        """Stands in for mPLUG: answers from the table, for the prompt and crop the tile colour names."""

        def __init__(self, ckpt=None, device=None):
            super().__init__()

        def vqa(self, image, question):
            r, g, _ = image.convert("RGB").getpixel((RESOLUTION // 2, RESOLUTION // 2))
            item, crop = items[(r - 10) // 20], (g - 10) // 60
            return answers[(item, crop, qid_of[(item, question)])]

    grids = tmp / "grids" / questions_csv.stem
    _write_grids(grids, items)
    res = tmp / "out" / f"{questions_csv.stem}.txt"
    res.parent.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(mod, "MPLUG", LookupVQA)
    monkeypatch.setattr(mod.time, "sleep", lambda s: None)
    argv = ["compute_dpg_bench.py", "--image-root-path", str(grids), "--resolution", str(RESOLUTION)]
    argv += ["--csv", str(questions_csv), "--res-path", str(res), "--pic-num", str(PIC_NUM), "--vqa-model", "mplug"]
    monkeypatch.setattr(sys, "argv", argv)
    mod.main()
    return _parse_results(res.read_text())


def ours(questions_csv: Path) -> dict:
    """The same numbers from eval.dpg (official arithmetic) on the same answers."""
    answers = _answers()
    questions = load_dpg_questions(questions_csv)
    crops = {
        item: [
            {qid: a == "yes" for (it, c, qid), a in answers.items() if it == item and c == crop}
            for crop in range(PIC_NUM)
        ]
        for item in _items(answers)
    }
    scored, left_out = score_answers(questions, crops, "official")
    agg = aggregate_items(scored, left_out)
    return {
        "per_image": {item: s.crop_scores + [s.score] for item, s in scored.items()},
        "l1": agg["l1"],
        "l2": agg["l2"],
        "score": agg["score"],
        "left_out": agg["left_out"],
    }


def _assert_same(got: dict, official: dict) -> None:
    assert sorted(got["per_image"]) == sorted(official["per_image"])
    for item, values in official["per_image"].items():
        assert got["per_image"][item] == pytest.approx(values, abs=1e-12), item
    assert got["l1"] == pytest.approx(official["l1"], abs=1e-9)
    assert got["l2"] == pytest.approx(official["l2"], abs=1e-9)
    assert got["score"] == pytest.approx(official["score"], abs=1e-9)


def test_matches_recorded_official_output():
    recorded = json.loads(RECORDED.read_text())
    assert sorted(recorded["cases"]) == sorted(CASES)
    for name in CASES:
        got = ours(FIXTURES / name)
        _assert_same(got, recorded["cases"][name])
    main, fails = ours(FIXTURES / "questions.csv"), ours(FIXTURES / "questions_first_fails.csv")
    # what the fixtures exercise: the script leaves out a prompt without questions, and the first
    # prompt when one of its questions depends on the skipped first row
    assert main["left_out"] == {"no_questions": 2} and "item_a" in main["per_image"]
    assert fails["left_out"] == {"missing_parent": 1, "no_questions": 4} and "item_z" not in fails["per_image"]
    assert set(main["l1"]) == {"entity", "attribute", "relation", "global", "other"}


def test_matches_official_script_live(tmp_path, monkeypatch):
    ref = os.environ.get("PARADIFFUSION_DPG_REFERENCE")
    if not ref or not Path(ref).is_file():
        pytest.skip(
            "the official DPG-Bench scorer is not here: set PARADIFFUSION_DPG_REFERENCE to a copy of "
            "ELLA's dpg_bench/compute_dpg_bench.py (commit 3c228f1)"
        )
    pytest.importorskip("accelerate")
    pytest.importorskip("pandas")
    recorded = json.loads(RECORDED.read_text())
    for name in CASES:
        official = run_official(Path(ref), FIXTURES / name, tmp_path, monkeypatch)
        _assert_same(ours(FIXTURES / name), official)
        _assert_same(recorded["cases"][name], official)  # the recorded fixture is what the script prints


def _record() -> None:  # pragma: no cover - run by hand, see the module docstring
    ref = Path(os.environ["PARADIFFUSION_DPG_REFERENCE"])
    import tempfile

    mp = pytest.MonkeyPatch()
    out = {
        "source": "github.com/TencentQQGYLab/ELLA dpg_bench/compute_dpg_bench.py "
        "@ 3c228f1dc6c4d3cad0a47493816151a419f14db3 (Apache-2.0), run with a lookup VQA on answers.csv",
        "resolution": RESOLUTION,
        "pic_num": PIC_NUM,
        "cases": {},
    }
    with tempfile.TemporaryDirectory() as d:
        for name in CASES:
            out["cases"][name] = run_official(ref, FIXTURES / name, Path(d), mp)
    mp.undo()
    RECORDED.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"recorded {RECORDED}")


if __name__ == "__main__" and "--record" in sys.argv:
    _record()
