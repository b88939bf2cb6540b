"""CPU benchmark: the filter stage (Ray Data) beside a bare multiprocessing loop, same run.

Fixture: ``--n`` JPEGs at web-like sizes (500-1000 px a side), made from the bundled
photographs (random crops, flips, sizes, JPEG qualities: no two files alike) and
written as img2dataset shards. Model: an open_clip architecture with random weights
(``--model``: ``ViT-B-32`` by default, ``tiny`` for a quick check, ``ViT-L-14`` for the
real one) plus the aesthetic MLP. Nothing is downloaded.

Three measurements in one run:

1. **where the time goes**: one process, one thread, per image: decode (full and
   reduced-size JPEG), resize, hashing + language id, image model, text model.
2. **bare loop**: ``multiprocessing`` with one process per core, each loading the
   model once and running the same functions as the stage (decode, preprocess,
   CLIP, aesthetic, filters) shard by shard, writing nothing.
3. **pipeline**: ``run_filter`` as a user runs it (Ray Data on a local Ray with one
   CPU per core, one model actor per core), from reading the shards to the
   committed ``scores`` table. Ray's start-up is timed apart.

4. **NSFW head** (LAION's detector on the CLIP image embedding, random weights at the
   model's embedding width), side by side: the bare loop without and with
   ``filter.models.nsfw``, alternating for ``--rounds`` rounds (the load of a shared
   machine drifts; the median ratio is quoted), each timed as wall time and as the
   workers' CPU time (process time, which other jobs inflate far less), and its ms per
   image in the breakdown. The goal is < 3 % more CPU time. The breakdown also times
   LAION's watermark model (random weights) per image.

The goal is pipeline / bare >= 0.8. Usage::

    python bench/filter_cpu.py --n 2000             # the full run (several minutes)
    python bench/filter_cpu.py --n 200 --model tiny # a quick check
    python bench/filter_cpu.py --n 400 --shard-size 100 --no-pipeline  # NSFW rounds only

Writes filter_cpu.json into $OUT (or --workdir).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


# --------------------------------------------------------------------------- fixture
def _make_image(args: tuple[int, str, int]) -> tuple[str, bytes]:
    import numpy as np
    from PIL import Image

    i, photo, seed = args
    rng = np.random.default_rng(seed + i)
    img = Image.open(photo).convert("RGB")
    w, h = img.size
    cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = img.crop((x, y, x + cw, y + ch))
    long_side = int(rng.integers(500, 1001))
    scale = long_side / max(cw, ch)
    img = img.resize(
        (
            max(500, round(cw * scale)) if cw >= ch else round(cw * scale),
            max(500, round(ch * scale)) if ch > cw else round(ch * scale),
        ),
        Image.Resampling.BICUBIC,
    )
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(rng.integers(80, 96)))
    return f"img_{i:06d}.jpg", buf.getvalue()


def make_fixture(root: Path, n: int, shard_size: int, procs: int) -> Path:
    """``n`` varied JPEGs as img2dataset shards under ``root/images`` (reused when present)."""

    from paradiffusion.testing.image_shards import write_image_shard
    from paradiffusion.testing.sample import ENGLISH, PHOTOS, _photo_path

    images = root / "images"
    if (images / "_complete.json").is_file() and json.loads((images / "_complete.json").read_text())["n"] == n:
        return images
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True)
    photos = [str(_photo_path(name)) for name in PHOTOS]
    captions = list(PHOTOS.values()) + ENGLISH
    jobs = [(i, photos[i % len(photos)], 0) for i in range(n)]
    with mp.Pool(procs) as pool:
        made = pool.map(_make_image, jobs, chunksize=16)
    for s, start in enumerate(range(0, n, shard_size)):
        rows = [
            {
                "key": f"{s:05d}{j:04d}",
                "url": f"http://bench.local/{name}",
                "caption": captions[(start + j) % len(captions)],
                "jpg": data,
                "status": "success",
                "error_message": None,
            }
            for j, (name, data) in enumerate(made[start : start + shard_size])
        ]
        write_image_shard(images, f"{s:05d}", rows)
    (images / "_complete.json").write_text(json.dumps({"n": n}))
    return images


def build_model(root: Path, name: str) -> dict:
    from paradiffusion.testing.tiny_clip import build_random_clip, build_tiny_clip

    if name == "tiny":
        return build_tiny_clip(root / "models" / "tiny")
    return build_random_clip(root / "models" / name, name, half=False)


def build_nsfw(root: Path, model: dict) -> str:
    """The NSFW head with random weights at the CLIP model's embedding width."""
    import torch
    from safetensors.torch import save_file

    from curation.models import load_clip
    from curation.safety.nsfw import NSFWHead

    torch.manual_seed(0)
    path = root / "models" / f"nsfw_{Path(model['clip_model']).name}.safetensors"
    save_file(NSFWHead(load_clip(model["clip_model"], device="cpu").embed_dim).state_dict(), path)
    return str(path)


