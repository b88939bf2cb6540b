"""Tiny random ParaDiffusion parts, built offline for tests, the demo and benchmarks.

``build_tiny_diffusion(out_dir)`` writes::

    out_dir/llm/              a 2-layer LlamaModel (hidden 64) + a Llama-2-style tokenizer
                              (LlamaTokenizer, SentencePiece-style BPE with byte fallback,
                              <s> in front, pad = eos, right padding)
    out_dir/unet/             a small SD-style UNet2DConditionModel whose cross-attention
                              width is the LLM's (64): the release's shape, no projection
    out_dir/unet_projection/  the same UNet with cross-attention width 32, for the
                              ``text_projection: linear`` variant (Linear 64 -> 32)
    out_dir/vae/              a small AutoencoderKL (4 latent channels, downsampling x2,
                              scaling factor of sdxl-vae-fp16-fix)
    out_dir/scheduler/        DDPMScheduler config (SD schedule: scaled_linear 0.00085-0.012)

``build_tiny_release(out_dir)`` writes the same kind of parts in the layout of the
official ``weijiawu/ParaDiffusion`` release (``Llama-2-7b-hf/``, ``text_encoder_lora/``,
``unet/``, ``sdxl-vae-fp16-fix/``, ``scheduler/``), with weights drawn from a NumPy
generator per parameter name (not from the libraries' initialisers), so the same folder
comes out under any torch/diffusers/transformers version: the release-parity fixture
(``scripts/release_parity.py``) relies on that. Its files load in the release's own
environment too (transformers 4.30, diffusers 0.20, peft 0.7).

Each folder loads with the same ``from_pretrained`` call as the real model
(``LlamaModel``/``AutoTokenizer``, ``UNet2DConditionModel``, ``AutoencoderKL``,
``DDPMScheduler``), so code paths are the real ones. Their outputs mean nothing; the
plumbing is real. Building takes about a second and is reused when the folder already
holds the same configs.
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

#: The release's shape: the UNet attends to the LLM's last hidden states directly
#: (cross-attention width = the LLM's hidden size, no projection).
TINY_RELEASE_UNET = {**TINY_UNET, "cross_attention_dim": TINY_LLM["hidden_size"]}
#: The LoRA of ``build_tiny_release``'s ``text_encoder_lora/`` (peft), on every attention projection.
TINY_LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
#: The release's ``scheduler/`` of ``build_tiny_release``: an SD-style DDPM config that still
#: has ``steps_offset: 0`` and ``clip_sample: true``, so the two fixes the release's pipeline
#: applies when it is built (``steps_offset`` -> 1, ``clip_sample`` -> false) change the
#: sampled timesteps ("leading" spacing) and a pipeline that forgets them differs.
TINY_RELEASE_SCHEDULER = {
    **TINY_SCHEDULER,
    "clip_sample": True,
    "steps_offset": 0,
    "timestep_spacing": "leading",
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


def build_llama_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 400) -> None:
    """A tiny tokenizer with Llama-2's own pipeline, in Llama-2-7b-hf's file layout.

    ``tokenizer.json`` as transformers' Llama converter writes it for Llama-2 (normalizer
    Prepend("▁") + Replace(" ", "▁"), BPE with byte fallback and the 256 ``<0xNN>`` byte
    tokens, ``<s> $A`` template, the SentencePiece-style decoder), merges learned on a few
    sentences; ``tokenizer_config.json`` as in meta-llama/Llama-2-7b-hf (``LlamaTokenizer``,
    ``padding_side: right``, BOS added, no EOS, no pad token). The JSON is written by hand
    with the fields both tokenizers 0.13 (the release's environment) and today's read.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split(
        "▁", behavior="merged_with_next"
    )  # pieces start at a "▁", as in SentencePiece
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + byte_tokens, show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    trained = json.loads(tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in trained["merges"]]
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": t,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, t in enumerate(specials)
        ],
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                bos,
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "<s>", "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "vocab": trained["vocab"],
            "merges": merges,
        },
    }
    (out / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False))
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": 4096,
        "pad_token": None,
        "padding_side": "right",
        "tokenizer_class": "LlamaTokenizer",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )


def fill_deterministic_(module, seed: int, only: str | None = None) -> None:
    """Overwrite every parameter with values from NumPy's PCG64 seeded by (seed, name).

    Matrices and kernels get N(0, 1/fan_in), 1-d weights (norms) 1 + N(0, 0.1^2), biases
    N(0, 0.02^2). The values depend only on the seed, the parameter's name and shape, not
    on the library's initialiser or on the order of creation, so a checkpoint rebuilt
    under other versions is the same (the parity fixture checks a digest of it).
    ``only``: fill just the parameters whose name contains this string.
    """
    import zlib

    import numpy as np
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if only is not None and only not in name:
                continue
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            x = rng.standard_normal(tuple(p.shape))
            if p.ndim >= 2:
                x = x / np.sqrt(max(1, int(np.prod(p.shape[1:]))))
            elif name.endswith("weight"):
                x = 1.0 + 0.1 * x
            else:
                x = 0.02 * x
            p.copy_(torch.from_numpy(x).to(p.dtype))


def _llama_config(tokenizer_dir: Path):
    from transformers import LlamaConfig

    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"]
    return LlamaConfig(vocab_size=len(vocab), bos_token_id=1, eos_token_id=2, pad_token_id=2, **TINY_LLM)


