"""`make eval-generate`: N seeded images per prompt from each configured model.

Output: the ``eval_images`` table (:data:`eval.schemas.EVAL_IMAGES`) with PNG files
beside it::

    <images>/part-<model>__<prompt_set>__<NNNNN>.parquet   one committed shard per unit
    <images>/png/<model>/<prompt_set>/<prompt_id>_s<seed>.png

A *unit* is one model x one prompt set x ``prompts_per_shard`` prompts. A unit is
committed only when all its images are written, so a killed run resumes at the first
unfinished unit, and a rerun redoes nothing. Every PNG carries its prompt id, prompt,
model, seed and settings as PNG text metadata (the voting app strips it before serving).

Several GPUs: run one process per GPU; each takes the units ``i`` with
``i % world_size == rank`` (from ``--rank/--world-size`` or the ``RANK``/``WORLD_SIZE``
variables that ``torchrun`` and the deepspeed launcher set) and picks ``cuda:LOCAL_RANK``::

    torchrun --nproc_per_node 8 -m paradiffusion eval-generate --config pipelines.yaml

Units are independent, so ranks never wait for each other and any rank can be rerun.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import time

from eval.config import EvalConfig
from eval.paths import images_url
from eval.prompts import Prompt, load_from_config
from eval.schemas import EVAL_IMAGES
from paradiffusion.config import ConfigError, RootConfig
from paradiffusion.log import get_logger
from paradiffusion.stage import StageSummary, announce, progress
from paradiffusion.storage import Table, rows_to_table

log = get_logger("eval.generate")

STAGE = "eval-generate"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def plan_units(ecfg: EvalConfig, prompts: dict[str, list[Prompt]]) -> list[tuple[str, str, str, list[Prompt]]]:
    """Every (shard name, model, prompt set, prompts) the config asks for, in a stable order."""
    units = []
    for model in ecfg.generate.models or list(ecfg.models):
        for ps in ecfg.generate.prompt_sets or list(ecfg.prompt_sets):
            items = prompts[ps]
            n = ecfg.generate.prompts_per_shard
            for i in range(0, len(items), n):
                units.append((f"{model}__{ps}__{i // n:05d}", model, ps, items[i : i + n]))
    return units


def _png(image, meta: dict) -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for k, v in meta.items():
        info.add_text(k, v if isinstance(v, str) else json.dumps(v))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def generate_unit(
    model, ps: str, prompts: list[Prompt], table: Table, n_images: int, seed0: int, summary: StageSummary, bar=None
) -> list[dict]:
    """Make every image of one unit; a failed call becomes rows with ``error`` set."""
    settings = model.settings_json()
    items = [(p, seed0 + i) for p in prompts for i in range(n_images)]
    rows = []
    bs = model.config.batch_size
    for start in range(0, len(items), bs):
        batch = items[start : start + bs]
        t0 = time.time()
        try:
            images = model([p.text for p, _ in batch], [s for _, s in batch])
            error = None
        except Exception as exc:  # noqa: BLE001 - one bad batch is a counted reject, not a dead run
            images, error = [None] * len(batch), f"{type(exc).__name__}: {exc}"[:500]
            log.warning("%s on %s/%s: %s", model.name, ps, batch[0][0].prompt_id, error)
        per = (time.time() - t0) / len(batch)
        for (p, seed), im in zip(batch, images, strict=True):
            row = {
                "key": f"{model.name}/{ps}/{p.prompt_id}/{seed}",
                "model": model.name,
                "prompt_set": ps,
                "prompt_id": p.prompt_id,
                "category": p.category,
                "prompt": p.text,
                "seed": seed,
                "settings": settings,
                "seconds": per,
                "error": error,
            }
            if im is not None:
                rel = f"png/{_safe(model.name)}/{_safe(ps)}/{_safe(p.prompt_id)}_s{seed}.png"
                meta = {
                    "prompt_id": p.prompt_id,
                    "prompt_set": ps,
                    "prompt": p.text,
                    "model": model.name,
                    "seed": str(seed),
                    "settings": settings,
                }
                table.write_file(rel, _png(im, meta))
                row.update(image_path=rel, width=im.width, height=im.height)
                summary.n_out += 1
            else:
                summary.reject("generation_error")
            rows.append(row)
        if bar is not None:
            bar.update(len(batch))
    return rows


def run_generate(cfg: RootConfig, args: argparse.Namespace) -> int:
    """The `eval-generate` command."""
    from eval.models import load_model

    ecfg = cfg.eval
    if not ecfg.models:
        raise ConfigError("eval.models is empty: name at least one model (see the eval section of pipelines.yaml)")
    if not ecfg.prompt_sets:
        raise ConfigError("eval.prompt_sets is empty: name at least one prompt set")
    rank = args.rank if args.rank is not None else int(os.environ.get("RANK", 0))
    world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise ConfigError(f"rank {rank} must be in [0, world_size={world})")
    loaded = load_from_config(ecfg, ecfg.generate.prompt_sets)
    prompts = {k: v[0] for k, v in loaded.items()}
    table = Table(images_url(cfg), schema=EVAL_IMAGES)
    if world == 1:
        table.clean_tmp()  # with several ranks another one may be writing there right now
    units = plan_units(ecfg, prompts)
    mine = [u for i, u in enumerate(units) if i % world == rank]
    done = table.done_shards()
    todo = [u for u in mine if u[0] not in done]
    n_img = ecfg.generate.images_per_prompt
    summary = StageSummary(STAGE)
    summary.skipped_done = len(mine) - len(todo)
    for name, (_, report) in loaded.items():
        for reason, n in report.skipped.items():
            summary.reject(f"prompt_{reason}:{name}", n)
    announce(
        STAGE,
        {
            "prompt sets": ", ".join(f"{k} ({len(v)} prompts)" for k, v in prompts.items()),
            "models": ", ".join(ecfg.generate.models or ecfg.models),
            "images per prompt": f"{n_img} (seeds {ecfg.generate.seed}..{ecfg.generate.seed + n_img - 1})",
            "units (this rank)": f"{len(mine)} of {len(units)} (rank {rank}/{world}); {len(todo)} to do, "
            f"{len(mine) - len(todo)} already done",
            "output": table.url,
        },
    )
    table.save_config(cfg, STAGE, ecfg.generate)
    total = sum(len(u[3]) for u in todo) * n_img
    summary.n_in = total
    with progress(range(total), total=total, desc=STAGE, unit="img") as bar:
        for model_name in dict.fromkeys(u[1] for u in todo):
            model = load_model(model_name, ecfg.models[model_name], ecfg.generate.device)
            for shard, _, ps, items in (u for u in todo if u[1] == model_name):
                rows = generate_unit(model, ps, items, table, n_img, ecfg.generate.seed, summary, bar)
                table.write_shard(
                    shard, rows_to_table(rows, EVAL_IMAGES), meta={"model": model_name, "prompt_set": ps, "rank": rank}
                )
            del model
    summary.extra["rank"] = f"{rank}/{world}"
    summary.finish()
    table.save_json("_summary.json" if world == 1 else f"_summary.rank{rank}.json", summary.to_dict())
    summary.print()
    return 0


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rank", type=int, default=None, help="this process's rank (default: $RANK or 0)")
    p.add_argument("--world-size", type=int, default=None, help="number of processes (default: $WORLD_SIZE or 1)")