def filter_sets(data_root: Path, model: dict, batch_size: int, procs: int) -> list[str]:
    return [
        f"project.data_root={data_root}",
        f"filter.models.clip_model={model['clip_model']}",
        f"filter.models.aesthetic={model['aesthetic']}",
        "filter.models.device=cpu",
        "filter.thresholds.min_short_side=256",
        "filter.thresholds.aesthetic_min=null",
        "filter.thresholds.clip_score_min=null",
        f"filter.batch_size={batch_size}",
        f"filter.decode_batch_size={batch_size}",
        f"filter.num_actors={procs}",
        "filter.cpus_per_actor=1",
        "filter.torch_threads=1",
        "ray.address=local",
        f"ray.num_cpus={procs}",
    ]


# --------------------------------------------------------------------------- 1. breakdown
def breakdown(images: Path, model: dict, n: int, nsfw: str | None = None) -> dict:
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from curation.decode import decode_image, resize_center_crop
    from curation.filters import identify_language
    from curation.models import load_aesthetic, load_clip

    torch.set_num_threads(1)
    clip = load_clip(model["clip_model"], device="cpu")
    aes = load_aesthetic(model["aesthetic"], device="cpu")
    t = pq.read_table(sorted(images.glob("*.parquet"))[0], columns=["jpg", "caption"])
    data, captions = t["jpg"].to_pylist()[:n], t["caption"].to_pylist()[:n]
    size = clip.image_size
    timings: dict[str, float] = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        timings[name] = (time.perf_counter() - t0) / len(data) * 1000
        return out

    identify_language("warm up: load the language model")
    timed("decode, full size", lambda: [decode_image(d) for d in data])
    decoded = timed("decode, reduced JPEG (used)", lambda: [decode_image(d, draft_size=size) for d in data])
    px = timed("resize + centre crop", lambda: np.stack([resize_center_crop(d.image, size) for d in decoded]))
    timed("language id", lambda: [identify_language(c) for c in captions])
    emb = timed(
        "CLIP image tower", lambda: np.concatenate([clip.encode_images(px[i : i + 32]) for i in range(0, len(px), 32)])
    )
    timed(
        "CLIP text tower",
        lambda: np.concatenate([clip.encode_texts(captions[i : i + 32]) for i in range(0, len(captions), 32)]),
    )
    timed("aesthetic MLP", lambda: aes.score(emb))
    if nsfw:
        from curation.safety.nsfw import load_nsfw

        head = load_nsfw(nsfw)
        timed("NSFW head", lambda: head.score(emb))
    # LAION's watermark detector (off by default on CPU), random weights: its cost per image
    from curation.safety.watermark import WatermarkModel, build_watermark_net, watermark_pixels

    wm = WatermarkModel(build_watermark_net(), torch.device("cpu"))
    few = decoded[: min(16, len(decoded))]
    wpx = np.stack([watermark_pixels(d.image) for d in few])
    wm.score(wpx[:8])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(wpx), 8):
        wm.score(wpx[i : i + 8])
    timings["watermark model (off by default)"] = (time.perf_counter() - t0) / len(few) * 1000
    return {k: round(v, 3) for k, v in timings.items()}


# --------------------------------------------------------------------------- 2. bare loop
_SCORER = None


def _init_worker(fcfg: dict) -> None:
    global _SCORER
    import torch

    from curation.filter import Scorer

    torch.set_num_threads(1)
    _SCORER = Scorer(fcfg, keep_embeddings=False, torch_threads=1)


