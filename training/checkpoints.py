"""Checkpoint folders and the small records a resume needs: committed checkpoints
(list, newest, prune, clean), the trained-only module state loader, metrics.jsonl cut back to
the checkpoint's step, RNG states. Split out of training/trainer.py (see its docstring for the
layout); :mod:`training.trainer` re-exports these names."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from paradiffusion.log import get_logger

log = get_logger("training")

COMMIT_MARKER = "COMMITTED"


class CheckpointDir:
    """Committed checkpoints under ``<output>/checkpoints``: list, newest, prune, clean."""

    def __init__(self, root: str):
        self.root = Path(root)

    def committed(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        out = []
        for d in self.root.glob("step-*"):
            if (d / COMMIT_MARKER).is_file():
                try:
                    out.append((int(d.name.split("-", 1)[1]), d))
                except ValueError:
                    continue
        return sorted(out)

    def newest(self) -> tuple[int, Path] | None:
        c = self.committed()
        return c[-1] if c else None

    def clean_uncommitted(self) -> list[Path]:
        """Remove temp folders and step folders without a marker (a killed or failed save)."""
        removed = []
        if not self.root.is_dir():
            return removed
        for d in self.root.iterdir():
            if d.is_dir() and (d.name.startswith(".tmp-") or not (d / COMMIT_MARKER).is_file()):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
        return removed

    def prune(self, keep: int) -> None:
        for _, d in self.committed()[:-keep]:
            (d / COMMIT_MARKER).unlink(missing_ok=True)  # uncommit first: a crash mid-delete leaves no half
            shutil.rmtree(d, ignore_errors=True)


def _load_trained_only(src: dict, dst: torch.nn.Module) -> None:
    """Load a checkpoint's module state that holds the trained parameters only (DeepSpeed's
    ``custom_load_fn``): every key missing must be a frozen parameter, no key unknown."""
    result = dst.load_state_dict(src, strict=False)
    frozen = {n for n, p in dst.named_parameters() if not p.requires_grad}
    missing = [k for k in result.missing_keys if k not in frozen]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]} "
            "(was it written with another train.model or LoRA config?)"
        )


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the rows of ``metrics.jsonl`` up to ``step`` (and no torn last line), atomically."""
    if not path.is_file():
        return
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)
        log.info("metrics.jsonl: dropped %d row(s) after step %d (run again from the checkpoint)", dropped, step)


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if st.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
