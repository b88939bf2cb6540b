"""Skipped optimizer steps are facts, and a NaN in one sample stops the run like a NaN batch.

DeepSpeed skips an optimizer step whose gradients are not finite (its overflow check; in fp32
through the gradient norm). The trainer counts every skipped step (metrics.jsonl, TensorBoard,
the summary) and stops when more than ``optim.max_skipped_steps`` are skipped in a row. A
sample whose loss is NaN makes the step's loss NaN (the mean keeps it), so the run stops at the
next read with the same message as a whole NaN batch: a reduction that dropped the non-finite
samples (``loss[torch.isfinite(loss)].mean()``) would leave a finite loss and NaN gradients,
and these tests fail on it."""

from __future__ import annotations

import json

import pytest
import torch
from train_fixtures import tiny_config, write_image_shards

from training.trainer import CheckpointDir, Trainer, TrainingDiverged


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


class _NanSample(Trainer):
    """At ``bad_step`` the pixels of ``which`` (one sample or the whole batch) become NaN."""

    bad_step = 3
    which = "one"

    def batch_generator(self):
        for batch in super().batch_generator():
            if self.step + 1 == self.bad_step:
                px = batch["pixel_values"].float()  # uint8 pixels -> float, to hold a NaN
                if self.which == "one":
                    px[1] = float("nan")  # the second sample only: the first stays finite
                else:
                    px[:] = float("nan")
                batch = {**batch, "pixel_values": px}
            yield batch


@pytest.mark.parametrize("which", ["one", "all"], ids=["one-sample", "whole-batch"])
def test_a_nan_sample_stops_the_run_like_a_nan_batch(tiny_models, tmp_path, which):
    write_image_shards(tmp_path / "images", n_shards=1, per_shard=6)
    cfg = tiny_config(tiny_models, tmp_path, max_steps=6, **{"logging.every_steps": 1})
    t = type("NanSample", (_NanSample,), {"which": which})(cfg, 1)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 3 .*last good checkpoint is .*step-00000002"):
        t.train()
    assert [s for s, _ in t.history] == [1, 2]
    assert [s for s, _ in CheckpointDir(str(tmp_path / "train" / "stage1" / "checkpoints")).committed()] == [2]
    assert all(r["step"] < 3 for r in _metrics(tmp_path / "train" / "stage1"))


class _BadGradients(Trainer):
    """At the steps in ``bad_steps`` the loss stays finite but one UNet weight's gradient is NaN
    (what a reduction dropping a NaN sample's loss leaves): DeepSpeed skips those steps."""

    bad_steps: tuple[int, ...] = ()

    def train_step(self, batches):
        handle = None
        if self.step + 1 in self.bad_steps:
            p = next(p for p in self.model.unet.parameters() if p.requires_grad)
            handle = p.register_hook(lambda g: g * float("nan"))
        try:
            return super().train_step(batches)
        finally:
            if handle is not None:
                handle.remove()


def _unet_weights(t: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in t.model.unet.state_dict().items()}


def test_skipped_steps_are_counted_in_metrics_and_summary(tiny_models, tmp_path):
    write_image_shards(tmp_path / "images", n_shards=1, per_shard=6)
    cfg = tiny_config(tiny_models, tmp_path, max_steps=6, **{"logging.every_steps": 1, "optim.max_skipped_steps": 2})
    seen = {}

    class Run(_BadGradients):
        bad_steps = (3, 4)

        def train_step(self, batches):
            m = super().train_step(batches)
            seen[self.step + 1] = _unet_weights(self)
            return m

    t = Run(cfg, 1)
    s = t.train()
    rows = _metrics(tmp_path / "train" / "stage1")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["skipped"] for r in rows] == [False, False, True, True, False, False]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 2, 2, 2]
    assert all(r["loss"] == r["loss"] for r in rows)  # every loss finite: only the gradients were bad
    assert s.extra["skipped_steps_this_run"] == 2 and s.extra["skipped_steps_first"] == [3, 4]
    assert s.extra["skipped_steps_total"] == 2
    # a skipped step leaves the weights as they were; the others move them
    assert all(torch.equal(seen[2][k], seen[4][k]) for k in seen[2])
    assert not all(torch.equal(seen[4][k], seen[5][k]) for k in seen[4])
    summary = json.loads((tmp_path / "train" / "stage1" / "_summary.json").read_text())
    assert summary["skipped_steps_this_run"] == 2 and summary["skipped_steps_total"] == 2


def test_more_skipped_steps_in_a_row_than_allowed_stop_the_run(tiny_models, tmp_path):
    write_image_shards(tmp_path / "images", n_shards=1, per_shard=6)
    cfg = tiny_config(tiny_models, tmp_path, max_steps=8,
                      **{"logging.every_steps": 4, "checkpoint.every_steps": 2, "optim.max_skipped_steps": 2})  # fmt: skip
    t = type("Run", (_BadGradients,), {"bad_steps": (3, 4, 5)})(cfg, 1)
    with pytest.raises(TrainingDiverged, match=r"skipped 3 optimizer steps in a row \(steps 3-5; more than "
                       r"train\.stage1\.optim\.max_skipped_steps = 2\).*last good checkpoint is .*step-00000004"):  # fmt: skip
        t.train()
    assert t.step == 5 and [s for s, _ in t.history] == [1, 2, 3, 4, 5]  # read before stopping: all finite
    assert not (tmp_path / "train" / "stage1" / "export").exists()


def test_without_deepspeeds_check_a_bad_gradient_stops_the_run_at_the_next_read(tiny_models, tmp_path):
    """bf16 with train.deepspeed.check_grad_overflow false: DeepSpeed applies a non-finite
    gradient instead of skipping the step; the trainer reads the gradient norm with the loss and
    stops there, naming the step, with nothing saved from it on."""
    write_image_shards(tmp_path / "images", n_shards=1, per_shard=6)
    cfg = tiny_config(tiny_models, tmp_path, max_steps=6, **{"logging.every_steps": 4, "checkpoint.every_steps": 2})
    cfg.train.deepspeed.precision, cfg.train.deepspeed.check_grad_overflow = "bf16", False
    t = type("Run", (_BadGradients,), {"bad_steps": (3,)})(cfg, 1)
    with pytest.raises(TrainingDiverged, match=r"at step 3 .*last good checkpoint is .*step-00000002"):
        t.train()
    assert t.step == 4 and t.skipped_steps == []  # not skipped: applied, then seen at the read of step 4
    assert [s for s, _ in CheckpointDir(str(tmp_path / "train" / "stage1" / "checkpoints")).committed()] == [2]
    assert not (tmp_path / "train" / "stage1" / "export").exists()
