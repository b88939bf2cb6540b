"""Text to image with a ParaDiffusion model: our exports or the official release.

>>> pipe = ParaDiffusionPipeline.from_pretrained("data/train/stage3/export")       # ours
>>> pipe = ParaDiffusionPipeline.from_pretrained("weijiawu/ParaDiffusion")         # the release
>>> images = pipe("A paragraph ...", height=1024, width=640)                       # list of PIL images

Sampling as in the release: DPM-Solver multistep (100 steps), classifier-free guidance
7.5 with the empty string as the unconditional prompt, 1024x640 by default (any size
that is a multiple of the latent grid works).

Layouts read by :meth:`ParaDiffusionPipeline.from_pretrained`:

- our export (``training/export.py``): ``unet/``, ``text_projection/``,
  ``text_encoder_lora/``, ``scheduler/`` and ``paradiffusion.json`` naming the LLM and
  the VAE (id or path);
- the official ``weijiawu/ParaDiffusion`` layout: ``Llama-2-7b-hf/``,
  ``text_encoder_lora/``, ``unet/``, ``sdxl-vae-fp16-fix/``, ``scheduler/``. The
  projection is read from ``text_projection/`` when present; a UNet whose config has
  ``encoder_hid_dim`` projects the LLM features itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from paradiffusion.log import get_logger
from training.modeling import LORA_DIR, PROJECTION_DIR, load_projection, tokenize

log = get_logger("training.pipeline")

OFFICIAL_LLM_DIR = "Llama-2-7b-hf"
OFFICIAL_VAE_DIR = "sdxl-vae-fp16-fix"


def default_device_dtype(device=None, torch_dtype=None) -> tuple[torch.device, torch.dtype]:
    """``cuda`` + bf16 when a GPU is visible, else ``cpu`` + fp32 (unless given)."""
    dev = (
        torch.device(device)
        if device not in (None, "auto")
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    if torch_dtype in (None, "auto"):
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif isinstance(torch_dtype, str):
        dt = getattr(torch, torch_dtype)
    else:
        dt = torch_dtype
    return dev, dt


class ParaDiffusionPipeline:
    """LLM text encoder (+ merged LoRA) -> projection -> UNet, DPM-Solver sampling, VAE decode."""

    def __init__(
        self,
        tokenizer,
        llm,
        projection,
        unet,
        vae,
        scheduler,
        max_length: int = 512,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.tokenizer, self.llm, self.projection = tokenizer, llm, projection
        self.unet, self.vae, self.scheduler = unet, vae, scheduler
        self.max_length = max_length
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str,
        llm: str | None = None,
        vae: str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        max_length: int | None = None,
    ) -> ParaDiffusionPipeline:
        """Load an export folder or the official release (a folder or a Hugging Face id).

        ``llm`` / ``vae`` replace where the LLM / VAE come from (e.g. a local copy of
        Llama-2-7b-hf). ``torch_dtype`` None: bf16 on GPU, fp32 on CPU.
        """
        from diffusers import DPMSolverMultistepScheduler

        from training.modeling import build_unet, load_llm, load_tokenizer, load_vae, merge_lora

        root = Path(path_or_id)
        if not root.is_dir():
            if root.is_absolute() or path_or_id.startswith(".") or path_or_id.count("/") != 1:
                raise FileNotFoundError(
                    f"{path_or_id}: no such folder (a Hugging Face id has the form owner/name); train a stage "
                    "first (its <output>/export) or name weijiawu/ParaDiffusion"
                )
            from huggingface_hub import snapshot_download

            root = Path(snapshot_download(path_or_id))
        dev, dt = default_device_dtype(device, torch_dtype)
        info_file = root / "paradiffusion.json"
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        llm_src = (
            llm or info.get("llm") or (str(root / OFFICIAL_LLM_DIR) if (root / OFFICIAL_LLM_DIR).is_dir() else None)
        )
        vae_src = (
            vae or info.get("vae") or (str(root / OFFICIAL_VAE_DIR) if (root / OFFICIAL_VAE_DIR).is_dir() else None)
        )
        if llm_src is None or vae_src is None:
            raise FileNotFoundError(
                f"{root}: cannot tell where the {'LLM' if llm_src is None else 'VAE'} comes from (no paradiffusion.json, "
                f"no {OFFICIAL_LLM_DIR}/ or {OFFICIAL_VAE_DIR}/); pass llm=... / vae=..."
            )
        if not (root / "unet").is_dir():
            raise FileNotFoundError(f"{root}: no unet/ folder; is this an export or the ParaDiffusion release?")
        tokenizer = load_tokenizer(llm_src, info.get("llm_revision"))
        text_model = load_llm(llm_src, info.get("llm_revision"), dtype=dt)
        if (root / LORA_DIR).is_dir():
            text_model = merge_lora(text_model, str(root / LORA_DIR))
        unet = build_unet(str(root), subfolder="unet", dtype=dt)
        projection = None
        if (root / PROJECTION_DIR).is_dir():
            projection = load_projection(root / PROJECTION_DIR).to(dt)
        elif (
            unet.config.get("encoder_hid_dim") is None
            and text_model.config.hidden_size != unet.config.cross_attention_dim
        ):
            raise FileNotFoundError(
                f"{root}: no {PROJECTION_DIR}/ and the UNet has no encoder_hid_dim: cannot map the LLM's "
                f"{text_model.config.hidden_size}-d features to cross-attention {unet.config.cross_attention_dim}"
            )
        vae_model = load_vae(vae_src, dtype=dt)
        scheduler = DPMSolverMultistepScheduler.from_pretrained(str(root), subfolder="scheduler")
        pipe = cls(
            tokenizer,
            text_model,
            projection,
            unet,
            vae_model,
            scheduler,
            max_length=max_length or int(info.get("max_length", 512)),
            device=dev,
            dtype=dt,
        )
        return pipe.to(dev)

    def to(self, device: torch.device | str) -> ParaDiffusionPipeline:
        self.device = torch.device(device)
        for m in (self.llm, self.projection, self.unet, self.vae):
            if m is not None:
                m.to(self.device)
        return self

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention states and mask for ``prompts`` (LLM last_hidden_state -> projection)."""
        ids, mask = tokenize(self.tokenizer, prompts, self.max_length)
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.llm(input_ids=ids, attention_mask=mask).last_hidden_state
        if self.projection is not None:
            hidden = self.projection(hidden.to(self.projection.weight.dtype))
        return hidden.to(self.dtype), mask

    @property
    def latent_multiple(self) -> int:
        """Image sides must be multiples of this (VAE downsampling x UNet downsampling)."""
        vae_f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        unet_f = 2 ** (len(self.unet.config.block_out_channels) - 1)
        return vae_f * unet_f

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] = "",
        height: int = 1024,
        width: int = 640,
        num_inference_steps: int = 100,
        guidance_scale: float = 7.5,
        generator: torch.Generator | None = None,
    ) -> list:
        """Generate one image per prompt; returns PIL images of ``width x height``."""
        from PIL import Image

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negs = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negs) != len(prompts):
            raise ValueError(f"{len(negs)} negative prompts for {len(prompts)} prompts")
        m = self.latent_multiple
        if height % m or width % m:
            raise ValueError(f"height and width must be multiples of {m}; got {height}x{width}")
        cfg = guidance_scale > 1.0
        cond, mask = self.encode(negs + prompts if cfg else prompts)
        vae_f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        shape = (len(prompts), self.unet.config.in_channels, height // vae_f, width // vae_f)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        latents = torch.randn(shape, generator=generator, device=gen_device).to(self.device, torch.float32)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        latents = latents * self.scheduler.init_noise_sigma
        for t in self.scheduler.timesteps:
            inp = torch.cat([latents] * 2) if cfg else latents
            inp = self.scheduler.scale_model_input(inp, t)
            pred = self.unet(inp.to(self.dtype), t, encoder_hidden_states=cond, encoder_attention_mask=mask).sample
            pred = pred.float()
            if cfg:
                uncond, text = pred.chunk(2)
                pred = uncond + guidance_scale * (text - uncond)
            latents = self.scheduler.step(pred, t, latents).prev_sample
        sf = self.vae.config.scaling_factor
        shift = self.vae.config.get("shift_factor") or 0.0
        images = self.vae.decode((latents / sf + shift).to(self.vae.dtype)).sample
        arr = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arr]
