"""Reading a training run's device values every few steps, and stopping on what they say.

Split out of training/trainer.py: :class:`DeviceReads` is a base of
:class:`training.trainer.Trainer` (which re-exports :class:`TrainingDiverged`). A step
returns device tensors (loss, non-finite flag, grad norm) that nothing reads;
:meth:`DeviceReads._flush` reads the pending steps at once (one all-reduce, one copy to the
host) at log steps and before checkpoints, and stops the run at the first non-finite loss or
applied non-finite gradient; :meth:`DeviceReads._too_many_skipped` stops it when DeepSpeed
skipped more than ``optim.max_skipped_steps`` optimizer steps in a row.

Uses the trainer's ``device``, ``world_size``, ``stage``, ``scfg``, ``ckpt``, ``history`` and
``_samples``.
"""

from __future__ import annotations

import math

import torch


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN or infinite, or DeepSpeed skipped more than
    ``optim.max_skipped_steps`` optimizer steps in a row; the run stopped without saving the bad state."""


class DeviceReads:
    """The trainer's reads of its pending steps (a mixin of :class:`training.trainer.Trainer`)."""

    def _flush(self, pending: list[dict]) -> list[dict]:
        """Read the steps in ``pending`` from the device at once (one all-reduce, one copy to the
        host): append their losses to :attr:`history` and stop at the first non-finite one.
        Returns the steps read (loss averaged and samples summed over ranks).

        Every rank calls it at the same steps (it is a collective)."""
        if not pending:
            return []
        import deepspeed.comm as dist

        dev = self.device
        summed = torch.stack(
            [
                torch.stack([p["loss"] for p in pending]).double(),
                torch.stack([p["nonfinite"] for p in pending]).double(),
                torch.tensor([float(p["rank_samples"]) for p in pending], dtype=torch.float64).to(dev),
            ]
        )
        if self.world_size > 1:  # the mean loss, any rank's non-finite flag and the samples of all ranks
            dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        norms = [p["grad_norm"] for p in pending]
        tensor_norms = [n for n in norms if isinstance(n, torch.Tensor)]
        read = summed.cpu().tolist()
        read_norms = (
            iter(torch.stack([n.double().reshape(()) for n in tensor_norms]).cpu().tolist())
            if tensor_norms
            else iter(())
        )
        rows = []
        for i, p in enumerate(pending):
            n = norms[i]
            norm = next(read_norms) if isinstance(n, torch.Tensor) else (float(n) if n is not None else float("nan"))
            rows.append({"step": p["step"], "loss": read[0][i] / self.world_size, "nonfinite": read[1][i] > 0,
                         "samples": int(read[2][i]), "grad_norm": norm, "lr": p["lr"], "keys": p["keys"][:4],
                         "time": p["time"], "skipped": p["skipped"], "skipped_steps": p["skipped_steps"],
                         "norm_known": n is not None})  # fmt: skip
        for r in rows:
            if r["nonfinite"]:
                self._diverged(r, rows[-1]["step"])
            if r["norm_known"] and not r["skipped"] and not (math.isfinite(r["grad_norm"]) and r["grad_norm"] >= 0):
                # a non-finite gradient DeepSpeed applied (its overflow check off; its norm helpers say -1 for
                # inf/NaN): the weights are bad now
                self._diverged(r, rows[-1]["step"], what=f"the gradient norm is {r['grad_norm']} (the loss is finite)")
            self.history.append((r["step"], r["loss"]))
            self._samples += r["samples"]
        pending.clear()
        return rows

    def _diverged(self, bad: dict, last: int, what: str | None = None) -> None:
        newest = self.ckpt.newest()
        where = f"the last good checkpoint is {newest[1]}" if newest else "no checkpoint was written yet"
        ran = (
            f" (steps {bad['step']}-{last} ran before the check: the loss is read from the device every "
            f"train.stage{self.stage}.logging.every_steps steps and before each checkpoint)"
            if last > bad["step"]
            else ""
        )
        what = what or f"loss is {bad['loss']}"
        raise TrainingDiverged(
            f"{what} at step {bad['step']} (a rank saw a non-finite loss or gradient; this rank's keys: "
            f"{bad['keys']}...). Nothing from step {bad['step']} on was saved{ran}; {where}. Lower "
            f"train.stage{self.stage}.optim.lr, raise warmup_steps or check the data, then rerun to resume."
        )

    def _too_many_skipped(self, streak: list[int], pending: list[dict]) -> None:
        """DeepSpeed skipped more than ``optim.max_skipped_steps`` optimizer steps in a row: read the
        pending steps first (a non-finite loss among them is the better message), then stop."""
        self._flush(pending)
        newest = self.ckpt.newest()
        where = f"the last good checkpoint is {newest[1]}" if newest else "no checkpoint was written yet"
        limit = self.scfg.optim.max_skipped_steps
        raise TrainingDiverged(
            f"DeepSpeed skipped {len(streak)} optimizer steps in a row (steps {streak[0]}-{streak[-1]}; more than "
            f"train.stage{self.stage}.optim.max_skipped_steps = {limit}): their gradients were not finite while "
            f"the loss was, and the weights did not move in those steps; {where}. Check the data and lower train.stage{self.stage}.optim.lr, then rerun to resume."
        )
