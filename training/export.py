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

import torch

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
    weights: dict[str, torch.Tensor] | None = None,
    llm_dtype: str = "float32",
) -> Path:
    """Write ``model`` to ``out`` (replacing an older export atomically); returns ``out``.

    ``lora_from``: a LoRA folder to carry over when the LLM was not trained in this run
    (stage 3 keeps the stage-2 LoRA). ``weights``: whole fp32 tensors of the trained
    parameters by their name in ``model`` (``unet.*``, ``projection.*``, ``llm.*lora*``), the
    trainer's EMA or fp32 master weights; they are written instead of the module's own
    (bf16) ones, so the UNet, projection and LoRA of an export all come from the same source.
    ``llm_dtype``: the dtype the LLM computed the text states in during training, recorded so
    that ``generate`` samples with the same states.
    """
    from diffusers import DDPMScheduler

    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if weights is None:
        model.unet.save_pretrained(str(tmp / "unet"))
    else:
        _with_weights(model.unet, _part(weights, "unet.", model.unet)).save_pretrained(str(tmp / "unet"))
    if model.has_projection:
        state = None if weights is None else _part(weights, "projection.", model.projection)
        save_projection(model.projection, tmp / PROJECTION_DIR, state=state)
    if hasattr(model.llm, "peft_config"):
        lora = (
            None if weights is None else {k.removeprefix("llm."): v for k, v in weights.items() if k.startswith("llm.")}
        )
        model.llm.save_pretrained(str(tmp / LORA_DIR), state_dict=lora)
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
        "llm_dtype": llm_dtype,
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


def _part(weights: dict[str, torch.Tensor], prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The entries of ``weights`` under ``prefix``, which must cover every parameter of ``module``."""
    part = {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
    missing = [n for n, _ in module.named_parameters() if n not in part]
    if missing:
        raise ValueError(f"export weights lack {prefix}{missing[0]} (and {len(missing) - 1} more): not trained?")
    return part


def _with_weights(module, state: dict[str, torch.Tensor]):
    """A copy of a diffusers model (same class and config) holding ``state`` (fp32) as its
    parameters and the module's own buffers; built on the meta device, so no second set of
    weights is allocated (works under ZeRO-3 too: the module's partitioned weights are not read)."""
    params = {n for n, _ in module.named_parameters()}
    with torch.device("meta"):
        copy = type(module).from_config(module.config)
    full = {k: v for k, v in module.state_dict().items() if k not in params}
    full.update(state)
    copy.load_state_dict(full, strict=True, assign=True)
    return copy
