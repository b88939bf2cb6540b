"""Tiny random ParaDiffusion parts, built offline for tests, the demo and benchmarks.

``build_tiny_diffusion(out_dir)`` writes::

    out_dir/llm/          a 2-layer LlamaModel (hidden 64) + a byte-level BPE tokenizer
                          (LlamaTokenizerFast-compatible: <s> ... </s>, pad = eos)
    out_dir/unet/         a small SD-style UNet2DConditionModel (cross-attention width 32)
    out_dir/vae/          a small AutoencoderKL (4 latent channels, downsampling x2,
                          scaling factor of sdxl-vae-fp16-fix)
    out_dir/scheduler/    DDPMScheduler config (SD schedule: scaled_linear 0.00085-0.012)

Each folder loads with the same ``from_pretrained`` call as the real model
(``LlamaModel``/``AutoTokenizer``, ``UNet2DConditionModel``, ``AutoencoderKL``,
``DDPMScheduler``), so code paths are the real ones. The LLM width (64) differs from
the UNet's cross-attention width (32), so the trainable projection is exercised. Their
outputs mean nothing; the plumbing is real. Building takes about a second and is
reused when the folder already holds the same configs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

#: Sizes of the tiny parts. Changing them rebuilds the folders.
TINY_LLM = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
}
TINY_UNET = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 32,
    "scaling_factor": 0.13025,  # sdxl-vae-fp16-fix's
}
TINY_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
}

_CORPUS = [
    "A quiet mountain lake at sunrise with pine trees reflected in the still water.",
    "A bowl of fresh fruit with apples, oranges and grapes on a kitchen counter.",
    "A city street at night with neon signs, wet pavement and people walking.",
    "A portrait of an astronaut in a white spacesuit holding a helmet.",
    "A ginger tabby cat looking to the side, resting on a wooden floor.",
    "The image shows a red car parked in front of a blue house, on the left a tree, on the right a dog.",
]


def build_tiny_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on a few sentences, saved as a fast tokenizer.

    It behaves like Llama-2's for our purposes: adds ``<s>`` in front, ends with
    ``</s>`` available as pad, and encodes any text (byte fallback through the
    byte-level alphabet). Returns the ``PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=4096,
    )
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_diffusion(out_dir: str | os.PathLike, seed: int = 0) -> dict[str, str]:
    """Write the tiny LLM, tokenizer, UNet, VAE and scheduler under ``out_dir``.

    Returns ``{"llm": ..., "unet": ..., "vae": ..., "scheduler": ..., "root": ...}``
    (folder paths). Reuses what is already there when the configs match, so calling
    it twice is cheap and gives the same weights.
    """
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import LlamaConfig, LlamaModel

    out = Path(out_dir)
    paths = {name: str(out / name) for name in ("llm", "unet", "vae", "scheduler")}
    paths["root"] = str(out)
    stamp = out / "tiny_diffusion.json"
    doc = {"llm": TINY_LLM, "unet": TINY_UNET, "vae": TINY_VAE, "scheduler": TINY_SCHEDULER, "seed": seed}
    if stamp.is_file() and json.loads(stamp.read_text()) == doc:
        return paths
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    tokenizer = build_tiny_tokenizer(out / "llm")
    llm_cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        **TINY_LLM,
    )
    LlamaModel(llm_cfg).save_pretrained(paths["llm"])
    UNet2DConditionModel(**TINY_UNET).save_pretrained(paths["unet"])
    AutoencoderKL(**TINY_VAE).save_pretrained(paths["vae"])
    DDPMScheduler(**TINY_SCHEDULER).save_pretrained(paths["scheduler"])
    stamp.write_text(json.dumps(doc, indent=1))
    return paths
