"""GPU benchmark: the filter's whole stage (decode included) beside the bare eager model call.

One prepared script for a GPU machine (one H100/H200-class GPU and its CPU cores):

1. **bare model**: open_clip ViT-L/14 (the real architecture, random weights), fp16,
   eager, batch 512, on random pixels already on the GPU; images/s over timed
   iterations after warm-up. (Measured baseline elsewhere: 2,578 images/s on one H200.)
2. **whole stage**: ``run_filter`` on ``--n`` JPEG rows (500-1000 px, made from the
   bundled photographs; ``--unique`` distinct files repeated) as a user runs it: Ray
   Data on a local Ray with every CPU core for decode tasks, one model actor on the GPU
   (CLIP image + text towers + aesthetic MLP, fp16), per-shard writes and the global
   dedup pass included. Ray's own start-up is timed apart.
3. **decode capacity**: one core's decode + resize + hashing rate, times the cores.
4. **watermark model** (``filter.models.watermark``, on in the GPU config): LAION's
   detector (timm ``efficientnet_b3a`` + its head, random weights, 256 x 256) alone,
   eager, batch ``--batch``, on random uint8 pixels on the GPU as the filter hands them
   over: images/s and ms per image, beside the bare CLIP image tower of step 1.
5. **GPU decode** (the option for when CPU decode is the limit): the same JPEG bytes
   decoded on the GPU with nvJPEG (``torchvision.io.decode_jpeg(..., device="cuda")``),
   resized and centre-cropped on the GPU, then the CLIP image tower: images/s of
   decode + model with no CPU decode at all (no text tower, aesthetic or hashing; the
   stage itself decodes on CPU: this measures what moving decode to the GPU would give).

Goal: the whole stage >= 3,000 images/s on one H100/H200 with 16 cores. Writes
filter_gpu.json into $OUT (or --workdir). A CPU-only smoke run of the same code:

    python bench/filter_gpu.py --tiny --device cpu --n 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def bare_model(model_name: str | None, model: dict, device: str, batch: int, iters: int, precision: str) -> dict:
    """Images/s of the bare eager image tower on random pixels already on the device."""
    import torch

    from curation.models import load_clip

    clip = load_clip(model["clip_model"], device=device, precision=precision)
    size = clip.image_size
    x = torch.randn(batch, 3, size, size, device=device, dtype=clip.dtype)
    with torch.inference_mode():
        for _ in range(3):
            clip.model.encode_image(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            clip.model.encode_image(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    del clip
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {
        "images_per_s": round(batch * iters / seconds, 1),
        "batch": batch,
        "iters": iters,
        "precision": precision,
        "model": model_name or "tiny",
    }


def watermark_model(root: Path, device: str, batch: int, iters: int, precision: str) -> dict:
    """Images/s of LAION's watermark detector (random weights, saved as ``watermark_model_v1.pt`` is and
    loaded by the filter's own loader) on uint8 pixels, through :meth:`WatermarkModel.score`
    (normalisation, model, softmax, copy back) as the filter calls it."""
    import numpy as np
    import torch

    from curation.safety.watermark import SIZE, build_watermark_net, load_watermark

    weights = root / "watermark_random.pt"
    if not weights.exists():
        torch.save(build_watermark_net().state_dict(), weights)
    wm = load_watermark(str(weights), device=device, precision=precision)
    pixels = np.random.default_rng(0).integers(0, 256, (batch, SIZE, SIZE, 3), dtype=np.uint8)
    for _ in range(3):
        wm.score(pixels)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        wm.score(pixels)  # returns numpy: synchronised by the copy back
    seconds = time.perf_counter() - t0
    del wm
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    n = batch * iters
    return {
        "images_per_s": round(n / seconds, 1),
        "ms_per_image": round(seconds / n * 1000, 3),
        "batch": batch,
        "iters": iters,
        "precision": precision,
    }


def make_rows(root: Path, n: int, unique: int, shard_size: int, procs: int) -> Path:
    """``n`` rows in shards, cycling over ``unique`` generated JPEGs."""
    import pyarrow.parquet as pq
    from filter_cpu import make_fixture

    from paradiffusion.testing.image_shards import write_image_shard
    from paradiffusion.testing.sample import ENGLISH, PHOTOS

    src = make_fixture(root / "unique", unique, unique, procs)
    data = pq.read_table(sorted(src.glob("*.parquet"))[0], columns=["jpg"])["jpg"].to_pylist()
    images = root / f"images_{n}"
    if (images / "_complete.json").is_file():
        return images
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True)
    captions = list(PHOTOS.values()) + ENGLISH
    for s, start in enumerate(range(0, n, shard_size)):
        rows = [
            {
                "key": f"{s:05d}{j:05d}",
                "url": f"http://bench.local/{start + j}.jpg",
                "caption": captions[(start + j) % len(captions)],
                "jpg": data[(start + j) % len(data)],
                "status": "success",
                "error_message": None,
            }
            for j in range(min(shard_size, n - start))
        ]
        write_image_shard(images, f"{s:05d}", rows)
    (images / "_complete.json").write_text(json.dumps({"n": n}))
    return images


def whole_stage(root: Path, images: Path, model: dict, a: argparse.Namespace) -> dict:
    import ray

    from curation.filter import run_filter
    from paradiffusion.raycluster import init_ray
    from pipelines.config import load_config

    data_root = root / "stage_run"
    shutil.rmtree(data_root, ignore_errors=True)
    data_root.mkdir(parents=True)
    os.symlink(images, data_root / "images")
    gpu = a.device.startswith("cuda")
    sets = [
        f"project.data_root={data_root}",
        f"filter.models.clip_model={model['clip_model']}",
        f"filter.models.aesthetic={model['aesthetic']}",
        f"filter.models.device={'auto' if gpu else 'cpu'}",
        f"filter.models.precision={a.precision}",
        "filter.thresholds.min_short_side=256",
        "filter.thresholds.aesthetic_min=null",
        "filter.thresholds.clip_score_min=null",
        f"filter.batch_size={a.batch}",
        f"filter.decode_batch_size={a.decode_batch}",
        f"filter.num_actors={a.actors}",
        f"filter.gpus_per_actor={1.0 / a.actors if gpu else 0}",
        f"filter.cpus_per_actor={a.cpus_per_actor}",
        "ray.address=local",
        f"ray.num_cpus={a.procs}",
        f"ray.num_gpus={1 if gpu else 0}",
    ]
    cfg = load_config([], sets)
    t0 = time.perf_counter()
    init_ray(cfg.ray, extra="curation")
    ray_start = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_filter(cfg)
    seconds = time.perf_counter() - t0
    ray.shutdown()
    summary = json.loads((data_root / "scores" / "_summary.json").read_text())
    assert summary["in"] == a.n, summary
    return {
        "images_per_s": round(a.n / seconds, 1),
        "seconds": round(seconds, 2),
        "measure_seconds": summary["measure_seconds"],
        "ray_start_seconds": round(ray_start, 2),
        "kept": summary["out"],
        "rejected": summary["rejected"],
    }


def decode_capacity(images: Path, size: int, n: int, procs: int) -> dict:
    import numpy as np
    import pyarrow.parquet as pq

    from curation.decode import decode_image, resize_center_crop
    from curation.filters import identify_language

    t = pq.read_table(sorted(images.glob("*.parquet"))[0], columns=["jpg", "caption"])
    data, caps = t["jpg"].to_pylist()[:n], t["caption"].to_pylist()[:n]
    identify_language("warm up")
    t0 = time.perf_counter()
    for d, c in zip(data, caps, strict=True):
        dec = decode_image(d, draft_size=size)
        np.asarray(resize_center_crop(dec.image, size))
        identify_language(c)
    per_image = (time.perf_counter() - t0) / len(data)
    return {
        "ms_per_image_one_core": round(per_image * 1000, 3),
        "images_per_s_all_cores": round(procs / per_image, 1),
        "cores": procs,
    }


def gpu_decode(images: Path, model: dict, device: str, batch: int, precision: str, n: int) -> dict:
    """JPEG bytes -> nvJPEG decode on the device -> resize + crop -> CLIP image tower, timed."""
    import pyarrow.parquet as pq
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import functional as TF  # noqa: N812

    from curation.models import load_clip

    clip = load_clip(model["clip_model"], device=device, precision=precision)
    size = clip.image_size
    raw: list[bytes] = []
    for f in sorted(images.glob("*.parquet")):
        raw += pq.read_table(f, columns=["jpg"])["jpg"].to_pylist()
        if len(raw) >= n:
            break
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in raw[:n]]

    def run(part: list) -> None:
        imgs = decode_jpeg(part, mode=ImageReadMode.RGB, device=device)
        crops = [TF.center_crop(TF.resize(im, size, antialias=True), [size, size]) for im in imgs]
        clip.encode_images(torch.stack(crops).permute(0, 2, 3, 1))

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    run(data[:batch])  # warm-up (nvJPEG handles, kernels)
    sync()
    t0 = time.perf_counter()
    for s in range(0, len(data), batch):
        run(data[s : s + batch])
    sync()
    seconds = time.perf_counter() - t0
    return {
        "images_per_s": round(len(data) / seconds, 1),
        "images": len(data),
        "batch": batch,
        "what": "JPEG bytes -> decode_jpeg on the device -> resize + centre crop -> CLIP image tower",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny random CLIP instead of ViT-L/14 (smoke test)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--n", type=int, default=32000, help="rows the whole stage filters")
    p.add_argument("--unique", type=int, default=2000, help="distinct JPEGs the rows cycle over")
    p.add_argument("--shard-size", type=int, default=4000)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--decode-batch", type=int, default=128)
    p.add_argument("--actors", type=int, default=1, help="model actors sharing the GPU")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--precision", default=None, help="fp16 on GPU, fp32 on CPU by default")
    p.add_argument("--procs", type=int, default=os.cpu_count() or 2)
    p.add_argument("--workdir", default="/tmp/pd_bench_filter_gpu")
    p.add_argument("--gpu-decode-n", type=int, default=8192, help="images for the GPU decode measurement")
    a = p.parse_args()
    a.precision = a.precision or ("fp16" if a.device.startswith("cuda") else "fp32")
    if a.tiny:
        a.batch, a.iters = min(a.batch, 32), min(a.iters, 3)

    from paradiffusion.testing.tiny_clip import build_random_clip, build_tiny_clip

    root = Path(a.workdir)
    root.mkdir(parents=True, exist_ok=True)
    result: dict = {"machine": f"{platform.node()} {os.cpu_count()} cores", "args": vars(a)}
    try:
        import torch

        if torch.cuda.is_available():
            result["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    t0 = time.perf_counter()
    model = build_tiny_clip(root / "tiny") if a.tiny else build_random_clip(root / "vit_l14", "ViT-L-14")
    images = make_rows(root, a.n, min(a.unique, a.n), a.shard_size, a.procs)
    result["setup_seconds"] = round(time.perf_counter() - t0, 1)
    result["bare_model"] = bare_model(None if a.tiny else "ViT-L-14", model, a.device, a.batch, a.iters, a.precision)
    result["watermark_model"] = watermark_model(root, a.device, min(a.batch, 256), a.iters, a.precision)
    result["whole_stage"] = whole_stage(root, images, model, a)
    result["decode"] = decode_capacity(images, model["image_size"], 200, a.procs)
    result["gpu_decode"] = gpu_decode(images, model, a.device, a.batch, a.precision, min(a.n, a.gpu_decode_n))
    result["ratio_stage_to_bare_model"] = round(
        result["whole_stage"]["images_per_s"] / result["bare_model"]["images_per_s"], 3
    )
    print(json.dumps(result, indent=2))
    out = Path(os.environ.get("OUT") or root)
    out.mkdir(parents=True, exist_ok=True)
    (out / "filter_gpu.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'filter_gpu.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