def _bare_shard(job: tuple[str, str, dict, int, int]) -> tuple[int, float]:
    """Rows of one shard and the worker's CPU seconds on it (process time: what other
    jobs on a shared machine do not inflate, unlike wall time)."""
    from curation.filter import measure_table

    shard, url, fcfg, image_size, chunk = job
    c0 = time.process_time()
    rows = measure_table(shard, url, fcfg, image_size, _SCORER, chunk).num_rows
    return rows, time.process_time() - c0


def bare_loop(images: Path, sets: list[str], procs: int) -> tuple[float, int, float]:
    """Wall seconds, rows and the workers' summed CPU seconds (model loading not counted)."""
    from curation.models import clip_input_size
    from paradiffusion.images import image_shards
    from pipelines.config import load_config

    cfg = load_config([], sets)
    fcfg = cfg.filter.model_dump(mode="json")
    size = clip_input_size(cfg.filter.models.clip_model)
    jobs = [(s, u, fcfg, size, cfg.filter.decode_batch_size) for s, u in image_shards(str(images))]
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(procs, initializer=_init_worker, initargs=(fcfg,)) as pool:
        done = list(pool.imap_unordered(_bare_shard, jobs))
    return time.perf_counter() - t0, sum(r for r, _ in done), sum(c for _, c in done)


def nsfw_rounds(images: Path, sets: list[str], nsfw: str, procs: int, rounds: int) -> list[dict]:
    """The bare loop without and with the NSFW head, alternating, ``rounds`` times: on a
    shared machine the load drifts, so each pair is compared and the median ratio quoted."""
    out = []
    for r in range(rounds):
        off_s, off_n, off_cpu = bare_loop(images, sets, procs)
        on_s, on_n, on_cpu = bare_loop(images, sets + [f"filter.models.nsfw={nsfw}"], procs)
        assert off_n == on_n, (off_n, on_n)
        row = {
            "round": r + 1,
            "rows": off_n,
            "without_wall_s": round(off_s, 2),
            "with_wall_s": round(on_s, 2),
            "without_cpu_s": round(off_cpu, 2),
            "with_cpu_s": round(on_cpu, 2),
            "added_wall": round(on_s / off_s - 1, 4),
            "added_cpu": round(on_cpu / off_cpu - 1, 4),
            "load_average": round(os.getloadavg()[0], 2),
        }
        print(f"  NSFW round {r + 1}: {row}", file=sys.stderr)
        out.append(row)
    return out


# --------------------------------------------------------------------------- 3. pipeline
def pipeline(root: Path, images: Path, sets: list[str]) -> tuple[float, float, dict]:
    import ray

    from curation.filter import run_filter
    from paradiffusion.raycluster import init_ray
    from pipelines.config import load_config

    data_root = root / "pipeline_run"
    shutil.rmtree(data_root, ignore_errors=True)
    data_root.mkdir(parents=True)
    os.symlink(images, data_root / "images")
    cfg = load_config([], sets + [f"project.data_root={data_root}"])
    t0 = time.perf_counter()
    init_ray(cfg.ray, extra="curation")
    ray_start = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_filter(cfg)
    seconds = time.perf_counter() - t0
    ray.shutdown()
    summary = json.loads((data_root / "scores" / "_summary.json").read_text())
    return seconds, ray_start, summary


