"""``paradiffusion cache-latents --stage N``: encode a stage's images with the VAE once.

Writes a table (``train.stageN.data.latents``, default ``<data_root>/latents/stage<N>``) with
one row per trainable image: ``key``, its bucket, and the VAE posterior's moments (mean and
log-variance, float16) at the bucket size, centre-cropped and not flipped. One shard per
images shard, committed by marker: a rerun skips finished shards. Training with
``data.latents`` set samples from the moments (seeded like the pixel path) and skips the
VAE. The training loader reads the table into memory: meant for stage 3 and runs of up to a
few million images per node.
"""

from __future__ import annotations

import pyarrow as pa
import torch

from paradiffusion.config import PipelinesConfig
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


def latents_path(cfg: PipelinesConfig, stage: int) -> str:
    return cfg.train.stage(stage).data.latents or join(cfg.project.data_root, "latents", f"stage{stage}")


def cache_latents(cfg: PipelinesConfig, stage: int, batch_size: int = 16) -> StageSummary:
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
    )  # fmt: skip
    summary = StageSummary(f"cache-latents-stage{stage}")
    summary.n_in = data.counts["rows"]
    for reason in ("not downloaded", "not kept", "missing caption"):
        if data.counts[f"skipped: {reason}"]:
            summary.reject(reason, data.counts[f"skipped: {reason}"])
    announce(summary.stage, {"images": paths["images"], "rows usable": len(data.rows), "output": out.url,
                             "VAE": cfg.train.model.vae, "device": f"{device} {dtype}"})  # fmt: skip
    out.clean_tmp()
    out.save_config(cfg, summary.stage, sc.data)
    vae = load_vae(cfg.train.model.vae, dtype=dtype).to(device)
    done = out.done_shards()
    by_shard: dict[int, list] = {}
    for r in data.rows:
        by_shard.setdefault(r.shard, []).append(r)
    for si in progress(sorted(by_shard), total=len(by_shard), desc=summary.stage, unit="shard"):
        name = data.shards[si].rsplit("/", 1)[-1].removesuffix(".parquet")
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
