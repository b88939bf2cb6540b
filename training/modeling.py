"""The ParaDiffusion model: Llama text encoder (+LoRA) -> (optional projection) -> SD-style UNet.

:class:`ParaDiffusionModel` holds every part that a stage can train (the LLM with its
LoRA, the projection when there is one, the UNet) in ONE ``nn.Module``, so DeepSpeed
(ZeRO-3 included) partitions and checkpoints one model. The VAE is frozen in every stage
and lives outside it. What the official release does (``pipeline_stable_diffusion_llama.py``
and ``demo.py`` of github.com/weijiawu/ParaDiffusion) and is the default here:

- the text feature is ``LlamaModel(ids, attention_mask).last_hidden_state``, the LLM in
  fp32; the pad token is EOS;
- **release conditioning**: every caption is padded with EOS to ``max_length`` tokens
  (the release's tokenizer has ``model_max_length`` 256 and pads to it: "" becomes
  ``<s>`` + 255 ``</s>``) and the UNet gets no attention mask, so it attends to the
  padding too. ``masked`` conditioning pads to the longest caption of the batch and
  passes the mask to the UNet's cross-attention (an option; not what the release does);
- **no projection**: the UNet's ``cross_attention_dim`` is the LLM's hidden size (4096 for
  Llama-2-7B) and it reads the states as they are. ``text_projection: linear`` puts a
  trainable ``Linear(LLM width -> cross_attention_dim)`` in between (the variant the paper's
  text may be read as; the release's code has none);
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
#: How captions become the UNet's cross-attention input (see the module docstring).
CONDITIONING_TYPES = ("release", "masked")
#: Between the LLM and the UNet: nothing (the release) or a trainable Linear.
TEXT_PROJECTION_TYPES = ("none", "linear")
#: Tokens per caption in the release's pipeline (its tokenizer's ``model_max_length``).
RELEASE_MAX_LENGTH = 256


def load_tokenizer(path: str, revision: str | None = None):
    """The LLM's tokenizer with pad = EOS (Llama-2 has no pad token) and right padding.

    transformers 5 rebuilds a Llama tokenizer's pre-tokenization (a ``Metaspace`` that
    prepends "▁" only when the text does not start with a space) instead of using the
    ``tokenizer.json`` of the folder, whose normaliser always prepends "▁" as SentencePiece
    and transformers 4.x (the release's 4.30) do: a prompt starting with a space then gets
    other token ids. When the folder's ``tokenizer.json`` says otherwise, its normaliser and
    pre-tokeniser are put back, so ids are the ones Llama-2 and the release use.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, revision=revision)
    _use_file_pretokenization(tok, path, revision)
    tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def _use_file_pretokenization(tok, path: str, revision: str | None) -> None:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer: nothing rebuilt
        return
    local = Path(path) / "tokenizer.json"
    if local.is_file():
        file = str(local)
    else:
        from transformers.utils import cached_file

        file = cached_file(path, "tokenizer.json", revision=revision, _raise_exceptions_for_missing_entries=False)
    if not file:
        return
    from tokenizers import Tokenizer

    own = Tokenizer.from_file(file)
    if (str(own.normalizer), str(own.pre_tokenizer)) != (str(backend.normalizer), str(backend.pre_tokenizer)):
        log.debug("tokenizer %s: using tokenizer.json's normalizer/pre-tokenizer (%s)", path, own.normalizer)
        backend.normalizer = own.normalizer
        backend.pre_tokenizer = own.pre_tokenizer


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


#: The LoraConfig fields of peft 0.7 (the release's): it builds ``LoraConfig(**adapter_config.json)``
#: and fails on any other key.
PEFT_07_LORA_FIELDS = frozenset(
    "alpha_pattern auto_mapping base_model_name_or_path bias fan_in_fan_out inference_mode init_lora_weights "
    "layers_pattern layers_to_transform loftq_config lora_alpha lora_dropout megatron_config megatron_core "
    "modules_to_save peft_type r rank_pattern revision target_modules task_type".split()
)