def build_tiny_diffusion(out_dir: str | os.PathLike, seed: int = 0) -> dict[str, str]:
    """Write the tiny LLM, tokenizer, UNets, VAE and scheduler under ``out_dir``.

    Returns ``{"llm", "unet", "unet_projection", "vae", "scheduler", "root"}`` (folder
    paths). ``unet`` is release-shaped (cross-attention = the LLM width);
    ``unet_projection`` is narrower, for the projection variant. Reuses what is already
    there when the configs match, so calling it twice is cheap and gives the same weights.
    """
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import LlamaModel

    out = Path(out_dir)
    paths = {name: str(out / name) for name in ("llm", "unet", "unet_projection", "vae", "scheduler")}
    paths["root"] = str(out)
    stamp = out / "tiny_diffusion.json"
    doc = {
        "llm": TINY_LLM,
        "unet": TINY_RELEASE_UNET,
        "unet_projection": TINY_UNET,
        "vae": TINY_VAE,
        "scheduler": TINY_SCHEDULER,
        "tokenizer": "llama-2-style",
        "seed": seed,
    }
    if stamp.is_file() and json.loads(stamp.read_text()) == doc:
        return paths
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    build_llama_tokenizer(out / "llm")
    LlamaModel(_llama_config(out / "llm")).save_pretrained(paths["llm"])
    UNet2DConditionModel(**TINY_RELEASE_UNET).save_pretrained(paths["unet"])
    UNet2DConditionModel(**TINY_UNET).save_pretrained(paths["unet_projection"])
    AutoencoderKL(**TINY_VAE).save_pretrained(paths["vae"])
    DDPMScheduler(**TINY_SCHEDULER).save_pretrained(paths["scheduler"])
    stamp.write_text(json.dumps(doc, indent=1))
    return paths


#: Folder names of the official release (Hugging Face ``weijiawu/ParaDiffusion``).
RELEASE_DIRS = {
    "llm": "Llama-2-7b-hf",
    "lora": "text_encoder_lora",
    "unet": "unet",
    "vae": "sdxl-vae-fp16-fix",
    "scheduler": "scheduler",
}


def build_tiny_release(out_dir: str | os.PathLike, seed: int = 0, lora: bool = True) -> str:
    """A tiny random checkpoint in the official release's layout; returns its folder.

    ``Llama-2-7b-hf/`` (tiny LlamaModel + Llama-2-style tokenizer), ``text_encoder_lora/``
    (a peft LoRA with non-zero A and B, so it changes the text features; left out with
    ``lora=False``), ``unet/`` (cross-attention width = the LLM's hidden size),
    ``sdxl-vae-fp16-fix/``, ``scheduler/`` (:data:`TINY_RELEASE_SCHEDULER`). Weights come
    from :func:`fill_deterministic_`; ``release.json`` records what was built and is the
    reuse stamp. Config files keep to keys the release's library versions also read.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import LlamaModel

    out = Path(out_dir)
    stamp = out / "release.json"
    doc = {
        "llm": TINY_LLM,
        "unet": TINY_RELEASE_UNET,
        "vae": TINY_VAE,
        "scheduler": TINY_RELEASE_SCHEDULER,
        "lora": TINY_LORA if lora else None,
        "seed": seed,
    }
    if stamp.is_file() and json.loads(stamp.read_text()) == doc:
        return str(out)
    out.mkdir(parents=True, exist_ok=True)
    llm_dir = out / RELEASE_DIRS["llm"]
    build_llama_tokenizer(llm_dir)
    llm = LlamaModel(_llama_config(llm_dir))
    fill_deterministic_(llm, seed)
    llm.save_pretrained(str(llm_dir))
    if lora:
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(llm, LoraConfig(**TINY_LORA, lora_dropout=0.0, bias="none"))
        fill_deterministic_(peft_model, seed + 1, only="lora_")
        lora_dir = out / RELEASE_DIRS["lora"]
        peft_model.save_pretrained(str(lora_dir))
        # peft 0.7 (the release's) builds LoraConfig(**file): keep to the fields it knows.
        cfg = json.loads((lora_dir / "adapter_config.json").read_text())
        keep = {
            "peft_type",
            "base_model_name_or_path",
            "revision",
            "task_type",
            "inference_mode",
            "r",
            "target_modules",
            "lora_alpha",
            "lora_dropout",
            "fan_in_fan_out",
            "bias",
            "modules_to_save",
            "init_lora_weights",
            "layers_to_transform",
            "layers_pattern",
            "rank_pattern",
            "alpha_pattern",
        }
        cfg = {k: v for k, v in cfg.items() if k in keep}
        cfg["base_model_name_or_path"] = None
        (lora_dir / "adapter_config.json").write_text(json.dumps(cfg, indent=1))
        (lora_dir / "README.md").unlink(missing_ok=True)  # peft's model-card template
    unet = UNet2DConditionModel(**TINY_RELEASE_UNET)
    fill_deterministic_(unet, seed + 2)
    unet.save_pretrained(str(out / RELEASE_DIRS["unet"]))
    vae = AutoencoderKL(**TINY_VAE)
    fill_deterministic_(vae, seed + 3)
    vae.save_pretrained(str(out / RELEASE_DIRS["vae"]))
    DDPMScheduler(**TINY_RELEASE_SCHEDULER).save_pretrained(str(out / RELEASE_DIRS["scheduler"]))
    stamp.write_text(json.dumps(doc, indent=1))
    return str(out)
