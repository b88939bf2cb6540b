"""Fixtures for the eval tests: a small eval_images table of synthetic PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from eval_prompt_files import find_benchmarks
from PIL import Image, PngImagePlugin

from eval.schemas import EVAL_IMAGES
from paradiffusion.storage import Table, rows_to_table


@pytest.fixture(scope="session")
def benchmarks_dir() -> Path:
    """The published ViLG-300 / ParaPrompts-400 / DPG-Bench files; skips when absent
    (they are not redistributed: `make fetch-benchmarks`)."""
    found = find_benchmarks()
    if found is None:
        pytest.skip("published prompt files not found (make fetch-benchmarks or set PARADIFFUSION_BENCHMARKS)")
    return found


def make_images_table(root: Path, models=("alpha", "beta"), n_prompts: int = 4, seeds=(0,), size: int = 32) -> Table:
    """An eval_images table with one flat-coloured PNG per model x prompt x seed (with
    text metadata naming the model, as eval-generate writes)."""
    table = Table(str(root), schema=EVAL_IMAGES)
    rows = []
    rng = np.random.default_rng(0)
    for m in models:
        for p in range(n_prompts):
            for s in seeds:
                rel = f"png/{m}/set1/p{p}_s{s}.png"
                f = root / rel
                f.parent.mkdir(parents=True, exist_ok=True)
                info = PngImagePlugin.PngInfo()
                info.add_text("model", m)
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(f, pnginfo=info)
                rows.append(
                    {
                        "key": f"{m}/set1/p{p}/{s}",
                        "model": m,
                        "prompt_set": "set1",
                        "prompt_id": f"p{p}",
                        "category": "cat" + str(p % 2),
                        "prompt": f"prompt number {p}. It has two sentences.",
                        "seed": s,
                        "image_path": rel,
                        "width": size,
                        "height": size,
                        "settings": json.dumps({"steps": 1}),
                        "seconds": 0.0,
                        "error": None,
                    }
                )
    table.write_shard("all", rows_to_table(rows, EVAL_IMAGES))
    return table


@pytest.fixture
def images_table(tmp_path: Path) -> Table:
    return make_images_table(tmp_path / "images")


@pytest.fixture
def make_images():
    """The :func:`make_images_table` builder, for tests that need other shapes."""
    return make_images_table


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> str:
    """A tiny random LLaVA folder (the VQA judge of the DPG-Bench tests), built once per session."""
    from paradiffusion.testing.tiny_vlm import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("models") / "tiny_vlm")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> dict:
    """A tiny random open_clip folder and aesthetic MLP (build_tiny_clip), built once per session."""
    from paradiffusion.testing.tiny_clip import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("models") / "tiny_clip")
