"""``paradiffusion cache-latents --stage N``: encode a stage's images with the VAE once.

Writes a table (``train.stageN.data.latents``, default ``<data_root>/latents/stage<N>``) with
one row per trainable image: ``key``, its bucket, and the VAE posterior's moments (mean and
log-variance, float16) at the bucket size, centre-cropped and not flipped. One shard per
images shard, committed by marker: a rerun skips finished shards. Training with
``data.latents`` set samples from the moments (seeded like the pixel path) and skips the
VAE. The training loader reads the table into memory: meant for stage 3 and runs of up to a
few million images per node.

The table records what the latents depend on in ``_latents.json``: the bucket settings
(``data.resolution``, ``bucket_step``, ``max_aspect_ratio``) and the VAE (its id or path and a
fingerprint of its weights). Training on the cache, or adding shards to it, with other
settings stops with a message naming the setting.
"""

from __future__ import annotations

import math

import pyarrow as pa
import torch

from paradiffusion.config import ConfigError, RootConfig
from paradiffusion.stage import StageSummary, announce, progress
from paradiffusion.storage import Table, join

LATENTS = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("bucket_width", pa.int32()),
        pa.field("bucket_height", pa.int32()),
        pa.field("shape", pa.list_(pa.int32())),  # (2 x latent channels, h, w)
        pa.field("moments", pa.binary()),  # float16, C-order
    ]
)


SETTINGS_FILE = "_latents.json"
#: Recorded settings -> the config key that sets them (under train.stageN).
_DATA_KEYS = {"resolution": "data.resolution", "bucket_step": "data.bucket_step",
              "max_aspect_ratio": "data.max_aspect_ratio"}  # fmt: skip


def latents_path(cfg: RootConfig, stage: int) -> str:
    return cfg.train.stage(stage).data.latents or join(cfg.project.data_root, "latents", f"stage{stage}")


def vae_fingerprint(vae: torch.nn.Module) -> list[float]:
    """Sum and sum of squares of the VAE's weights, taken in bf16 so the dtype it was loaded in does not matter."""
    t = torch.zeros(2, dtype=torch.float64)
    for p in vae.parameters():
        x = p.detach().to(torch.bfloat16)
        t[0] += x.sum(dtype=torch.float64).cpu()
        t[1] += torch.linalg.vector_norm(x, dtype=torch.float64).square().cpu()
    return t.tolist()


def latent_settings(cfg: RootConfig, stage: int, vae: torch.nn.Module) -> dict:
    """What cached latents depend on: the stage's bucket settings and the VAE."""
    d = cfg.train.stage(stage).data
    return {
        **{k: getattr(d, k) for k in _DATA_KEYS},
        "vae": cfg.train.model.vae,
        "vae_fingerprint": vae_fingerprint(vae),
    }


def check_latents(url: str, want: dict, stage: int) -> None:
    """Stop (ConfigError naming the setting) when the cache at ``url`` was made with other settings."""
    have = Table(url).load_json(SETTINGS_FILE)
    if have is None:
        raise ConfigError(
            f"train.stage{stage}.data.latents = {url}: no {SETTINGS_FILE} there (a cache made before the settings "
            f"were recorded): remove it and run `make cache-latents STAGE={stage}` again"
        )
    remake = (
        f"or make a new cache (`make cache-latents STAGE={stage}` with train.stage{stage}.data.latents set to "
        "another folder)"
    )
    for k, key in _DATA_KEYS.items():
        if have.get(k) != want[k]:
            raise ConfigError(
                f"train.stage{stage}.{key} is {want[k]} but the latent cache {url} was made with {have.get(k)}: "
                f"set it back, {remake}"
            )
    old, new = have.get("vae_fingerprint") or [math.nan, math.nan], want["vae_fingerprint"]
    if not all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for a, b in zip(old, new, strict=True)):
        raise ConfigError(
            f"train.model.vae = {want['vae']} is not the VAE the latent cache {url} was made with "
            f"({have.get('vae')}; its weights differ): set it back, {remake}"
        )


def cache_latents(cfg: RootConfig, stage: int, batch_size: int = 16) -> StageSummary:
    """Encode every usable image of the stage (its caption source and kept set) into the latents table."""
    from training.data import BucketedImageData, to_model_range
    from training.modeling import load_vae
    from training.trainer import stage_paths

    sc = cfg.train.stage(stage)
    paths = stage_paths(cfg, stage)
    out = Table(latents_path(cfg, stage), LATENTS)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    data = BucketedImageData(
        paths["images"], batch_size, sc.data.resolution, caption_source=sc.data.caption_source,
        captions_url=paths["captions"], caption_model_id=sc.data.caption_model_id,
        caption_prompt_id=sc.data.caption_prompt_id, scores_url=paths["scores"], bucket_step=sc.data.bucket_step,
        max_aspect_ratio=sc.data.max_aspect_ratio, random_crop=False, random_flip=False, num_workers=0,
        format=sc.data.format, subset=sc.data.subset,
    )  # fmt: skip
    summary = StageSummary(f"cache-latents-stage{stage}")
    summary.n_in = data.counts["rows"]
    for reason in ("not downloaded", "not kept", "missing caption"):
        if data.counts[f"skipped: {reason}"]:
            summary.reject(reason, data.counts[f"skipped: {reason}"])
    announce(summary.stage, {"images": paths["images"], "rows usable": len(data.rows), "output": out.url,
                             "VAE": cfg.train.model.vae, "device": f"{device} {dtype}"})  # fmt: skip
    out.clean_tmp()
    vae = load_vae(cfg.train.model.vae, dtype=dtype).to(device)
    settings = latent_settings(cfg, stage, vae)
    done = out.done_shards()
    if done:  # adding to a cache: only with the settings it was made with
        check_latents(out.url, settings, stage)
    out.save_config(cfg, summary.stage, sc.data)
    out.save_json(SETTINGS_FILE, settings)
    by_shard: dict[int, list] = {}
    for r in data.rows:
        by_shard.setdefault(r.shard, []).append(r)
    for si in progress(sorted(by_shard), total=len(by_shard), desc=summary.stage, unit="shard"):
        name = data.shards[si].rsplit("/", 1)[-1].removesuffix(".parquet").removesuffix(".tar")
        if name in done:
            summary.skipped_done += 1
            continue
        groups: dict[int, list] = {}
        for r in by_shard[si]:
            groups.setdefault(r.bucket, []).append(r)
        rows = []
        for bucket, members in sorted(groups.items()):
            for i in range(0, len(members), batch_size):
                chunk = [(r, data.load(r, 0)) for r in members[i : i + batch_size]]
                chunk = [(r, x) for r, x in chunk if x is not None]
                if not chunk:
                    continue
                pixels = to_model_range(torch.stack([x for _, x in chunk]).to(device), dtype)
                with torch.no_grad():
                    moments = vae.encode(pixels).latent_dist.parameters.to(torch.float16).cpu()
                bw, bh = data.buckets[bucket]
                for (r, _), m in zip(chunk, moments, strict=True):
                    rows.append({"key": r.key, "bucket_width": bw, "bucket_height": bh, "shape": list(m.shape),
                                 "moments": m.contiguous().numpy().tobytes()})  # fmt: skip
        out.write_shard(name, pa.Table.from_pylist(rows, schema=LATENTS) if rows else LATENTS.empty_table())
        summary.n_out += len(rows)
    if data.counts["skipped: decode error"]:
        summary.reject("decode error", data.counts["skipped: decode error"])
    summary.finish()
    summary.print()
    out.save_json("_summary.json", summary.to_dict())
    return summary
