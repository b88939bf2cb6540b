"""Text to image with a ParaDiffusion model: our exports or the official release.

>>> pipe = ParaDiffusionPipeline.from_pretrained("data/train/stage3/export")       # ours
>>> pipe = ParaDiffusionPipeline.from_pretrained("weijiawu/ParaDiffusion")         # the release
>>> images = pipe("A paragraph ...", width=1024, height=640)                       # list of PIL images

Sampling as the release's ``StableDiffusionLlamaPipeline`` + ``demo.py`` do it
(github.com/weijiawu/ParaDiffusion; ``scripts/release_parity.py`` checks that both give
the same numbers): the LLM in fp32, its last hidden states (through the projection when
the model has one) as the UNet's cross-attention input; DPM-Solver multistep built from
the ``scheduler/`` config with ``steps_offset=1`` and ``clip_sample=False`` forced, 100
steps, classifier-free guidance 7.5 with the empty string as the unconditional prompt,
1024 wide x 640 high by default (any multiple of the VAE's 8, as the release accepts).
The release ran diffusers 0.20 (its README's version), whose DPM-Solver takes the last
step to timestep 0 (``final_sigmas_type="sigma_min"`` in today's diffusers, whose default
"zero" ends elsewhere); that is pinned here, with the other options 0.20 did not have off.

Layouts read by :meth:`ParaDiffusionPipeline.from_pretrained`:

- our export (``training/export.py``): ``unet/``, ``text_encoder_lora/``, ``scheduler/``,
  ``text_projection/`` (projection variant only) and ``paradiffusion.json`` naming the LLM
  and the VAE and saying how text was conditioned (``max_length``, ``conditioning``);
- the official ``weijiawu/ParaDiffusion`` layout: ``Llama-2-7b-hf/``,
  ``text_encoder_lora/``, ``unet/``, ``sdxl-vae-fp16-fix/``, ``scheduler/``, no
  ``paradiffusion.json``: the release's settings (256 tokens, release conditioning).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from paradiffusion.log import get_logger
from training.modeling import (
    CONDITIONING_TYPES,
    LORA_DIR,
    PROJECTION_DIR,
    RELEASE_MAX_LENGTH,
    load_projection,
    text_width,
    tokenize,
)

log = get_logger("training.pipeline")

OFFICIAL_LLM_DIR = "Llama-2-7b-hf"
OFFICIAL_VAE_DIR = "sdxl-vae-fp16-fix"
#: The release's sampling size (demo.py): width x height.
RELEASE_SIZE = (1024, 640)
#: DPMSolverMultistepScheduler options diffusers 0.20 (the release's) did not have, set to
#: what 0.20 did, whatever the scheduler config says.
DIFFUSERS_020_BEHAVIOUR = {
    "final_sigmas_type": "sigma_min",
    "euler_at_final": False,
    "use_lu_lambdas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_flow_sigmas": False,
    "rescale_betas_zero_snr": False,
}


def release_scheduler(config: dict):
    """The release's sampler for a ``scheduler/`` config: ``DPMSolverMultistepScheduler``.

    As ``StableDiffusionLlamaPipeline.__init__`` does: ``steps_offset`` -> 1 and a true
    ``clip_sample`` -> false; plus :data:`DIFFUSERS_020_BEHAVIOUR`.
    """
    from diffusers import DPMSolverMultistepScheduler

    cfg = dict(config)
    cfg["steps_offset"] = 1
    if cfg.get("clip_sample"):
        cfg["clip_sample"] = False
    cfg.update(DIFFUSERS_020_BEHAVIOUR)
    return DPMSolverMultistepScheduler.from_config(cfg)


def _dtype(value, default: torch.dtype) -> torch.dtype:
    if value in (None, "auto"):
        return default
    return getattr(torch, value) if isinstance(value, str) else value


def default_device_dtype(device=None, torch_dtype=None) -> tuple[torch.device, torch.dtype]:
    """``cuda`` + bf16 when a GPU is visible, else ``cpu`` + fp32 (unless given)."""
    dev = (
        torch.device(device)
        if device not in (None, "auto")
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    return dev, _dtype(torch_dtype, torch.bfloat16 if dev.type == "cuda" else torch.float32)


def model_settings(root: str | Path) -> dict:
    """How a model folder conditions on text: ``max_length``, ``conditioning``, ``text_projection``, ``llm_dtype``.

    From ``paradiffusion.json`` when there is one (an export written before format 2 was
    trained with masked conditioning and a projection); the release's settings otherwise.
    """
    info_file = Path(root) / "paradiffusion.json"
    if not info_file.is_file():
        return {
            "max_length": RELEASE_MAX_LENGTH,
            "conditioning": "release",
            "text_projection": "none",
            "llm_dtype": "float32",
        }
    info = json.loads(info_file.read_text())
    old = info.get("format", 1) < 2
    return {
        "max_length": int(info.get("max_length", RELEASE_MAX_LENGTH)),
        # the dtype training computed the text states in (exports before it was recorded: fp32, as sampled)
        "llm_dtype": info.get("llm_dtype", "float32"),
        "conditioning": info.get("conditioning", "masked" if old else "release"),
        "text_projection": info.get("text_projection", "linear" if old else "none"),
    }


class ParaDiffusionPipeline:
    """LLM text encoder (+ merged LoRA) -> projection (if any) -> UNet, DPM-Solver sampling, VAE decode."""

    def __init__(
        self,
        tokenizer,
        llm,
        projection,
        unet,
        vae,
        scheduler,
        max_length: int = RELEASE_MAX_LENGTH,
        conditioning: str = "release",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        text_states=None,
    ):
        """``text_states``: instead of ``tokenizer`` + ``llm``, a function ``prompts -> (LLM states,
        attention mask)`` (the trainer's text cache: validation images without the LLM)."""
        if conditioning not in CONDITIONING_TYPES:
            raise ValueError(f"conditioning {conditioning!r}: one of {', '.join(CONDITIONING_TYPES)}")
        if projection is not None and not isinstance(projection, torch.nn.Linear):
            projection = None  # the model's nn.Identity: no projection
        self.tokenizer, self.llm, self.projection = tokenizer, llm, projection
        self.unet, self.vae, self.scheduler = unet, vae, scheduler
        self.max_length = max_length
        self.conditioning = conditioning
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.text_states = text_states

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
        conditioning: str | None = None,
        llm_dtype: torch.dtype | str | None = None,
    ) -> ParaDiffusionPipeline:
        """Load an export folder or the official release (a folder or a Hugging Face id).

        ``llm`` / ``vae`` replace where the LLM / VAE come from (e.g. a local copy of
        Llama-2-7b-hf). ``torch_dtype`` (UNet, VAE, projection) None: bf16 on GPU, fp32 on
        CPU. ``llm_dtype`` None: the one the model was trained with (``paradiffusion.json``;
        fp32 for the release). ``max_length`` / ``conditioning`` None: as :func:`model_settings`
        reads them from the folder.
        """
        from training.modeling import build_unet, load_llm, load_tokenizer, load_vae

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
        settings = model_settings(root)
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
        text_model = load_llm(llm_src, info.get("llm_revision"), dtype=_dtype(llm_dtype or settings["llm_dtype"], None))
        if (root / LORA_DIR).is_dir():
            # Applied, not merged, as the release's demo does: merging W + BA first rounds
            # differently (4.5e-5 on the tiny parity model's text states against 3e-6).
            from peft import PeftModel

            text_model = PeftModel.from_pretrained(text_model, str(root / LORA_DIR))
        text_model.eval()
        unet = build_unet(str(root), subfolder="unet", dtype=dt)
        projection = None
        if (root / PROJECTION_DIR).is_dir():
            projection = load_projection(root / PROJECTION_DIR).to(dt)
        elif text_model.config.hidden_size != text_width(unet):
            raise FileNotFoundError(
                f"{root}: no {PROJECTION_DIR}/ and the UNet reads {text_width(unet)}-d text states: cannot feed it "
                f"the LLM's {text_model.config.hidden_size}-d states"
            )
        vae_model = load_vae(vae_src, dtype=dt)
        from diffusers import DPMSolverMultistepScheduler

        sched_cfg = DPMSolverMultistepScheduler.load_config(str(root), subfolder="scheduler")
        pipe = cls(
            tokenizer,
            text_model,
            projection,
            unet,
            vae_model,
            release_scheduler(sched_cfg),
            max_length=max_length or settings["max_length"],
            conditioning=conditioning or settings["conditioning"],
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
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(states, unet_mask, input_ids)`` for ``prompts`` (``input_ids`` None with ``text_states``).

        ``states``: LLM last_hidden_state (computed with the attention mask) through the
        projection, in the UNet's dtype; ``unet_mask``: the mask for the UNet's
        cross-attention, None with release conditioning.
        """
        if self.text_states is not None:
            hidden, mask = self.text_states(prompts)
            hidden, mask, ids = hidden.to(self.device), mask.to(self.device), None
        else:
            ids, mask = tokenize(self.tokenizer, prompts, self.max_length, self.conditioning)
            ids, mask = ids.to(self.device), mask.to(self.device)
            hidden = self.llm(input_ids=ids, attention_mask=mask).last_hidden_state
        if self.projection is not None:
            hidden = self.projection(hidden.to(self.projection.weight.dtype))
        return hidden.to(self.dtype), (mask if self.conditioning == "masked" else None), ids

    @property
    def latent_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's downsampling (8 for the release's VAE, whose
        pipeline accepts every multiple of 8). The UNet takes any latent size: diffusers passes the
        skip connections' sizes to its upsamplers when a side is not a multiple of its own downsampling."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, output_type: str = "pil"):
        """Latents -> images: ``pil`` (list of PIL images) or ``np`` (float array NHWC in [0, 1])."""
        from PIL import Image

        sf = self.vae.config.scaling_factor
        shift = self.vae.config.get("shift_factor") or 0.0
        images = self.vae.decode((latents / sf + shift).to(self.vae.dtype)).sample
        arr = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return arr
        return [Image.fromarray(a) for a in (arr * 255).round().astype("uint8")]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] = "",
        height: int = RELEASE_SIZE[1],
        width: int = RELEASE_SIZE[0],
        num_inference_steps: int = 100,
        guidance_scale: float = 7.5,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        latent_dtype: torch.dtype = torch.float32,
    ):
        """Generate one image per prompt.

        ``output_type``: ``pil`` (PIL images of ``width x height``), ``np`` (float array NHWC
        in [0, 1]) or ``latent`` (the final latents, before the VAE). ``latent_dtype``: the
        dtype the noise is drawn in (on ``generator``'s device) and the latents are stepped in;
        fp32 by default, the UNet's dtype to do what the release does in half precision
        (``generate.preset: release``).
        """
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type {output_type!r}: one of pil, np, latent")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negs = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negs) != len(prompts):
            raise ValueError(f"{len(negs)} negative prompts for {len(prompts)} prompts")
        vae_f = self.latent_multiple
        if height % vae_f or width % vae_f:
            raise ValueError(f"height and width must be multiples of {vae_f}; got {height}x{width}")
        cfg = guidance_scale > 1.0
        cond, mask, _ = self.encode(negs + prompts if cfg else prompts)
        shape = (len(prompts), self.unet.config.in_channels, height // vae_f, width // vae_f)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        latents = torch.randn(shape, generator=generator, device=gen_device, dtype=latent_dtype).to(self.device)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        latents = latents * self.scheduler.init_noise_sigma
        for t in self.scheduler.timesteps:
            inp = torch.cat([latents] * 2) if cfg else latents
            inp = self.scheduler.scale_model_input(inp, t)
            pred = self.unet(inp.to(self.dtype), t, encoder_hidden_states=cond, encoder_attention_mask=mask).sample
            pred = pred.to(latent_dtype)
            if cfg:
                uncond, text = pred.chunk(2)
                pred = uncond + guidance_scale * (text - uncond)
            latents = self.scheduler.step(pred, t, latents).prev_sample
        if output_type == "latent":
            return latents
        return self.decode(latents, output_type)
