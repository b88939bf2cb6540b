"""The ParaDiffusion model: Llama text encoder (+LoRA), a linear projection, an SD-style UNet.

:class:`ParaDiffusionModel` holds every part that a stage can train (the LLM with its
LoRA, the projection, the UNet) in ONE ``nn.Module``, so DeepSpeed (ZeRO-3 included)
partitions and checkpoints one model. The VAE is frozen in every stage and lives
outside it. Facts from the paper kept here:

- the text feature is ``LlamaModel(...).last_hidden_state`` computed with the attention
  mask; the pad token is EOS; captions are cut at ``max_length`` tokens (256 in stage 1,
  512 in stages 2-3);
- a trainable ``Linear(llm_hidden -> unet cross_attention_dim)`` maps it into the UNet's
  cross-attention (4096 -> the UNet's width for Llama-2-7B);
- the UNet is a diffusers ``UNet2DConditionModel`` without SDXL's added conditioning.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from paradiffusion.log import get_logger

log = get_logger("training.model")

PROJECTION_DIR = "text_projection"
LORA_DIR = "text_encoder_lora"


def load_tokenizer(path: str, revision: str | None = None):
    """The LLM's tokenizer with pad = EOS (Llama-2 has no pad token) and right padding."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, revision=revision)
    tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_llm(path: str, revision: str | None = None, dtype: torch.dtype = torch.float32):
    """``LlamaModel`` (the decoder without the LM head) from a HF id or folder.

    A ``LlamaForCausalLM`` checkpoint (e.g. ``meta-llama/Llama-2-7b-hf``) loads too:
    transformers drops the ``model.`` prefix and the unused head.
    """
    from transformers import LlamaModel

    return LlamaModel.from_pretrained(path, revision=revision, dtype=dtype)


def build_unet(
    source: str | None, subfolder: str | None = None, config: dict | None = None, dtype: torch.dtype = torch.float32
):
    """A ``UNet2DConditionModel`` from a folder/id, or randomly initialised from ``config``."""
    from diffusers import UNet2DConditionModel

    if source:
        return UNet2DConditionModel.from_pretrained(source, subfolder=subfolder, torch_dtype=dtype)
    unet = UNet2DConditionModel(**(config or {}))
    for key in ("addition_embed_type", "class_embed_type"):
        if unet.config.get(key):
            raise ValueError(f"train.model.unet_config.{key}: the ParaDiffusion UNet is SD-style; leave it unset")
    return unet


def load_vae(path: str, dtype: torch.dtype = torch.float32, subfolder: str | None = None):
    """The frozen ``AutoencoderKL`` (sdxl-vae-fp16-fix by default)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path, subfolder=subfolder, dtype=dtype)
    vae.requires_grad_(False)
    vae.eval()
    return vae


def add_lora(llm, rank: int, alpha: float, dropout: float, target_modules: list[str]):
    """Wrap the LLM with trainable LoRA adapters (peft); the base weights stay frozen."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), bias="none")
    return get_peft_model(llm, cfg)


def merge_lora(llm, lora_dir: str):
    """Apply a saved LoRA to the LLM and merge it into the base weights (stage 3, inference)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(llm, lora_dir).merge_and_unload()


def save_projection(proj: nn.Linear, folder: str | os.PathLike, state: dict | None = None) -> None:
    """``folder/config.json`` (in/out features) and ``folder/model.safetensors``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(
        json.dumps({"in_features": proj.in_features, "out_features": proj.out_features})
    )
    sd = state if state is not None else proj.state_dict()
    save_file({k: v.detach().float().cpu().contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))


def load_projection(folder: str | os.PathLike) -> nn.Linear:
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    proj = nn.Linear(cfg["in_features"], cfg["out_features"])
    proj.load_state_dict(load_file(str(folder / "model.safetensors")))
    return proj


