"""Where a training stage runs: its resolved paths (a URL output staged locally), the process
group (NCCL on GPUs, gloo on CPU) and the DeepSpeed JSON config built from pipelines.yaml.
Split out of training/trainer.py; :mod:`training.trainer` re-exports these names."""

from __future__ import annotations

import math
import os
import socket
import time
from pathlib import Path

import torch

from paradiffusion.config import ConfigError, RootConfig
from paradiffusion.log import get_logger
from paradiffusion.storage import Table, download_folder, is_url, join
from training.config import StageConfig, TrainConfig

log = get_logger("training")


def stage_paths(cfg: RootConfig, stage: int) -> dict[str, str | None]:
    """Resolved input/output paths of a stage (``null`` config paths derived from data_root)."""
    root = cfg.project.data_root
    sc = cfg.train.stage(stage)
    out = sc.output or join(root, "train", f"stage{stage}")
    captions = sc.data.captions
    if captions is None and sc.data.caption_source == "captions":
        captions = join(root, "captions")
    if captions is None and sc.data.caption_source == "table":
        captions = join(root, "small_train")  # what `make annotations-approved` writes
    init = sc.init_from
    if init is None and stage > 1:
        prev = cfg.train.stage(stage - 1).output or join(root, "train", f"stage{stage - 1}")
        init = join(prev, "export")
    scores = sc.data.scores
    # a published WebDataset is filtered already: the data root's scores apply only when set explicitly
    if scores is None and sc.data.format == "parquet" and Table(join(root, "scores")).exists():
        scores = join(root, "scores")
    # A URL output or init_from (object storage): the run works in a local staging folder, since
    # DeepSpeed writes checkpoints and the loaders read exports from a file system; the trainer
    # copies committed checkpoints and the export to the URL, and fetches a URL init_from first.
    out_url = init_url = None
    if is_url(out):
        out_url, out = out, staging_folder(cfg, out)
    if init and is_url(init):
        init_url, init = init, staging_folder(cfg, init)
    return {
        "output": out,
        "output_url": out_url,
        "images": sc.data.path if sc.data.format == "webdataset" else sc.data.images or join(root, "images"),
        "captions": captions,
        "scores": scores,
        "init_from": init,
        "init_from_url": init_url,
    }


def fetch_init_from(paths: dict, stage: int) -> None:
    """Fetch a URL ``init_from`` (the previous stage's export on object storage) into its local
    staging folder: local rank 0 copies it (unless the same export is there already), the other
    ranks of the node wait for it."""
    url = paths.get("init_from_url")
    if not url:
        return
    import fsspec

    local = Path(paths["init_from"])
    marker = local / "paradiffusion.json"
    if os.environ.get("LOCAL_RANK", "0") != "0":
        _wait_for(marker)
        return
    fs, root = fsspec.core.url_to_fs(url)
    remote_marker = join(root, "paradiffusion.json")
    if not fs.exists(remote_marker):
        raise ConfigError(
            f"train.stage{stage}.init_from = {url}: no committed export there (no paradiffusion.json); run "
            f"`make train-stage{stage - 1}` first"
        )
    if marker.is_file() and marker.read_bytes() == fs.cat_file(remote_marker):
        return  # fetched before
    t0 = time.time()
    download_folder(url, local, "paradiffusion.json")
    log.info("fetched %s -> %s (%.1f s)", url, local, time.time() - t0)


def staging_folder(cfg: RootConfig, url: str) -> str:
    """The local folder where a run (or an export) whose home is ``url`` lives on this machine."""
    import hashlib

    base = cfg.train.staging_dir or os.path.join(os.path.expanduser("~"), ".cache", "paradiffusion", "train-staging")
    name = url.rstrip("/").rsplit("/", 1)[-1]
    return os.path.join(base, f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}")


def _wait_for(path: Path, timeout_s: float = 3600.0) -> None:
    """Wait until another process on this node has fetched ``path`` (a staged export)."""
    deadline = time.time() + timeout_s
    while not path.is_file():
        if time.time() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s:.0f}s (local rank 0 fetches it)")
        time.sleep(1.0)


# ---------------------------------------------------------------------------- distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, int]:
    """Join the process group: NCCL on GPUs, gloo on CPU. A plain process becomes rank 0 of 1."""
    import deepspeed

    if "RANK" not in os.environ:  # not started by a launcher: a world of one
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"})
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


def deepspeed_config(train: TrainConfig, stage: StageConfig, on_gpu: bool) -> dict:
    """The DeepSpeed JSON config, built from pipelines.yaml (so there is one source of truth)."""
    ds = train.deepspeed
    bf16 = ds.precision == "bf16" or (ds.precision == "auto" and on_gpu)
    zero: dict = {"stage": ds.zero_stage, "overlap_comm": ds.overlap_comm and on_gpu}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": stage.micro_batch_size,
        "gradient_accumulation_steps": stage.gradient_accumulation,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16, "check_grad_overflow": ds.check_grad_overflow},
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }


def _lr_lambda(warmup: int, total: int, schedule: str):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cosine" else 1.0 - frac

    return f
