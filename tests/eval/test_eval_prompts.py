"""Prompt sets: row counts, ids and categories of the three published files."""

from __future__ import annotations

from collections import Counter

import pytest

from eval.prompts import VILG_CATEGORIES, load_dpg_bench, load_paraprompts, load_prompt_set, load_vilg300


def test_vilg300(benchmarks_dir):
    prompts, report = load_vilg300(benchmarks_dir / "ViLG-300.csv")
    assert len(prompts) == 300 and report.rows == 300 and not report.skipped and not report.notes
    cats = Counter(p.category for p in prompts)
    assert set(cats) == set(VILG_CATEGORIES.values())  # every Chinese category has an English name
    assert cats["Reddit"] == 36 and cats["Colors"] == 22
    assert prompts[0].text == "A red colored car." and prompts[0].prompt_id == "vilg-001"
    assert Counter(p.extra["source"] for p in prompts) == {"DrawBench": 150, "ERNIE-VILG": 150}
    assert not prompts[0].text.startswith("\ufeff")
    assert all("\n" not in p.text for p in prompts)  # quoted line breaks read as one prompt


def test_paraprompts(benchmarks_dir):
    prompts, report = load_paraprompts(benchmarks_dir / "ParaPrompts_400.csv")
    assert len(prompts) == 399 and len({p.prompt_id for p in prompts}) == 399
    assert set(Counter(p.category for p in prompts)) == {
        "Human",
        "Animals",
        "Food",
        "Vehicles",
        "Indoor Scenes",
        "Outdoor Scenes",
        "Arts",
        "Others",
    }
    words = sorted(len(p.text.split()) for p in prompts)
    assert words[0] >= 50 and words[-1] <= 300


def test_dpg_bench(benchmarks_dir):
    prompts, report = load_dpg_bench(benchmarks_dir / "dpg_bench" / "prompts")
    assert len(prompts) == 1065 and report.rows == 1065
    assert [p.prompt_id for p in prompts[:3]] == ["0", "1", "2"]
    cats = Counter(p.category for p in prompts)
    assert cats["partiprompts"] == 324 and cats["COCOval"] == 100


def test_sample_prompt_files_read_like_the_published_ones():
    """The bundled sample files (always present) go through the same readers."""
    from eval_prompt_files import SAMPLE_PROMPTS

    vilg, report = load_vilg300(SAMPLE_PROMPTS / "vilg_sample.csv")
    assert [p.category for p in vilg] == ["Colors", "Counting", "Positional", "Styles"] and not report.skipped
    assert not vilg[0].text.startswith("\ufeff") and all("\n" not in p.text for p in vilg)
    para, _ = load_paraprompts(SAMPLE_PROMPTS / "paraprompts_sample.csv")
    assert len(para) == 4 and all(len(p.text.split()) > 70 for p in para)
    dpg, _ = load_dpg_bench(SAMPLE_PROMPTS / "dpg" / "prompts")
    assert len(dpg) == 2


def test_bad_rows_are_counted_not_dropped_silently(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text(
        'Image,Prompt,Category,Prompt_Chinese\na.JPEG,"two\nlines",Food,x\nb.JPEG,,Food,y\na.JPEG,dup,Arts,z\n'
    )
    prompts, report = load_paraprompts(f)
    assert [p.text for p in prompts] == ["two lines"]
    assert report.skipped == {"empty_prompt": 1, "duplicate_id": 1}
    with pytest.raises(FileNotFoundError, match="published"):
        load_prompt_set("x", "vilg300", tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("A,B\n1,2\n")
    with pytest.raises(ValueError, match="expected columns"):
        load_vilg300(bad)
