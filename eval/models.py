"""One interface for every text-to-image model under evaluation.

A loader takes a :class:`~eval.config.ModelConfig` and a device and returns a
:class:`TextToImage`: ``model(prompts, seeds) -> list[PIL.Image]``, one image per
(prompt, seed), the noise of each image drawn from a CPU generator seeded with its
seed (so the same seed gives the same starting noise on any device). Loaders are
looked up by the config's ``kind`` in :data:`LOADERS`; a new kind of model is one more
entry, not another ``if``.

- ``paradiffusion``: our exported checkpoints and the official release
  (``weijiawu/ParaDiffusion``) through ``training.pipeline.ParaDiffusionPipeline``.
- ``diffusers``: any ``DiffusionPipeline`` by Hugging Face id or local folder, e.g.
  ``stabilityai/stable-diffusion-xl-base-1.0``, ``PixArt-alpha/PixArt-Sigma-XL-2-1024-MS``
  (a diffusers-format repo), or a local folder. DeepFloyd IF is a cascade of three
  pipelines; ``DeepFloyd/IF-I-XL-v1.0`` alone gives its 64x64 first stage (see the README).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from eval.config import ModelConfig
from paradiffusion.log import get_logger

log = get_logger("eval.models")

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def resolve_device(device: str) -> str:
    """``auto``: ``cuda:<LOCAL_RANK>`` when CUDA is there (one process per GPU), else ``cpu``."""
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    return "cpu"


def torch_dtype(name: str, device: str):
    """The torch dtype for a config name; half precision on CPU falls back to fp32."""
    import torch

    if device.startswith("cpu") and name != "fp32":
        log.info("dtype %s on CPU: using fp32 instead", name)
        name = "fp32"
    return getattr(torch, _DTYPES[name])


@dataclass
class TextToImage:
    """A loaded model and the settings it generates with."""

    name: str
    config: ModelConfig
    device: str
    call: Callable[[list[str], list[int]], list[Any]]

    def __call__(self, prompts: list[str], seeds: list[int]) -> list[Any]:
        if len(prompts) != len(seeds):
            raise ValueError("one seed per prompt")
        images = self.call(prompts, seeds)
        if len(images) != len(prompts):
            raise RuntimeError(f"{self.name}: asked for {len(prompts)} images, got {len(images)}")
        return images

    def settings(self) -> dict:
        """What goes with every image: enough to make it again."""
        c = self.config
        return {
            "kind": c.kind,
            "path": c.path,
            "llm": c.llm,
            "vae": c.vae,
            "dtype": c.dtype,
            "height": c.height,
            "width": c.width,
            "steps": c.steps,
            "guidance_scale": c.guidance_scale,
            "negative_prompt": c.negative_prompt,
            "device": self.device,
        }

    def settings_json(self) -> str:
        return json.dumps(self.settings(), sort_keys=True)


def _generators(seeds: list[int]):
    import torch

    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


def load_paradiffusion(name: str, cfg: ModelConfig, device: str) -> TextToImage:
    """Our export or the official weights, through the trainer's pipeline."""
    try:
        from training.pipeline import ParaDiffusionPipeline
    except ImportError as exc:  # pragma: no cover - depends on the checkout
        raise RuntimeError(f"model {name!r}: kind 'paradiffusion' needs training.pipeline ({exc})") from exc

    pipe = ParaDiffusionPipeline.from_pretrained(
        cfg.path, llm=cfg.llm, vae=cfg.vae, torch_dtype=torch_dtype(cfg.dtype, device), device=device
    )

    def call(prompts: list[str], seeds: list[int]) -> list[Any]:
        out = []
        for prompt, gen in zip(prompts, _generators(seeds), strict=True):
            out.extend(
                pipe(
                    prompt,
                    negative_prompt=cfg.negative_prompt,
                    height=cfg.height,
                    width=cfg.width,
                    num_inference_steps=cfg.steps,
                    guidance_scale=cfg.guidance_scale,
                    generator=gen,
                )
            )
        return out

    return TextToImage(name, cfg, device, call)


def load_diffusers(name: str, cfg: ModelConfig, device: str) -> TextToImage:
    """Any diffusers text-to-image pipeline (SDXL, PixArt-Sigma, SD, ...)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(cfg.path, dtype=torch_dtype(cfg.dtype, device))
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)

    def call(prompts: list[str], seeds: list[int]) -> list[Any]:
        result = pipe(
            prompt=list(prompts),
            negative_prompt=[cfg.negative_prompt] * len(prompts),
            height=cfg.height,
            width=cfg.width,
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance_scale,
            generator=_generators(seeds),
        )
        return list(result.images)

    return TextToImage(name, cfg, device, call)


#: ``kind`` -> loader(name, config, device).
LOADERS: dict[str, Callable[[str, ModelConfig, str], TextToImage]] = {
    "paradiffusion": load_paradiffusion,
    "diffusers": load_diffusers,
}


def load_model(name: str, cfg: ModelConfig, device: str = "auto") -> TextToImage:
    """Load the model ``name`` as its config's ``kind`` says."""
    return LOADERS[cfg.kind](name, cfg, resolve_device(device))
