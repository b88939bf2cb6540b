"""``generate.preset: release``: sampling as the release's demo does (fp16 UNet and VAE on a GPU,
seed 45, the noise drawn on the pipeline's device in the UNet's dtype, the latents stepped in it)
and every image size the release accepts (multiples of the VAE's 8).

The release's ``StableDiffusionLlamaPipeline`` is diffusers' ``StableDiffusionPipeline`` with a
Llama text encoder (docs/release_parity.md); so the reference for the half-precision loop here is
diffusers' own ``StableDiffusionPipeline`` given our text states, run in fp16 on the CPU. The CUDA
generator itself is checked on a GPU by bench/generate_release_gpu.py."""

from __future__ import annotations

import json

import pytest
import torch

from training.config import GenerateConfig
from training.generate import RELEASE_SEED, sampling_plan


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory) -> str:
    from paradiffusion.testing.tiny_diffusion import build_tiny_release

    return build_tiny_release(tmp_path_factory.mktemp("tiny_release"))


def test_the_release_preset_picks_the_demos_settings():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    ours = sampling_plan(GenerateConfig(), cuda)
    assert (ours["dtype"], ours["generator_device"], ours["latent_dtype"]) == (torch.bfloat16, cpu, torch.float32)
    assert [ours["seeds"](i) for i in range(3)] == [0, 1, 2]
    rel = sampling_plan(GenerateConfig(preset="release"), cuda)
    assert (rel["dtype"], rel["generator_device"], rel["latent_dtype"]) == (torch.float16, cuda, torch.float16)
    assert [rel["seeds"](i) for i in range(3)] == [RELEASE_SEED] * 3 == [45] * 3
    on_cpu = sampling_plan(GenerateConfig(preset="release"), cpu)  # no fp16 default on a CPU
    assert (on_cpu["dtype"], on_cpu["generator_device"], on_cpu["latent_dtype"]) == (torch.float32, cpu, torch.float32)
    mine = sampling_plan(GenerateConfig(preset="release", seed=7, dtype="float16"), cpu)  # explicit settings win
    assert mine["seeds"](3) == 7 and mine["dtype"] == mine["latent_dtype"] == torch.float16
    with pytest.raises(ValueError, match="preset"):
        GenerateConfig(preset="demo")


def test_half_precision_sampling_is_diffusers_stable_diffusion_loop(tiny_release):
    """Our loop with fp16 noise and latents equals StableDiffusionPipeline's (the release's
    pipeline's parent) bit for bit, given the same text states, scheduler and generator seed;
    the fp32 latents of our default differ from it."""
    from diffusers import StableDiffusionPipeline

    from training.pipeline import ParaDiffusionPipeline, release_scheduler

    pipe = ParaDiffusionPipeline.from_pretrained(tiny_release, torch_dtype=torch.float16, device="cpu")
    prompts, size, steps = ["A red fox in the snow.", "A lighthouse at night."], (24, 40), 4
    cond, _, _ = pipe.encode([""] * 2 + prompts)
    ref_pipe = StableDiffusionPipeline(
        vae=pipe.vae, text_encoder=None, tokenizer=None, unet=pipe.unet,
        scheduler=release_scheduler(dict(pipe.scheduler.config)), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe(
        prompt_embeds=cond[2:], negative_prompt_embeds=cond[:2], height=size[0], width=size[1],
        num_inference_steps=steps, guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(45),
        output_type="latent",
    ).images  # fmt: skip
    kw = {"height": size[0], "width": size[1], "num_inference_steps": steps, "output_type": "latent"}
    half = pipe(prompts, generator=torch.Generator("cpu").manual_seed(45), latent_dtype=torch.float16, **kw)
    assert ref.dtype == half.dtype == torch.float16
    assert torch.equal(half, ref)
    ours = pipe(prompts, generator=torch.Generator("cpu").manual_seed(45), **kw)
    assert ours.dtype == torch.float32 and not torch.equal(ours.half(), ref)


def test_every_size_the_release_accepts(tiny_release):
    """Sides that are multiples of the VAE's downsampling, not of the UNet's: the latents' sides
    are odd here, and the UNet still returns them (diffusers passes the skip sizes up)."""
    from training.pipeline import ParaDiffusionPipeline

    pipe = ParaDiffusionPipeline.from_pretrained(tiny_release, device="cpu")
    vae_f = pipe.latent_multiple
    unet_f = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    assert unet_f > 1  # so these sizes are not multiples of the whole downsampling
    h, w = 3 * vae_f, 5 * vae_f
    images = pipe("A small boat.", height=h, width=w, num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert images.shape == (1, h, w, 3)
    with pytest.raises(ValueError, match=f"multiples of {vae_f}"):
        pipe("A small boat.", height=h + 1, width=w, num_inference_steps=2)


def test_generate_with_the_release_preset_on_cpu(tiny_release, tmp_path):
    from PIL import Image

    from pipelines.config import PipelinesConfig
    from training.generate import generate

    cfg = PipelinesConfig.model_validate({
        "project": {"data_root": str(tmp_path)},
        "generate": {"preset": "release", "model": tiny_release, "width": 40, "height": 24,
                     "num_inference_steps": 2, "device": "cpu"},
    })  # fmt: skip
    files = generate(cfg, ["A red fox.", "A red fox."])
    params = [json.loads(Image.open(f).text["parameters"]) for f in files]
    assert [p["seed"] for p in params] == [45, 45] and params[0]["preset"] == "release"
    assert params[0]["llm_dtype"] == "float32"  # the release's (no paradiffusion.json)
    a, b = (Image.open(f).tobytes() for f in files)
    assert a == b  # one seed for every prompt, as the demo: the same prompt gives the same image