def main() -> None:
    import statistics

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000, help="fixture images (>= 2000 for the reported figure)")
    p.add_argument("--model", default="ViT-B-32", help="tiny | any open_clip name (random weights)")
    p.add_argument("--procs", type=int, default=os.cpu_count() or 2, help="processes / Ray CPUs (one per core)")
    p.add_argument("--shard-size", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--breakdown-n", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3, help="NSFW side-by-side rounds (bare loop off / on)")
    p.add_argument("--no-pipeline", action="store_true", help="skip the Ray Data pipeline (NSFW rounds only)")
    p.add_argument("--workdir", default="/tmp/pd_bench_filter")
    a = p.parse_args()

    root = Path(a.workdir)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    images = make_fixture(root, a.n, a.shard_size, a.procs)
    print(f"fixture: {a.n} images in {images} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    model = build_model(root, a.model)
    sets = filter_sets(root, model, a.batch_size, a.procs)

    nsfw = build_nsfw(root, model)
    load_before = os.getloadavg()
    parts = breakdown(images, model, min(a.breakdown_n, a.shard_size, a.n), nsfw)
    print(f"  breakdown, ms per image on one thread: {parts}", file=sys.stderr)
    rounds = nsfw_rounds(images, sets, nsfw, a.procs, a.rounds)
    assert all(r["rows"] == a.n for r in rounds), [r["rows"] for r in rounds]
    bare_s = statistics.median(r["without_wall_s"] for r in rounds)
    nsfw_s = statistics.median(r["with_wall_s"] for r in rounds)
    pipe_s = ray_start = summary = None
    if not a.no_pipeline:
        pipe_s, ray_start, summary = pipeline(root, images, sets)
        assert summary["in"] == a.n, summary["in"]

    used = (
        "decode, reduced JPEG (used)",
        "resize + centre crop",
        "language id",
        "CLIP image tower",
        "CLIP text tower",
        "aesthetic MLP",
        "NSFW head",
    )
    total = sum(parts[k] for k in used)
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "load_average_1_5_15_before": [round(x, 2) for x in load_before],
        "load_average_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
        "n": a.n,
        "model": a.model,
        "procs": a.procs,
        "batch_size": a.batch_size,
        "bare_loop_images_per_s": round(a.n / bare_s, 2),
        "bare_loop_seconds_median": round(bare_s, 2),
        "bare_loop_with_nsfw_seconds_median": round(nsfw_s, 2),
        "nsfw_rounds": rounds,
        "nsfw_added_cpu_median": statistics.median(r["added_cpu"] for r in rounds),
        "nsfw_added_wall_median": statistics.median(r["added_wall"] for r in rounds),
        "nsfw_share_of_per_image_cpu": round(parts["NSFW head"] / total, 5),
        "ms_per_image_one_thread": parts,
    }
    if pipe_s is not None:
        result.update(
            pipeline_images_per_s=round(a.n / pipe_s, 2),
            pipeline_seconds=round(pipe_s, 2),
            ratio_pipeline_to_bare=round(bare_s / pipe_s, 3),
            ray_start_seconds=round(ray_start, 2),
            pipeline_kept=summary["out"],
        )
    print(f"\nfilter CPU benchmark: {a.n} images, {a.model} (random weights), {a.procs} processes, {result['machine']}")
    print(f"  load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}")
    print(f"  {'':34s} {'images/s':>9s} {'seconds':>8s}  (median of {a.rounds} rounds)")
    print(f"  {'bare loop (multiprocessing)':34s} {result['bare_loop_images_per_s']:9.1f} {bare_s:8.1f}")
    print(f"  {'bare loop + NSFW head':34s} {a.n / nsfw_s:9.1f} {nsfw_s:8.1f}")
    if pipe_s is not None:
        print(f"  {'filter stage (Ray Data)':34s} {result['pipeline_images_per_s']:9.1f} {pipe_s:8.1f}")
        print(
            f"  ratio pipeline / bare: {result['ratio_pipeline_to_bare']:.2f}   (goal >= 0.8; Ray start-up "
            f"{ray_start:.1f} s not counted)"
        )
    print(
        f"  NSFW head, side by side (median of {a.rounds} rounds): {100 * result['nsfw_added_cpu_median']:+.2f} % "
        f"worker CPU time, {100 * result['nsfw_added_wall_median']:+.2f} % wall time; "
        f"{100 * result['nsfw_share_of_per_image_cpu']:.3f} % of the per-image CPU time in the breakdown "
        "(goal < 3 %)"
    )
    print("\n  where the time goes (one process, one thread, ms per image):")
    for k, v in parts.items():
        share = f"{100 * v / total:5.1f} %" if k in used else "  (not used)"
        print(f"    {k:30s} {v:8.2f}  {share}")
    out = Path(os.environ.get("OUT") or root)
    out.mkdir(parents=True, exist_ok=True)
    (out / "filter_cpu.json").write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out / 'filter_cpu.json'}")


if __name__ == "__main__":
    main()
