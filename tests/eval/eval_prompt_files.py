"""Where the eval tests find prompt files: our samples (always) and the published ones (maybe)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: Our own small prompt files in the benchmarks' formats (always present).
SAMPLE_PROMPTS = REPO / "eval" / "sample_prompts"


def find_benchmarks() -> Path | None:
    """The folder with the published prompt files, if this machine has them."""
    candidates = [
        os.environ.get("PARADIFFUSION_BENCHMARKS"),
        REPO / "benchmarks",
    ]
    for c in candidates:
        if c and (Path(c) / "ParaPrompts_400.csv").is_file():
            return Path(c)
    return None


def trimmed_dpg_questions(folder: Path, per_prompt: int = 3) -> Path:
    """Our sample DPG-Bench question file (official format) cut to its first questions per
    prompt, so tests with the tiny VLM judge make few calls on a slow CPU."""
    import csv

    with open(SAMPLE_PROMPTS / "dpg" / "dpg_bench_sample.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    keep = [r for r in rows if int(r["proposition_id"]) <= per_prompt]
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "dpg_questions_trimmed.csv"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(keep)
    return out
