"""Captioning against an OpenAI-compatible server: the whole caption stage vs a bare asyncio client.

Starts one real server on 127.0.0.1 (``transformers serve`` of a tiny random LLaVA,
paradiffusion.testing; no download), writes an images + scores table of random images,
and at each concurrency runs, side by side in one process and interleaved over
``--repeats`` rounds:

- **stage**: ``run_caption`` with a ``type: openai`` captioner (plan, decode, resize,
  data URLs, requests, quality flags, committed shards), a fresh output table each time;
- **bare**: an asyncio + httpx client posting the same chat completion requests (bodies
  built before the clock starts) with a semaphore of the same size, nothing written.

captions/s is images / wall seconds; the figure that matters is stage / bare (goal: >= 0.8).
``transformers serve`` runs one generate at a time (it does not batch), so the server, not
the client, sets the ceiling here; an engine that batches (vLLM, lmdeploy) raises it.

Usage: python bench/caption_endpoint.py [--images 64] [--concurrency 1,4,16,64] [--new-tokens 8]
       [--executor local|ray] [--endpoint URL --model NAME  (an already running server)]
Writes caption_endpoint.json into $OUT (default: bench_out/).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def write_tables(root: Path, n: int, seed: int = 0) -> list:
    """``n`` random JPEGs (64-160 px) in one images shard + a scores table keeping all; returns the PIL images."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from paradiffusion.schemas import SCORES
    from paradiffusion.storage import Table

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows, scores, images = [], [], []
    for i in range(n):
        w, h = (int(x) for x in rng.integers(64, 161, 2))
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=95)
        key = f"00000{i:04d}"
        rows.append({"key": key, "url": f"http://example.invalid/{key}.jpg", "jpg": buf.getvalue(), "status": "success",
                     "width": w, "height": h})  # fmt: skip
        scores.append({"key": key, "shard": "00000", "width": w, "height": h, "kept": True, "reject_reason": None})
        images.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    pq.write_table(pa.Table.from_pylist(rows), root / "images" / "00000.parquet", row_group_size=100)
    (root / "images" / "00000_stats.json").write_text(json.dumps({"count": n}))
    Table(str(root / "scores"), SCORES).write_shard("00000", pa.Table.from_pylist(scores, schema=SCORES))
    return images


async def bare(url: str, bodies: list[dict], concurrency: int) -> float:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one(body):
            async with sem:
                r = await client.post("/chat/completions", json=body)
                r.raise_for_status()

        t0 = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--executor", default="local", choices=["local", "ray"])
    p.add_argument("--endpoint", default=None, help="an already running server's base URL (…/v1)")
    p.add_argument("--model", default=None, help="the model name that server serves (with --endpoint)")
    a = p.parse_args()

    from captioning.config import PAPER_PROMPT, GenerationSettings, ImagePrep
    from captioning.openai_client import data_url, request_body
    from captioning.pipeline import run_caption
    from captioning.prep import resize
    from paradiffusion.testing.openai_server import TransformersServe
    from paradiffusion.testing.tiny_vlm import build_tiny_vlm
    from pipelines.config import load_config

    tmp = Path(tempfile.mkdtemp(prefix="bench_endpoint_"))
    images = write_tables(tmp / "data", a.images)
    server = None
    if a.endpoint:
        url, model = a.endpoint.rstrip("/"), a.model
    else:
        model = build_tiny_vlm(Path(tempfile.gettempdir()) / "bench_tiny_vlm_endpoint", hidden_size=128, layers=2)
        t0 = time.perf_counter()
        server = TransformersServe(model, log_path=str(tmp / "serve.log")).start()
        print(f"transformers serve up in {time.perf_counter() - t0:.1f} s at {server.url}", flush=True)
        url = server.url
    gen = GenerationSettings(max_new_tokens=a.new_tokens)
    prep = ImagePrep()
    bodies = [request_body(model, PAPER_PROMPT, data_url(resize(im, prep, -1), "png", 95), gen, {}) for im in images]
    levels = [int(x) for x in a.concurrency.split(",")]
    results: dict[str, dict[str, list[float]]] = {str(c): {"stage": [], "bare": [], "loop": []} for c in levels}
    try:
        asyncio.run(bare(url, bodies[:4], 4))  # warm-up
        for r in range(a.repeats):
            for c in levels:
                results[str(c)]["bare"].append(a.images / asyncio.run(bare(url, bodies, c)))
                server_cfg = json.dumps({"endpoints": [url], "concurrency": c})
                cfg = load_config(
                    [],
                    [
                        f"project.data_root={tmp / 'data'}",
                        f"caption.output={tmp / f'captions_{c}_{r}'}",
                        "caption.captioner=srv",
                        f"caption.captioners={{srv: {{type: openai, model: '{model}', server: {server_cfg}}}}}",
                        f"caption.generation.max_new_tokens={a.new_tokens}",
                        f"caption.chunk_rows={max(64, 4 * c)}",
                        f"caption.resources.executor={a.executor}",
                        "caption.quality.language=null",
                        "ray.address=local",
                        "ray.num_cpus=2",
                    ],
                )
                t0 = time.perf_counter()
                s = run_caption(cfg)
                dt = time.perf_counter() - t0
                assert s.n_out == a.images, s.to_dict()
                results[str(c)]["stage"].append(a.images / dt)
                results[str(c)]["loop"].append(s.extra["captions_per_s"])  # the caption loop alone (no plan/probe)
                print(f"round {r} concurrency {c}: bare {results[str(c)]['bare'][-1]:.2f}, "
                      f"stage {results[str(c)]['stage'][-1]:.2f} captions/s", flush=True)  # fmt: skip
    finally:
        if server:
            server.stop()
    table = {}
    for c, v in results.items():
        b, s = statistics.median(v["bare"]), statistics.median(v["stage"])
        loop = statistics.median(v["loop"])
        table[c] = {
            "bare_captions_per_s": round(b, 2),
            "stage_captions_per_s": round(s, 2),
            "ratio": round(s / b, 3),
            "stage_loop_captions_per_s": round(loop, 2),
            "loop_ratio": round(loop / b, 3),
        }
    out = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs (shared)",
        "server": "transformers serve (tiny random LLaVA, CPU)" if server else url,
        "images": a.images,
        "new_tokens": a.new_tokens,
        "executor": a.executor,
        "repeats": a.repeats,
        "results": table,
    }
    print(json.dumps(out, indent=2))
    dest = Path(os.environ.get("OUT", "bench_out"))
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "caption_endpoint.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
