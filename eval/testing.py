"""Tiny random baselines for tests and the demo: a real diffusers StableDiffusionPipeline
with few weights (outputs are noise; the plumbing is real). Built offline in ~1 s."""

from __future__ import annotations

import json
import os
from pathlib import Path

TINY_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "vocab_size": 512,
    "projection_dim": 32,
}


def build_tiny_sd(out_dir: str | os.PathLike, seed: int = 0) -> str:
    """Write a tiny StableDiffusionPipeline folder (loads with ``DiffusionPipeline.from_pretrained``).

    Uses the tiny UNet/VAE/scheduler configs of :mod:`paradiffusion.testing.tiny_diffusion`
    with a tiny CLIP text encoder and the byte-level tokenizer built there. Different
    seeds give different models. Reused when already built with the same seed.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    from paradiffusion.testing.tiny_diffusion import TINY_SCHEDULER, TINY_UNET, TINY_VAE, build_tiny_tokenizer

    out = Path(out_dir)
    stamp = out / "tiny_sd.json"
    doc = {"seed": seed, "text": TINY_TEXT, "unet": TINY_UNET, "vae": TINY_VAE}
    if stamp.is_file() and json.loads(stamp.read_text()) == doc:
        return str(out)
    torch.manual_seed(seed)
    tok_dir = out / "_tokenizer_src"
    build_tiny_tokenizer(tok_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tok_dir), model_max_length=77, pad_token="</s>")
    text = CLIPTextModel(
        CLIPTextConfig(
            **TINY_TEXT,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
    )
    unet = UNet2DConditionModel(**TINY_UNET)
    vae = AutoencoderKL(**TINY_VAE)
    sched = DDIMScheduler(**TINY_SCHEDULER, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out))
    stamp.write_text(json.dumps(doc))
    return str(out)


def build_tiny_paradiffusion(out_dir: str | os.PathLike, seed: int = 0) -> str:
    """An *untrained* tiny ParaDiffusion export (``training.export`` layout: unet/,
    scheduler/, paradiffusion.json naming the tiny LLM and VAE; the release's shape, no
    projection), so ``kind: paradiffusion`` runs through ``ParaDiffusionPipeline`` without a
    training run."""
    import torch
    from diffusers import UNet2DConditionModel

    from paradiffusion.testing.tiny_diffusion import TINY_SCHEDULER, build_tiny_diffusion
    from training.export import export_model
    from training.modeling import ParaDiffusionModel, load_llm

    out = Path(out_dir)
    export = out / "export"
    if (export / "paradiffusion.json").is_file():
        return str(export)
    parts = build_tiny_diffusion(out / "parts", seed=seed)
    torch.manual_seed(seed)
    model = ParaDiffusionModel(load_llm(parts["llm"]), None, UNet2DConditionModel.from_pretrained(parts["unet"]))
    export_model(model, export, llm=parts["llm"], vae=parts["vae"], scheduler_config=TINY_SCHEDULER, max_length=64)
    return str(export)


def build_tiny_pickscore(out_dir: str | os.PathLike, seed: int = 0) -> str:
    """A tiny random transformers ``CLIPModel`` + ``CLIPProcessor`` in one folder, the layout
    PickScore (``yuvalkirstain/PickScore_v1``) loads with. The tokenizer is CLIP's real BPE,
    written from the vocabulary file that ships inside open_clip (no download)."""
    import gzip

    import open_clip
    import torch
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    out = Path(out_dir)
    if (out / "config.json").is_file() and (out / "vocab.json").is_file():
        return str(out)
    out.mkdir(parents=True, exist_ok=True)
    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m.split()) for m in lines] + ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n")
    tokenizer = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(str(out))
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "vocab_size": len(vocab),
            "max_position_embeddings": 77,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(str(out))
    return str(out)
