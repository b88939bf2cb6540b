"""``paradiffusion generate``: prompts -> PNGs, with the prompt and settings in the PNG metadata."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from paradiffusion.config import RootConfig
from paradiffusion.stage import StageSummary, announce, progress
from paradiffusion.storage import Table, join


def _slug(text: str, n: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n].strip("-")
    return s or "prompt"


#: demo.py's seed: every prompt of the release's demo starts from it.
RELEASE_SEED = 45


def sampling_plan(gc, device: torch.device) -> dict:
    """How ``generate`` samples under ``generate.preset``: ``dtype`` (UNet and VAE), ``seeds``
    (prompt index -> seed), ``generator_device``, ``latent_dtype`` (the noise's and the latents').

    ``release`` does what the release's demo does: fp16 UNet and VAE on a GPU, one seed (45) for
    every prompt, the noise drawn by a generator on the pipeline's device (CUDA on a GPU) in the
    UNet's dtype, the latents stepped in it. Settings given explicitly (``seed``, ``dtype``) win.
    """
    from training.pipeline import default_device_dtype

    if gc.preset == "release":
        auto = gc.dtype == "auto"
        _, dtype = default_device_dtype(device, "float16" if auto and device.type == "cuda" else gc.dtype)
        seed = gc.seed if gc.seed is not None else RELEASE_SEED
        return {"dtype": dtype, "seeds": lambda i: seed, "generator_device": device, "latent_dtype": dtype}
    _, dtype = default_device_dtype(device, gc.dtype)
    seed = gc.seed or 0
    return {"dtype": dtype, "seeds": lambda i: seed + i, "generator_device": torch.device("cpu"),
            "latent_dtype": torch.float32}  # fmt: skip


def generate(cfg: RootConfig, prompts: list[str]) -> list[Path]:
    """Generate one PNG per prompt into ``generate.output``; returns the files written.

    A file is named ``<index>-<slug>-<hash>.png``; the hash covers the prompt and every
    setting, so a rerun with the same settings skips files that exist (resumable).
    """
    from PIL.PngImagePlugin import PngInfo

    from training.pipeline import ParaDiffusionPipeline, default_device_dtype

    gc = cfg.generate
    root = cfg.project.data_root
    model = gc.model or join(root, "train", "stage3", "export")
    out = Path(gc.output or join(root, "generated"))
    device, _ = default_device_dtype(gc.device, gc.dtype)
    plan = sampling_plan(gc, device)
    dtype = plan["dtype"]
    settings = {
        **({"preset": gc.preset} if gc.preset != "default" else {}),  # (file names of default runs unchanged)
        "model": model,
        "width": gc.width,
        "height": gc.height,
        "num_inference_steps": gc.num_inference_steps,
        "guidance_scale": gc.guidance_scale,
        "negative_prompt": gc.negative_prompt,
        "seed": plan["seeds"](0),
        "dtype": str(dtype).removeprefix("torch."),
        "llm_dtype": gc.llm_dtype,
        "max_length": gc.max_length,
        "conditioning": gc.conditioning,
        "scheduler": "DPMSolverMultistepScheduler",
    }
    announce(
        "generate",
        {
            "model": model,
            "prompts": len(prompts),
            "size": f"{gc.width}x{gc.height}",
            "steps / guidance": f"{gc.num_inference_steps} / {gc.guidance_scale}",
            "device": f"{device} {settings['dtype']}",
            "output": str(out),
        },
    )
    summary = StageSummary("generate")
    out.mkdir(parents=True, exist_ok=True)
    Table(str(out)).save_config(cfg, "generate")
    todo = []
    for i, p in enumerate(prompts):
        h = hashlib.sha256(json.dumps({"prompt": p, **settings}, sort_keys=True).encode()).hexdigest()[:8]
        f = out / f"{i:04d}-{_slug(p)}-{h}.png"
        summary.n_in += 1
        if f.exists():
            summary.skipped_done += 1
        else:
            todo.append((i, p, f))
    written = []
    if todo:
        pipe = ParaDiffusionPipeline.from_pretrained(
            model,
            llm=gc.llm,
            vae=gc.vae,
            torch_dtype=dtype,
            device=device,
            max_length=gc.max_length,
            conditioning=gc.conditioning,
            llm_dtype=gc.llm_dtype,
        )
        # what the model folder said (paradiffusion.json, or the release's settings): in the PNGs
        settings.update(
            max_length=pipe.max_length,
            conditioning=pipe.conditioning,
            llm_dtype=str(next(pipe.llm.parameters()).dtype).removeprefix("torch."),
        )
        for i, p, f in progress(todo, total=len(todo), desc="generate", unit="img"):
            g = torch.Generator(device=plan["generator_device"]).manual_seed(plan["seeds"](i))
            img = pipe(
                p,
                negative_prompt=gc.negative_prompt,
                height=gc.height,
                width=gc.width,
                num_inference_steps=gc.num_inference_steps,
                guidance_scale=gc.guidance_scale,
                generator=g,
                latent_dtype=plan["latent_dtype"],
            )[0]
            meta = PngInfo()
            meta.add_text("prompt", p)
            meta.add_text("parameters", json.dumps({**settings, "seed": plan["seeds"](i)}))
            tmp = f.with_suffix(".png.tmp")
            img.save(tmp, format="PNG", pnginfo=meta)
            tmp.replace(f)
            written.append(f)
            summary.n_out += 1
    summary.finish()
    summary.print()
    Table(str(out)).save_json("_summary.json", summary.to_dict())
    return written
