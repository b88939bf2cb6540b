"""The eval steps of `make demo`: generate with tiny models, score, a *simulated* vote, report.

The vote is simulated: scripted voters answer through the real HTTP API of the real
server on 127.0.0.1 (invite tokens, serving, sides, one vote per pair and question),
and the database and report are marked as simulated. Their votes say nothing about
the models, whose images are noise anyway.
"""

from __future__ import annotations

import os
import random
import sys

from paradiffusion.log import get_logger

log = get_logger("eval.demo")


def _models_dir(ctx):
    return ctx.out / "models"


def step_eval_generate(ctx) -> None:
    """Tiny ParaDiffusion (the demo's trained stage-3 export when there is one) vs a tiny diffusers baseline."""
    from eval.testing import build_tiny_paradiffusion, build_tiny_sd

    trained = ctx.state.get("stage3_export") or str(ctx.out / "data" / "train" / "stage3" / "export")
    if os.path.isfile(os.path.join(trained, "paradiffusion.json")):
        para = trained
        log.info("using the demo's stage-3 export %s", para)
    else:
        para = build_tiny_paradiffusion(_models_dir(ctx) / "eval_tiny_paradiffusion")
        log.info("no stage-3 export in this demo run: using an untrained tiny ParaDiffusion export")
    sd = build_tiny_sd(_models_dir(ctx) / "eval_tiny_sd")
    ctx.overrides += [f"eval.models.tiny-paradiffusion.path={para}", f"eval.models.tiny-sd.path={sd}"]
    ctx.cli("eval-generate")


def step_eval_metrics(ctx) -> None:
    """CLIP score (chunked), aesthetic, FID against the sample photos, PickScore and DPG-Bench
    (our sample question file, judged by the caption step's tiny VLM), with tiny models."""
    from eval.testing import build_tiny_pickscore
    from paradiffusion.testing.tiny_clip import build_tiny_clip
    from paradiffusion.testing.tiny_vlm import build_tiny_vlm

    tiny = build_tiny_clip(_models_dir(ctx) / "eval_tiny_clip")
    pick = build_tiny_pickscore(_models_dir(ctx) / "eval_tiny_pickscore")
    judge = build_tiny_vlm(_models_dir(ctx) / "tiny_vlm")  # the caption step's (reused when it ran)
    ctx.overrides += [
        f"eval.metrics.clip_model={tiny['clip_model']}",
        f"eval.metrics.aesthetic={tiny['aesthetic']}",
        f"eval.metrics.fid_reference={ctx.out / 'sample'}",
        f"eval.metrics.preference.pickscore={pick}",
        f"caption.captioners.tiny.model={judge}",
    ]
    ctx.cli("eval")


def step_eval_vote(ctx) -> None:
    """A SIMULATED vote: 8 scripted voters through the real HTTP API, then the Parquet export."""
    from eval.vote.admin import app_for, open_store, sync_pairs
    from eval.vote.server import serve_in_thread
    from eval.vote.simulate import run_voters

    cfg = ctx.config()
    store = open_store(cfg)
    sync_pairs(cfg, store).print()
    store.set_meta(
        "simulated",
        "make demo: 8 scripted voters answered through the HTTP API at random (with a lean towards image A).",
    )
    tokens = [store.add_voter(f"demo-voter-{i}") for i in range(8)]
    store.add_voter("demo-admin", role="admin")
    rng = random.Random(0)
    with serve_in_thread(app_for(cfg, store)) as url:
        print(f"   simulated voters -> {url}/api/vote", file=sys.stderr)
        runs = run_voters(url, tokens, choose=lambda task, q: rng.choices(["A", "B", "tie"], [5, 3, 2])[0])
    print(
        f"   simulated votes accepted: {sum(r.accepted for r in runs)}; progress: "
        f"{store.progress()['votes']} votes on {store.n_pairs()} pairs",
        file=sys.stderr,
    )
    ctx.cli("vote-admin", "export")


def step_eval_report(ctx) -> None:
    ctx.cli("eval-report")