class ParaDiffusionModel(nn.Module):
    """Text encoder (LLM, maybe with LoRA) + projection + UNet: everything DeepSpeed wraps.

    ``forward`` takes token ids and noisy latents and returns the UNet's prediction.
    When no LLM parameter is trainable (stages 1 and 3) the LLM runs under
    ``torch.no_grad`` so it keeps no activations.
    """

    def __init__(self, llm: nn.Module, projection: nn.Linear, unet: nn.Module):
        super().__init__()
        self.llm = llm
        self.projection = projection
        self.unet = unet

    @property
    def llm_trainable(self) -> bool:
        return any(p.requires_grad for p in self.llm.parameters())

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``projection(LlamaModel(ids, mask).last_hidden_state)``: the UNet's cross-attention input."""
        if self.llm_trainable:
            hidden = self.llm(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        else:
            with torch.no_grad():
                hidden = self.llm(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.projection(hidden.to(self.projection.weight.dtype))

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        cond = self.encode_text(input_ids, attention_mask)
        return self.unet(
            noisy_latents.to(cond.dtype),
            timesteps,
            encoder_hidden_states=cond,
            encoder_attention_mask=attention_mask,
        ).sample


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def build_model(train_cfg, stage_cfg, dtype: torch.dtype = torch.float32) -> tuple[ParaDiffusionModel, object]:
    """Build the stage's model and tokenizer from the config; sets what is trainable.

    ``stage_cfg.init_from`` (the previous stage's export folder) provides the UNet, the
    projection and, when present, the stage-2 LoRA: stage 2 continues training it
    only when the folder has none (fresh LoRA otherwise); stage 3 merges it and keeps
    the LLM frozen.
    """
    mcfg = train_cfg.model
    init = Path(stage_cfg.init_from) if stage_cfg.init_from else None
    if init is not None and not (init / "unet").is_dir():
        raise FileNotFoundError(
            f"init_from {init}: not an export folder (no unet/); point it at the previous stage's <output>/export"
        )
    tokenizer = load_tokenizer(mcfg.llm, mcfg.llm_revision)
    llm = load_llm(mcfg.llm, mcfg.llm_revision, dtype=dtype)
    llm.requires_grad_(False)
    lora_dir = init / LORA_DIR if init is not None and (init / LORA_DIR).is_dir() else None
    if stage_cfg.train_lora:
        if lora_dir is not None:
            from peft import PeftModel

            llm = PeftModel.from_pretrained(llm, str(lora_dir), is_trainable=True)
        else:
            lc = train_cfg.lora
            llm = add_lora(llm, lc.rank, lc.alpha, lc.dropout, lc.target_modules)
        if mcfg.llm_gradient_checkpointing:
            if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5.2 name
                llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif lora_dir is not None:
        llm = merge_lora(llm, str(lora_dir))
        llm.requires_grad_(False)
    llm.eval()  # no dropout in the encoder; LoRA dropout follows its own config

    if init is not None:
        unet = build_unet(str(init), subfolder="unet")
    else:
        unet = build_unet(mcfg.unet, mcfg.unet_subfolder, mcfg.unet_config)
    if mcfg.unet_gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    hidden = llm.config.hidden_size
    width = unet.config.cross_attention_dim
    if init is not None and (init / PROJECTION_DIR).is_dir():
        projection = load_projection(init / PROJECTION_DIR)
    else:
        projection = nn.Linear(hidden, width)
    if (projection.in_features, projection.out_features) != (hidden, width):
        raise ValueError(
            f"projection {projection.in_features}->{projection.out_features} does not fit LLM width {hidden} "
            f"-> UNet cross-attention {width}"
        )
    unet.requires_grad_(True)
    projection.requires_grad_(True)
    if dtype != torch.float32:  # DeepSpeed casts again for bf16; this only saves host memory early
        projection, unet = projection.to(dtype), unet.to(dtype)
    model = ParaDiffusionModel(llm, projection, unet)
    n_train = sum(p.numel() for p in trainable_parameters(model))
    n_all = sum(p.numel() for p in model.parameters())
    log.info("model: %.1f M parameters, %.1f M trainable", n_all / 1e6, n_train / 1e6)
    return model, tokenizer


def tokenize(tokenizer, captions: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, padded with EOS to the longest caption (at most ``max_length``)."""
    enc = tokenizer(captions, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]
