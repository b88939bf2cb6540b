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
        REPO.parent / "shared" / "data" / "benchmarks",
    ]
    for c in candidates:
        if c and (Path(c) / "ParaPrompts_400.csv").is_file():
            return Path(c)
    return None
