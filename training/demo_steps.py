"""`make demo` steps for training: the three stages and generation, with tiny models.

Each step runs the real CLI (``paradiffusion train --stage N`` / ``generate``) on what
the earlier demo steps wrote under ``<demo>/data``; the tiny LLM, UNet and VAE are
built into ``<demo>/models/tiny_diffusion``. A caption table an earlier step did not
produce (e.g. when the demo runs with ``--only``) is replaced by the alt text, and the
step says so.
"""

from __future__ import annotations

from paradiffusion.log import get_logger
from paradiffusion.storage import Table, join

log = get_logger("training.demo")


def _model_sets(ctx) -> list[str]:
    from paradiffusion.testing.tiny_diffusion import build_tiny_diffusion

    parts = build_tiny_diffusion(ctx.out / "models" / "tiny_diffusion")
    return [
        f"train.model.llm={parts['llm']}",
        f"train.model.unet={parts['unet']}",
        f"train.model.vae={parts['vae']}",
        f"train.model.scheduler={parts['scheduler']}",
    ]


def _has_table(url: str) -> bool:
    return bool(Table(url).done_shards())  # the data root may be a URL (demo --s3)


def step_train_stage1(ctx) -> None:
    """Stage 1: tiny UNet + projection on the kept images' alt text (LLM frozen)."""
    ctx.cli("train", "--stage", "1", extra_sets=_model_sets(ctx))


def step_train_stage2(ctx) -> None:
    """Stage 2: LoRA on the tiny LLM + UNet on the VLM captions (alt text if there are none)."""
    sets = _model_sets(ctx)
    if not _has_table(join(ctx.data, "captions")):
        log.warning("no captions table under %s: stage 2 trains on the alt text instead", ctx.data)
        sets.append("train.stage2.data.caption_source=alt_text")
    ctx.cli("train", "--stage", "2", extra_sets=sets)


def _stage3_sets(ctx) -> list[str]:
    sets = _model_sets(ctx)
    if not _has_table(join(ctx.data, "small_train")):
        log.warning("no approved ParaImage-Small table under %s: stage 3 trains on the alt text instead", ctx.data)
        sets.append("train.stage3.data.caption_source=alt_text")
    return sets


def step_cache_text_stage3(ctx) -> None:
    """The stage-3 LLM (stage-2 LoRA merged) run once over the approved texts: `cache-text --stage 3`."""
    ctx.cli("cache-text", "--stage", "3", extra_sets=_stage3_sets(ctx))


def step_train_stage3(ctx) -> None:
    """Stage 3: LLM frozen with the stage-2 LoRA merged; UNet on the approved ParaImage-Small descriptions,
    from the text cache when the cache-text step made one (the LLM is then not loaded)."""
    sets = _stage3_sets(ctx)
    cache = join(ctx.data, "text_cache", "stage3")
    if _has_table(cache):
        sets.append(f"train.stage3.data.text_cache={cache}")
    ctx.cli("train", "--stage", "3", extra_sets=sets)


def step_generate(ctx) -> None:
    """Generate two PNGs with the stage-3 export (prompt and settings in the PNG metadata)."""
    from paradiffusion.storage import is_url

    if is_url(ctx.data):  # the run folder is on object storage: generate from its local staging copy
        from training.trainer import staging_folder

        export = join(staging_folder(ctx.config(), join(ctx.data, "train", "stage3")), "export")
        ctx.state["stage3_export"] = export
        ctx.overrides.append(f"generate.model={export}")
    ctx.cli(
        "generate",
        "--prompt",
        "A red fox sitting in fresh snow at dawn.",
        "--prompt",
        "A cosy reading nook by a rainy window, a cup of tea on the sill and a cat asleep on a blanket.",
    )
