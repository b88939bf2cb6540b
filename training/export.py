"""Export a trained model in the layout of the official ParaDiffusion release.

::

    <export>/
      unet/                 UNet2DConditionModel (diffusers save_pretrained)
      text_encoder_lora/    the LLM's LoRA (peft adapter), from stage 2 on
      scheduler/            the training noise schedule (DDPM config; the pipeline samples with DPM-Solver)
      text_projection/      only for ``text_projection: linear``: the Linear(LLM width -> cross-attention
                            width), config.json + model.safetensors
      paradiffusion.json    where the LLM and VAE come from (HF id or path) and how to condition on text:
                            max_length, conditioning, text_projection; stage, step

Without ``text_projection/`` (the default model) the folder is what the release's own
code loads: its ``StableDiffusionLlamaPipeline`` with ``LlamaModel`` from the named LLM,
the LoRA from ``text_encoder_lora/`` and ``tokenizer.model_max_length`` = ``max_length``
(``scripts/release_parity.py`` does exactly that).

The LLM and the VAE are not copied (13 GB and unchanged): they are named by id or path,
like the release names ``Llama-2-7b-hf/`` and ``sdxl-vae-fp16-fix/``. The folder is
written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from paradiffusion.log import get_logger
from training.modeling import (
    LORA_DIR,
    PROJECTION_DIR,
    ParaDiffusionModel,
    make_lora_config_portable,
    save_projection,
)

log = get_logger("training.export")

EXPORT_INFO = "paradiffusion.json"
#: 2: paradiffusion.json has ``conditioning`` and ``text_projection`` (an export without them
#: was trained with masked conditioning and a projection).
EXPORT_FORMAT = 2


def export_model(
    model: ParaDiffusionModel,
    out: str | Path,
    *,
    llm: str,
    vae: str,
    scheduler_config: dict,
    max_length: int,
    llm_revision: str | None = None,
    stage: int | None = None,
    step: int | None = None,
    lora_from: str | Path | None = None,
    ema: bool = False,
) -> Path:
    """Write ``model`` to ``out`` (replacing an older export atomically); returns ``out``.

    ``lora_from``: a LoRA folder to carry over when the LLM was not trained in this run
    (stage 3 keeps the stage-2 LoRA).
    """
    from diffusers import DDPMScheduler

    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.unet.save_pretrained(str(tmp / "unet"))
    if model.has_projection:
        save_projection(model.projection, tmp / PROJECTION_DIR)
    if hasattr(model.llm, "peft_config"):
        model.llm.save_pretrained(str(tmp / LORA_DIR))
    elif lora_from is not None:
        shutil.copytree(lora_from, tmp / LORA_DIR)
    if (tmp / LORA_DIR).is_dir():
        kept = make_lora_config_portable(tmp / LORA_DIR)
        if kept:
            log.warning("the LoRA uses %s: the release's code (peft 0.7) cannot load this export", ", ".join(kept))
    DDPMScheduler.from_config(scheduler_config).save_pretrained(str(tmp / "scheduler"))
    info = {
        "llm": llm,
        "llm_revision": llm_revision,
        "vae": vae,
        "max_length": max_length,
        "conditioning": model.conditioning,
        "text_projection": "linear" if model.has_projection else "none",
        "format": EXPORT_FORMAT,
        "stage": stage,
        "step": step,
        "ema_weights": ema,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=1))
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    log.info("exported stage %s step %s to %s", stage, step, out)
    return out
