"""Saving, mirroring and resuming a training run's checkpoints (the layout: training/trainer.py).

Split out of training/trainer.py: :class:`Checkpointing` is a base of
:class:`training.trainer.Trainer`. Every rank writes its state under ``.tmp-step-*``, rank 0
renames the folder and commits it with the ``COMMITTED`` marker (step, world size, frozen-weights
fingerprint), then prunes and, for a URL output, copies it there (marker last). A resume checks
the frozen weights against the marker's fingerprint and restores model, optimizer, LR schedule,
EMA, data position and RNG states. The folder helpers are in :mod:`training.checkpoints`.

Uses the trainer's ``engine``, ``model``, ``data``, ``ema``, ``ckpt``, ``frozen``, ``rank``,
``world_size``, ``stage``, ``scfg``, ``step``, ``paths``, ``remote_output``, ``summary`` and
``_barrier``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

from paradiffusion.config import ConfigError
from paradiffusion.log import get_logger
from paradiffusion.storage import download_folder, join, upload_folder
from training.checkpoints import COMMIT_MARKER, _load_trained_only, _rng_state, _set_rng_state
from training.ema import is_partitioned

log = get_logger("training")


class Checkpointing:
    """The trainer's checkpoints: save, mirror to a URL output, fetch, load (a mixin of
    :class:`training.trainer.Trainer`)."""

    def save_checkpoint(self) -> Path:
        """Write every rank's state under a temp name, rename it, then commit it with the marker."""
        name = f"step-{self.step:08d}"
        tmp = self.ckpt.root / f".tmp-{name}"
        final = self.ckpt.root / name
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        # The frozen parameters (the LLM's base weights: 13.5 GB at 7B) are left out: they come from
        # train.model.llm (and init_from) again on resume, checked against self.frozen.
        self.engine.save_checkpoint(
            str(tmp), tag="state", client_state={"step": self.step}, save_latest=False, exclude_frozen_parameters=True
        )
        torch.save(
            {"data": self.data.state_dict(), "rng": _rng_state(), "step": self.step}, tmp / f"rank-{self.rank}.pt"
        )
        if self.ema is not None and (self.rank == 0 or is_partitioned(self.model)):
            torch.save(self.ema.state_dict(), tmp / f"ema-rank-{self.rank}.pt")  # this rank's fp32 pieces
        self._barrier()
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            doc = {"step": self.step, "world_size": self.world_size, "frozen": self.frozen, "written_at": time.time()}
            marker_tmp = final / f".{COMMIT_MARKER}.tmp"
            marker_tmp.write_text(json.dumps(doc))
            os.replace(marker_tmp, final / COMMIT_MARKER)
            self.ckpt.prune(self.scfg.checkpoint.keep_last)
            if self.remote_output is not None:
                self._mirror_checkpoint(final)
        self._barrier()
        return final

    # ------------------------------------------------------------------ a URL output (object storage)
    def _remote_checkpoints(self) -> tuple[object, str, list[int]]:
        """(filesystem, path of <remote>/checkpoints, committed steps there, sorted)."""
        import fsspec

        fs, root = fsspec.core.url_to_fs(join(self.remote_output, "checkpoints"))
        steps = []
        if fs.exists(root):
            for d in fs.ls(root, detail=False):
                name = d.rstrip("/").rsplit("/", 1)[-1]
                if name.startswith("step-") and fs.exists(join(d, COMMIT_MARKER)):
                    steps.append(int(name.split("-", 1)[1]))
        return fs, root, sorted(steps)

    def _mirror_checkpoint(self, final: Path) -> None:
        """Copy a committed checkpoint to the URL (its marker last), then drop the remote ones past keep_last."""
        t0 = time.time()
        fs, root, steps = self._remote_checkpoints()
        if final.name in {f"step-{s:08d}" for s in steps}:  # saved again (a rerun): uncommit the old copy first
            fs.rm(join(root, final.name, COMMIT_MARKER))
        n = upload_folder(final, join(self.remote_output, "checkpoints", final.name), last=COMMIT_MARKER)
        fs, root, steps = self._remote_checkpoints()
        for step in steps[: -self.scfg.checkpoint.keep_last]:
            d = join(root, f"step-{step:08d}")
            fs.rm(join(d, COMMIT_MARKER))  # uncommit first: a kill mid-delete leaves no half
            fs.rm(d, recursive=True)
        log.info("checkpoint %s copied to %s (%d files, %.1f s)", final.name, self.remote_output, n, time.time() - t0)

    def _fetch_remote_checkpoint(self) -> None:
        """Resume on a fresh machine: the newest committed checkpoint of the URL, when newer than the local one."""
        _, root, steps = self._remote_checkpoints()
        local = self.ckpt.newest()
        if not steps or (local is not None and local[0] >= steps[-1]):
            return
        name = f"step-{steps[-1]:08d}"
        download_folder(join(self.remote_output, "checkpoints", name), self.ckpt.root / name, COMMIT_MARKER)
        log.info("fetched checkpoint %s from %s", name, self.remote_output)

    def _mirror_run(self) -> None:
        """Copy the export (paradiffusion.json last) and the run's records to the URL."""
        out = Path(self.paths["output"])
        if (out / "export").is_dir():
            upload_folder(out / "export", join(self.remote_output, "export"), last="paradiffusion.json")
        upload_folder(out, self.remote_output, skip=("checkpoints", "export"))
        log.info("run folder %s copied to %s", out, self.remote_output)

    def load_checkpoint(self, path: Path) -> None:
        """Restore model, optimizer, LR schedule, EMA, data position and RNG states."""
        meta = json.loads((path / COMMIT_MARKER).read_text())
        if meta.get("world_size") != self.world_size:
            log.warning(
                "checkpoint %s was written by %s ranks, now %d: data order will differ",
                path.name,
                meta.get("world_size"),
                self.world_size,
            )
        self._check_frozen(path, meta.get("frozen"))
        _, client = self.engine.load_checkpoint(
            str(path), tag="state", load_module_strict=False, custom_load_fn=_load_trained_only
        )
        if client is None:
            raise RuntimeError(f"{path}: DeepSpeed could not load the state (see the messages above)")
        self.step = int(client["step"])
        rank_file = path / f"rank-{self.rank}.pt"
        if rank_file.is_file():
            st = torch.load(rank_file, weights_only=False)
            self.data.load_state_dict(st["data"])
            _set_rng_state(st["rng"])
        if self.ema is not None:
            files = sorted(path.glob("ema-rank-*.pt"))
            if files:
                own = path / f"ema-rank-{self.rank}.pt"
                self.ema.load(files, own if own in files and meta.get("world_size") == self.world_size else None)
            else:  # a checkpoint from before the fp32 EMA (ema.pt held a bf16 EMA) or with the EMA off
                from training.ema import master_fragments

                self.ema.reset(master_fragments(self.engine))  # restart it from the resumed master weights
                log.warning("%s has no fp32 EMA (ema-rank-*.pt): the EMA restarts from the resumed weights", path.name)
        self.summary.extra["resumed_from"] = path.name
        log.info("resumed from %s (step %d)", path, self.step)

    def _check_frozen(self, path: Path, saved: dict | None) -> None:
        """Stop when the frozen weights differ from those the checkpoint was trained with."""
        if saved is None:
            return  # a checkpoint from before the fingerprint (it holds the frozen weights itself)
        now = self.frozen
        same = saved["params"] == now["params"] and all(
            math.isclose(saved[k], now[k], rel_tol=1e-6, abs_tol=1e-6) for k in ("sum", "sum_sq")
        )
        if not same:
            raise ConfigError(
                f"{path}: the frozen weights (the LLM: train.model.llm, train.model.llm_revision; stage 3: the "
                f"stage-2 LoRA in train.stage{self.stage}.init_from) differ from the ones this checkpoint was "
                f"trained with ({saved} now {now}); checkpoints leave them out. Point the config back at them, or "
                f"start afresh with train.stage{self.stage}.checkpoint.resume=false (or another output folder)"
            )
