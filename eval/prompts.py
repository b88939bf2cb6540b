"""The evaluation prompt sets, each prompt with a stable id and its category.

=================  ===================================================  ======  ==========================
set                published at                                          rows    category
=================  ===================================================  ======  ==========================
ViLG-300           github.com/PaddlePaddle/ERNIE,                        300     ``类别`` mapped to English
                   ``Research/ERNIE-ViLG2/data/ViLG-300.csv``                     (:data:`VILG_CATEGORIES`)
ParaPrompts-400    github.com/weijiawu/ParaDiffusion,                    399     ``Category``
                   ``ParaPrompts-400/ParaPrompts_400.csv``
DPG-Bench          github.com/TencentQQGYLab/ELLA, ``dpg_bench/prompts``  1065    source in the file name
=================  ===================================================  ======  ==========================

A row that cannot be used (empty prompt, duplicate id) is not dropped silently: it is
counted by reason in the :class:`LoadReport` the readers return.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

#: ViLG-300's Chinese categories (column ``类别``) and their English names. The DrawBench
#: ones use DrawBench's own names; the ERNIE-ViLG ones are translated.
VILG_CATEGORIES: dict[str, str] = {
    "颜色": "Colors",
    "计数": "Counting",
    "位置": "Positional",
    "描述": "Descriptions",
    "矛盾": "Conflicting",
    "DALL-E图像生成器": "DALL-E",
    "加里·马库斯等人。": "Gary Marcus et al.",
    "Reddit论坛": "Reddit",
    "反事实": "Counterfactual",
    "地理类": "Geography",
    "单物+属性描述": "Single object + attributes",
    "多物+属性描述+关系描述": "Multiple objects + attributes + relations",
    "拟人化动物/卡通形象": "Anthropomorphic animals / cartoon characters",
    "不同视角": "Viewpoints",
    "不同风格": "Styles",
    "不同时间/场景": "Times / scenes",
}


@dataclass(frozen=True)
class Prompt:
    """One evaluation prompt."""

    prompt_set: str
    prompt_id: str
    text: str
    category: str
    extra: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass
class LoadReport:
    """What a reader saw: rows read, prompts kept, rows skipped by reason."""

    path: str
    rows: int = 0
    skipped: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)


def _read_csv(path: Path) -> list[dict[str, str]]:
    # utf-8-sig drops ViLG-300's byte-order mark; the csv module handles quoted line breaks.
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


def _clean(text: str | None) -> str:
    return re.sub(r"\s+", " ", (text or "")).strip()


def _finish(name: str, items: list[tuple[str, str, str, dict]], report: LoadReport, limit: int | None) -> list[Prompt]:
    out: list[Prompt] = []
    seen: set[str] = set()
    for pid, text, category, extra in items:
        if not text:
            report.skipped["empty_prompt"] += 1
            continue
        if pid in seen:
            report.skipped["duplicate_id"] += 1
            continue
        seen.add(pid)
        out.append(Prompt(name, pid, text, category, extra))
    return out[:limit] if limit else out


def load_vilg300(path: str | Path, name: str = "vilg300", limit: int | None = None) -> tuple[list[Prompt], LoadReport]:
    """ViLG-300: header ``Prompt,文本,类别,来源``; ids are ``vilg-NNN`` by row (1-based)."""
    path = Path(path)
    report = LoadReport(str(path))
    rows = _read_csv(path)
    report.rows = len(rows)
    need = {"Prompt", "类别"}
    if rows and not need <= set(rows[0]):
        raise ValueError(f"{path}: expected columns {sorted(need)}, found {sorted(rows[0])}")
    items = []
    unmapped: Counter = Counter()
    for i, row in enumerate(rows, 1):
        raw = _clean(row.get("类别"))
        category = VILG_CATEGORIES.get(raw)
        if category is None:
            unmapped[raw] += 1
            category = raw or "unknown"
        items.append(
            (
                f"vilg-{i:03d}",
                _clean(row.get("Prompt")),
                category,
                {"text_zh": _clean(row.get("文本")), "source": _clean(row.get("来源")), "category_zh": raw},
            )
        )
    if unmapped:
        report.notes.append(f"categories without an English name (kept as they are): {dict(unmapped)}")
    return _finish(name, items, report, limit), report


def load_paraprompts(
    path: str | Path, name: str = "paraprompts400", limit: int | None = None
) -> tuple[list[Prompt], LoadReport]:
    """ParaPrompts-400: header ``Image,Prompt,Category,Prompt_Chinese``; the id is the
    ``Image`` md5 (without ``.JPEG``)."""
    path = Path(path)
    report = LoadReport(str(path))
    rows = _read_csv(path)
    report.rows = len(rows)
    need = {"Image", "Prompt", "Category"}
    if rows and not need <= set(rows[0]):
        raise ValueError(f"{path}: expected columns {sorted(need)}, found {sorted(rows[0])}")
    items = []
    for i, row in enumerate(rows, 1):
        image = _clean(row.get("Image"))
        pid = image.rsplit(".", 1)[0] if image else f"row-{i:03d}"
        items.append(
            (
                pid,
                _clean(row.get("Prompt")),
                _clean(row.get("Category")) or "unknown",
                {"text_zh": _clean(row.get("Prompt_Chinese")), "image": image},
            )
        )
    return _finish(name, items, report, limit), report


def _dpg_source(stem: str) -> str:
    m = re.match(r"^([A-Za-z_]+?)_?\d*$", stem)
    return m.group(1) if m and m.group(1) else "unprefixed"


def load_dpg_bench(
    path: str | Path, name: str = "dpg_bench", limit: int | None = None
) -> tuple[list[Prompt], LoadReport]:
    """DPG-Bench: a folder of ``<id>.txt`` files, one prompt each; the category is the
    source named in the file name (``partiprompts12`` -> ``partiprompts``; bare numbers
    -> ``unprefixed``). Files are ordered naturally (``2`` before ``10``)."""
    path = Path(path)
    report = LoadReport(str(path))
    if not path.is_dir():
        raise ValueError(f"{path}: DPG-Bench expects the prompts/ folder of .txt files")
    files = sorted(path.glob("*.txt"), key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.stem)])
    report.rows = len(files)
    items = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            report.skipped["not_utf8"] += 1
            continue
        items.append((f.stem, _clean(text), _dpg_source(f.stem), {"file": f.name}))
    return _finish(name, items, report, limit), report


#: prompt-set ``kind`` -> reader. Adding a prompt set means adding a reader here.
READERS: dict[str, Callable[..., tuple[list[Prompt], LoadReport]]] = {
    "vilg300": load_vilg300,
    "paraprompts": load_paraprompts,
    "dpg_bench": load_dpg_bench,
}


def load_prompt_set(
    name: str, kind: str, path: str | Path, limit: int | None = None
) -> tuple[list[Prompt], LoadReport]:
    """Read one prompt set by its reader ``kind``; a missing file raises with the path."""
    if kind not in READERS:
        raise ValueError(f"unknown prompt set kind {kind!r}; known: {sorted(READERS)}")
    if not Path(path).exists():
        raise FileNotFoundError(
            f"prompt set {name!r}: {path} does not exist (see the README for where it is published)"
        )
    return READERS[kind](path, name=name, limit=limit)


def load_from_config(eval_cfg, names: list[str] | None = None) -> dict[str, tuple[list[Prompt], LoadReport]]:
    """Every prompt set named in ``eval.prompt_sets`` (or the given subset)."""
    out = {}
    for name, ps in eval_cfg.prompt_sets.items():
        if names is None or name in names:
            out[name] = load_prompt_set(name, ps.kind, ps.path, ps.limit)
    return out