def make_lora_config_portable(lora_dir: str | os.PathLike) -> list[str]:
    """Drop from ``adapter_config.json`` the keys peft 0.7 does not know whose value is today's default.

    Such a key changes nothing when it is absent (today's peft fills in the default), and
    without it the release's code (peft 0.7.1) can load the adapter. A key with another
    value is kept (it matters) and returned, so the caller can say the release cannot
    read this adapter.
    """
    from peft import LoraConfig

    f = Path(lora_dir) / "adapter_config.json"
    doc = json.loads(f.read_text())
    defaults = LoraConfig().to_dict()
    empty = (None, {}, [])
    kept = []
    for key in [k for k in doc if k not in PEFT_07_LORA_FIELDS]:
        if key == "peft_version" or doc[key] == defaults.get(key) or (doc[key] in empty and defaults.get(key) in empty):
            del doc[key]
        else:
            kept.append(key)
    f.write_text(json.dumps(doc, indent=2, sort_keys=True))
    return kept


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


def text_width(unet) -> int:
    """The width of the text states the UNet reads: ``encoder_hid_dim`` when it projects them
    itself, else its ``cross_attention_dim``."""
    return int(unet.config.get("encoder_hid_dim") or unet.config.cross_attention_dim)


class ParaDiffusionModel(nn.Module):
    """Text encoder (LLM, maybe with LoRA) + projection (or none) + UNet: everything DeepSpeed wraps.

    ``forward`` takes noisy latents, timesteps and either token ids with their attention
    mask (the LLM runs) or the LLM's states already computed (``encoder_hidden_states``,
    from the text cache: then ``llm`` may be None, the LLM is not loaded at all) and
    returns the UNet's prediction. The LLM always gets the mask (as in the release); the
    UNet gets it only with ``conditioning="masked"``. ``projection`` None means the
    release's shape: the LLM states go to the UNet as they are (held as an ``nn.Identity``,
    so code that walks ``model.projection.parameters()`` finds none). When no LLM
    parameter is trainable (stages 1 and 3) the LLM runs under ``torch.no_grad`` so it
    keeps no activations.
    """

    def __init__(
        self, llm: nn.Module | None, projection: nn.Module | None, unet: nn.Module, conditioning: str = "release"
    ):
        super().__init__()
        if conditioning not in CONDITIONING_TYPES:
            raise ValueError(f"conditioning {conditioning!r}: one of {', '.join(CONDITIONING_TYPES)}")
        self.llm = llm
        self.projection = projection if projection is not None else nn.Identity()
        self.unet = unet
        self.conditioning = conditioning

    @property
    def has_projection(self) -> bool:
        return isinstance(self.projection, nn.Linear)

    @property
    def llm_trainable(self) -> bool:
        return self.llm is not None and any(p.requires_grad for p in self.llm.parameters())

    def unet_mask(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The cross-attention mask the UNet gets: none with release conditioning."""
        return attention_mask if self.conditioning == "masked" else None

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LLM's states -> the UNet's cross-attention input, in the UNet's (or projection's) dtype."""
        dtype = self.projection.weight.dtype if self.has_projection else self.unet.dtype
        return self.projection(hidden.to(dtype))

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, llm_mask: torch.Tensor | None | str = "2d"
    ) -> torch.Tensor:
        """``projection(LlamaModel(ids, mask).last_hidden_state)`` in the UNet's dtype: its cross-attention input.

        ``llm_mask``: the LLM's own attention mask built beforehand on the host by
        :func:`llm_attention_mask` (a tensor, or None for "no mask: causal"); the default "2d"
        lets the LLM build it from ``attention_mask`` (which reads the mask on the device)."""
        if self.llm is None:
            raise RuntimeError(
                "this model was built without its LLM (a text cache feeds it): pass encoder_hidden_states"
            )
        mask = attention_mask if isinstance(llm_mask, str) else llm_mask
        if self.llm_trainable:
            hidden = self.llm(input_ids=input_ids, attention_mask=mask).last_hidden_state
        else:
            with torch.no_grad():
                hidden = self.llm(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return self.project(hidden)

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        llm_mask: torch.Tensor | None | str = "2d",
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:  # the LLM's states, cached: only the projection (if any) runs here
            cond = self.project(encoder_hidden_states)
        else:
            cond = self.encode_text(input_ids, attention_mask, llm_mask)
        return self.unet(
            noisy_latents.to(cond.dtype),
            timesteps,
            encoder_hidden_states=cond,
            encoder_attention_mask=self.unet_mask(attention_mask),
        ).sample


def llm_attention_mask(llm, attention_mask: torch.Tensor) -> torch.Tensor | None:
    """The LLM's attention mask for a 2D ``attention_mask`` on the host, built there by transformers'
    own ``create_causal_mask``: the very mask the LLM's forward builds from the 2D one (so its
    states are the same numbers), without the forward reading the mask's values on the device
    (transformers checks ``padding_mask.all()`` to choose SDPA's ``is_causal``: a wait for the GPU
    in every step of stage 2). None where transformers uses ``is_causal`` (no padding)."""
    from transformers.masking_utils import create_causal_mask

    from training.syncs import host_side

    b, n = attention_mask.shape
    dtype = llm.get_input_embeddings().weight.dtype  # the dtype of the embeddings the forward masks
    shape_only = torch.empty((b, n, 0), dtype=dtype)  # create_causal_mask reads its shape, dtype, device
    with host_side():  # its reads of the mask are of a host tensor
        return create_causal_mask(
            config=llm.config, inputs_embeds=shape_only, attention_mask=attention_mask, cache=None,
            position_ids=torch.arange(n)[None],
        )  # fmt: skip


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def check_text_path(hidden: int, unet, projection: nn.Module | None, where: str = "train.model") -> None:
    """Raise a ValueError naming the settings when the LLM states do not fit the UNet."""
    width = text_width(unet)
    if projection is None:
        if hidden != width:
            raise ValueError(
                f"{where}.text_projection: none (the release's model) needs the UNet's cross_attention_dim "
                f"({width}) to equal the LLM's hidden size ({hidden}); set {where}.unet_config.cross_attention_dim: "
                f"{hidden}, or text_projection: linear to put a Linear({hidden} -> {width}) in between"
            )
    elif (projection.in_features, projection.out_features) != (hidden, width):
        raise ValueError(
            f"projection {projection.in_features}->{projection.out_features} does not fit LLM width {hidden} "
            f"-> UNet cross-attention {width}"
        )


def build_model(
    train_cfg,
    stage_cfg,
    dtype: torch.dtype = torch.float32,
    text_hidden_size: int | None = None,
    llm_dtype: torch.dtype | None = None,
) -> tuple[ParaDiffusionModel, object]:
    """Build the stage's model and tokenizer from the config; sets what is trainable.

    ``stage_cfg.init_from`` (the previous stage's export folder) provides the UNet, the
    projection when it has one and, when present, the stage-2 LoRA: stage 2 continues
    training it only when the folder has none (fresh LoRA otherwise); stage 3 merges it
    and keeps the LLM frozen. ``train.model.text_projection`` must agree with the folder.

    ``text_hidden_size`` set: a text cache gives the LLM's states, so neither the LLM nor
    its tokenizer is loaded (the model's ``llm`` and the returned tokenizer are None);
    the LLM's width comes from the cache. ``llm_dtype``: the LLM's weights (None: ``dtype``),
    ``dtype``: the UNet's and the projection's. Gradient checkpointing and ``torch.compile``
    follow the stage's ``gradient_checkpointing`` and ``compile`` blocks.
    """
    mcfg = train_cfg.model
    init = Path(stage_cfg.init_from) if stage_cfg.init_from else None
    if init is not None and not (init / "unet").is_dir():
        raise FileNotFoundError(
            f"init_from {init}: not an export folder (no unet/); point it at the previous stage's <output>/export"
        )
    gc, comp = stage_cfg.gradient_checkpointing, stage_cfg.compile
    lora_dir = init / LORA_DIR if init is not None and (init / LORA_DIR).is_dir() else None
    tokenizer = llm = None
    if text_hidden_size is None:
        tokenizer = load_tokenizer(mcfg.llm, mcfg.llm_revision)
        llm = load_frozen_llm(
            mcfg.llm, mcfg.llm_revision, llm_dtype or dtype, None if stage_cfg.train_lora else lora_dir
        )
        if stage_cfg.train_lora:
            if lora_dir is not None:
                from peft import PeftModel

                llm = PeftModel.from_pretrained(llm, str(lora_dir), is_trainable=True)
            else:
                lc = train_cfg.lora
                llm = add_lora(llm, lc.rank, lc.alpha, lc.dropout, lc.target_modules)
            if gc.llm:
                if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5.2 name
                    llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                else:
                    llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        llm.eval()  # no dropout in the encoder; LoRA dropout follows its own config
        hidden = llm.config.hidden_size
    else:
        hidden = int(text_hidden_size)

    if init is not None:
        unet = build_unet(str(init), subfolder="unet")
    else:
        unet = build_unet(mcfg.unet, mcfg.unet_subfolder, mcfg.unet_config)
    if gc.unet:
        unet.enable_gradient_checkpointing()
    projection: nn.Linear | None = None
    if init is not None:
        has = (init / PROJECTION_DIR).is_dir()
        if has != (mcfg.text_projection == "linear"):
            raise ValueError(
                f"train.model.text_projection: {mcfg.text_projection}, but {init} was trained "
                f"{'with' if has else 'without'} one ({PROJECTION_DIR}/ {'present' if has else 'absent'}); "
                f"set text_projection: {'linear' if has else 'none'}"
            )
        if has:
            projection = load_projection(init / PROJECTION_DIR)
        info = init / "paradiffusion.json"
        before = json.loads(info.read_text()).get("conditioning", "masked") if info.is_file() else None
        if before is not None and before != mcfg.conditioning:
            log.warning(
                "%s was trained with %s conditioning; this stage uses %s (train.model.conditioning)",
                init,
                before,
                mcfg.conditioning,
            )
    elif mcfg.text_projection == "linear":
        projection = nn.Linear(hidden, text_width(unet))
    check_text_path(hidden, unet, projection)
    unet.requires_grad_(True)
    if projection is not None:
        projection.requires_grad_(True)
    if dtype != torch.float32:  # DeepSpeed casts again for bf16; this only saves host memory early
        unet = unet.to(dtype)
        projection = projection.to(dtype) if projection is not None else None
    # nn.Module.compile compiles in place: parameter names (checkpoints, EMA, export) stay the same
    compile_kwargs = {"mode": None if comp.mode == "default" else comp.mode, "backend": comp.backend,
                      "dynamic": comp.dynamic}  # fmt: skip
    if comp.unet:
        unet.compile(**compile_kwargs)
    if comp.llm and llm is not None:
        llm.compile(**compile_kwargs)
    model = ParaDiffusionModel(llm, projection, unet, conditioning=mcfg.conditioning)
    n_train = sum(p.numel() for p in trainable_parameters(model))
    n_all = sum(p.numel() for p in model.parameters())
    log.info(
        "model: %.1f M parameters, %.1f M trainable; %s conditioning, %s%s",
        n_all / 1e6,
        n_train / 1e6,
        mcfg.conditioning,
        "Linear projection" if projection is not None else "no projection (the release's shape)",
        "; LLM not loaded (text cache)" if llm is None else "",
    )
    return model, tokenizer


def load_frozen_llm(path: str, revision: str | None, dtype: torch.dtype, lora_dir: str | Path | None = None):
    """The frozen LLM as a stage (and the text cache) computes with it: loaded in ``dtype``,
    with ``lora_dir``'s LoRA merged into its weights when given (stage 3), no gradients."""
    llm = load_llm(path, revision, dtype=dtype)
    llm.requires_grad_(False)
    if lora_dir is not None:
        llm = merge_lora(llm, str(lora_dir))
        llm.requires_grad_(False)
    return llm.eval()


def weights_fingerprint(tensors) -> dict:
    """Count, sum and sum of squares (float64) of some weights: a cheap identity of frozen weights."""
    t = torch.zeros(2, dtype=torch.float64)
    n = 0
    for x in tensors:
        x = x.detach()
        n += x.numel()
        t[0] += x.sum(dtype=torch.float64).cpu()
        t[1] += torch.linalg.vector_norm(x, dtype=torch.float64).square().cpu()
    return {"params": n, "sum": float(t[0]), "sum_sq": float(t[1])}


def tokenize(
    tokenizer, captions: list[str], max_length: int, conditioning: str = "release"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of ``captions``, cut at ``max_length`` tokens.

    ``release``: padded with EOS to exactly ``max_length`` (the release's
    ``padding="max_length"``); ``masked``: padded to the longest caption of the batch.
    """
    if conditioning not in CONDITIONING_TYPES:
        raise ValueError(f"conditioning {conditioning!r}: one of {', '.join(CONDITIONING_TYPES)}")
    padding = "max_length" if conditioning == "release" else "longest"
    enc = tokenizer(captions, padding=padding, truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]
