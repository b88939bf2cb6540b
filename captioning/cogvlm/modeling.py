"""CogVLM and CogVLM2 on the pinned transformers: no remote code, the Cache API, SDPA, batched generate.

One implementation serves both families; the config says which (see
:mod:`captioning.cogvlm.configuration`):

- an EVA2-CLIP vision tower (``model.vision``): patch embedding + CLS + learned positions,
  post-norm transformer layers, then (CogVLM2 only) a 2x2 strided conv that merges patches,
  a gated adapter (``linear_proj``) into the LLM width, and learned BOI/EOI embeddings;
- a Llama decoder whose attention projections and MLPs come in two copies, a *language
  expert* and a *vision expert*; a token uses the vision expert when it **and the next
  token** are image tokens (so EOI uses the language expert), as the reference does;
- image tokens share one rotary position (BOI, the patches and EOI take three), so a
  prompt's positions are :func:`build_position_ids` of its token types. With left padding
  the first real token gets position 1 instead of 0: that is what the reference computes
  for padded rows, and it is kept.

Parameter and buffer names are the published checkpoints' (``model.layers.N.self_attn.
language_expert_query_key_value.weight``, ``...rotary_emb.inv_freq``, ``model.vision.
transformer.layers.N.attention.query_key_value.weight``, ...), so the official sharded
safetensors load as they are. Rotary angles are computed in the activations' dtype, as
the reference does once loaded in bf16/fp16.

Differences from the reference code, all numerically neutral in fp32: attention goes
through transformers' attention interface (SDPA by default) instead of a hand-written
softmax; the KV cache is a transformers :class:`~transformers.Cache` (dynamic or static)
instead of tuples; during decoding every new token is a language token, so the decode
step applies the language expert directly (no boolean indexing: shapes stay static and
the step compiles).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from captioning.cogvlm.configuration import CogVLM2Config, CogVLMConfig

LANGUAGE_TOKEN_TYPE = 0
VISION_TOKEN_TYPE = 1


# --------------------------------------------------------------------------- token types
def vision_expert_mask(token_type_ids: torch.Tensor) -> torch.Tensor:
    """True where a token takes the vision expert: it and the next token are image tokens."""
    mask = torch.zeros_like(token_type_ids, dtype=torch.bool)
    mask[:, :-1] = (token_type_ids[:, :-1] == VISION_TOKEN_TYPE) & (token_type_ids[:, 1:] == VISION_TOKEN_TYPE)
    return mask


def build_position_ids(token_type_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary positions of a (left-padded) batch: language tokens count up, an image takes three.

    BOI and EOI count as language tokens; the patches between them share the position
    after BOI. Padding (``attention_mask == 0``) does not count, but the first real token
    still counts when it is not the first column, as in the reference.
    """
    tmp = token_type_ids.clone()
    if attention_mask is not None:
        tmp[~attention_mask.bool()] = -1
    is_boi_eoi = torch.zeros_like(tmp, dtype=torch.bool)
    is_boi_eoi[:, 1:] |= (tmp[:, 1:] == VISION_TOKEN_TYPE) & (tmp[:, :-1] == LANGUAGE_TOKEN_TYPE)
    is_boi_eoi[:, 0] |= tmp[:, 0] == VISION_TOKEN_TYPE
    is_boi_eoi[:, :-1] |= (tmp[:, :-1] == VISION_TOKEN_TYPE) & (tmp[:, 1:] == LANGUAGE_TOKEN_TYPE)
    is_boi_eoi[:, -1] |= tmp[:, -1] == VISION_TOKEN_TYPE
    tmp[is_boi_eoi] = LANGUAGE_TOKEN_TYPE
    y = torch.zeros_like(tmp, dtype=torch.long)
    y[:, 1:] = (tmp[:, 1:] == LANGUAGE_TOKEN_TYPE) | (
        (tmp[:, 1:] == VISION_TOKEN_TYPE) & (tmp[:, :-1] == LANGUAGE_TOKEN_TYPE)
    )
    return y.cumsum(dim=-1)


def _by_expert(
    x: torch.Tensor, vision_mask: torch.Tensor | None, language: nn.Module, vision: nn.Module, out_dim: int
) -> torch.Tensor:
    """``language(x)`` where the mask is False, ``vision(x)`` where it is True (all language when it is None)."""
    if vision_mask is None:
        return language(x)
    out = x.new_empty((*x.shape[:-1], out_dim))
    out[vision_mask] = vision(x[vision_mask])
    lang = ~vision_mask
    out[lang] = language(x[lang])
    return out


# --------------------------------------------------------------------------- vision tower (EVA2-CLIP)
class PatchEmbedding(nn.Module):
    def __init__(self, vc: dict):
        super().__init__()
        self.proj = nn.Conv2d(
            vc["in_channels"], vc["hidden_size"], kernel_size=vc["patch_size"], stride=vc["patch_size"]
        )
        self.cls_embedding = nn.Parameter(torch.zeros(1, vc["hidden_size"]))
        self.position_embedding = nn.Embedding(vc["num_positions"], vc["hidden_size"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.proj(images).flatten(2).transpose(1, 2)
        cls = self.cls_embedding.expand(x.shape[0], -1, -1)
        return torch.cat((cls, x), dim=1) + self.position_embedding.weight.unsqueeze(0)


class VisionAttention(nn.Module):
    def __init__(self, vc: dict):
        super().__init__()
        self.num_heads = vc["num_heads"]
        self.scale = (vc["hidden_size"] // vc["num_heads"]) ** -0.5
        self.query_key_value = nn.Linear(vc["hidden_size"], vc["hidden_size"] * 3)
        self.dense = nn.Linear(vc["hidden_size"], vc["hidden_size"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.query_key_value(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        # the reference calls xformers' memory_efficient_attention: the same full attention
        out = nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.scale)
        return self.dense(out.transpose(1, 2).reshape(b, n, -1))


class VisionMLP(nn.Module):
    def __init__(self, vc: dict):
        super().__init__()
        self.act = ACT2FN[vc["hidden_act"]]
        self.fc1 = nn.Linear(vc["hidden_size"], vc["intermediate_size"])
        self.fc2 = nn.Linear(vc["intermediate_size"], vc["hidden_size"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    """EVA2-CLIP's layer: the norms apply to each branch's output (sandwich/post-norm), not its input."""

    def __init__(self, vc: dict):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(vc["hidden_size"], eps=vc["layer_norm_eps"])
        self.attention = VisionAttention(vc)
        self.mlp = VisionMLP(vc)
        self.post_attention_layernorm = nn.LayerNorm(vc["hidden_size"], eps=vc["layer_norm_eps"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.input_layernorm(self.attention(x))
        return x + self.post_attention_layernorm(self.mlp(x))


class VisionTransformer(nn.Module):
    def __init__(self, vc: dict):
        super().__init__()
        self.layers = nn.ModuleList([VisionLayer(vc) for _ in range(vc["num_hidden_layers"])])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class GLU(nn.Module):
    """The adapter from the vision width to the LLM width (a SwiGLU after a linear + LayerNorm + GELU)."""

    def __init__(self, config: CogVLMConfig, in_features: int):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.linear_proj = nn.Linear(in_features, h, bias=False)
        self.norm1 = nn.LayerNorm(h)
        self.act1 = nn.GELU()
        self.dense_h_to_4h = nn.Linear(h, i, bias=False)
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.dense_4h_to_h = nn.Linear(i, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(nn.functional.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))


class EVA2CLIPModel(nn.Module):
    """Images (N, 3, S, S) -> (N, vision_tokens, hidden): BOI, the (merged) patches, EOI."""

    def __init__(self, config: CogVLMConfig):
        super().__init__()
        vc = config.vision_config
        self.patch_embedding = PatchEmbedding(vc)
        self.transformer = VisionTransformer(vc)
        self.linear_proj = GLU(config, in_features=vc["hidden_size"])
        if config.vision_downsample > 1:
            d = config.vision_downsample
            self.conv = nn.Conv2d(vc["hidden_size"], vc["hidden_size"], kernel_size=d, stride=d)
        self.boi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.eoi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.transformer(self.patch_embedding(images))[:, 1:]
        if hasattr(self, "conv"):
            b, s, h = x.shape
            g = int(s**0.5)
            x = self.conv(x.view(b, g, g, h).permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
        x = self.linear_proj(x)
        return torch.cat((self.boi.expand(x.shape[0], -1, -1), x, self.eoi.expand(x.shape[0], -1, -1)), dim=1)


# --------------------------------------------------------------------------- language model
class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight * x).to(dtype)


class MLP(nn.Module):
    def __init__(self, config: CogVLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class VisionExpertMLP(nn.Module):
    def __init__(self, config: CogVLMConfig):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.language_mlp = MLP(config)
        self.vision_mlp = MLP(config)

    def forward(self, x: torch.Tensor, vision_mask: torch.Tensor | None) -> torch.Tensor:
        return _by_expert(x, vision_mask, self.language_mlp, self.vision_mlp, self.hidden_size)


class CogVLMRotaryEmbedding(nn.Module):
    """Rotary frequencies; ``inv_freq`` is a persistent buffer, as in the checkpoints (``...rotary_emb.inv_freq``).

    Angles are computed in the activations' dtype, as the reference does: loaded in bf16 or
    fp16 its ``inv_freq`` buffer takes that dtype and it multiplies positions in it (so in
    bf16, positions above 256 and large angles are rounded). In fp32 this is plain RoPE.
    """

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.head_dim, self.base = head_dim, base
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=True)

    def compute_inv_freq(self, device=None) -> torch.Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim))

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].to(x.dtype) * self.inv_freq.to(x.dtype)
        return freqs.cos(), freqs.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the head dim (GPT-NeoX layout); x: (B, H, L, D), cos/sin: (B, L, D/2)."""
    half = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]
    x0, x1 = x[..., :half], x[..., half:]
    return torch.cat((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)


def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Softmax attention in the reference's order of operations (``attn_implementation="eager"``).

    The query is scaled before the product and the softmax runs in fp32, as in the reference's
    ``attention_fn``, so bf16/fp16 results round as the reference's do (SDPA rounds differently).
    """
    groups = module.num_key_value_groups
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query * scaling, key.transpose(2, 3))
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class VisionExpertAttention(nn.Module):
    def __init__(self, config: CogVLMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.qkv_size = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.rotary_emb = CogVLMRotaryEmbedding(self.head_dim, config.rope_theta)
        self.vision_expert_query_key_value = nn.Linear(self.hidden_size, self.qkv_size, bias=config.is_cogvlm2)
        self.vision_expert_dense = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        self.language_expert_query_key_value = nn.Linear(self.hidden_size, self.qkv_size, bias=False)
        self.language_expert_dense = nn.Linear(self.hidden_size, self.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        vision_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        b, q_len, _ = hidden_states.shape
        qkv = _by_expert(
            hidden_states,
            vision_mask,
            self.language_expert_query_key_value,
            self.vision_expert_query_key_value,
            self.qkv_size,
        )
        q, k, v = qkv.split([self.num_heads * self.head_dim, *[self.num_kv_heads * self.head_dim] * 2], dim=-1)
        q = q.view(b, q_len, -1, self.head_dim).transpose(1, 2)
        k = k.view(b, q_len, -1, self.head_dim).transpose(1, 2)
        v = v.view(b, q_len, -1, self.head_dim).transpose(1, 2)
        cos, sin = self.rotary_emb(v, position_ids)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)
        out, _ = attention(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        out = out.reshape(b, q_len, self.hidden_size)
        return _by_expert(out, vision_mask, self.language_expert_dense, self.vision_expert_dense, self.hidden_size)


class CogVLMDecoderLayer(nn.Module):
    def __init__(self, config: CogVLMConfig, layer_idx: int):
        super().__init__()
        self.self_attn = VisionExpertAttention(config, layer_idx)
        self.mlp = VisionExpertMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states, vision_mask, position_ids, attention_mask, cache=None, **kwargs) -> torch.Tensor:
        h = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), vision_mask, position_ids, attention_mask, cache, **kwargs
        )
        return h + self.mlp(self.post_attention_layernorm(h), vision_mask)


class CogVLMPreTrainedModel(PreTrainedModel):
    config_class = CogVLMConfig
    config: CogVLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["CogVLMDecoderLayer", "VisionLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.(cos|sin)_cached"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, CogVLMRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq(module.inv_freq.device))
        elif isinstance(module, PatchEmbedding):
            init.zeros_(module.cls_embedding)
        elif isinstance(module, EVA2CLIPModel):
            init.zeros_(module.boi)
            init.zeros_(module.eoi)


class CogVLMModel(CogVLMPreTrainedModel):
    def __init__(self, config: CogVLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([CogVLMDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.vision = EVA2CLIPModel(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        q_len = inputs_embeds.shape[1]
        vision_mask = None
        if token_type_ids is not None and q_len > 1:
            is_image = token_type_ids == VISION_TOKEN_TYPE
            if pixel_values is not None:
                features = self.vision(pixel_values.to(self.vision.patch_embedding.proj.weight.dtype))
                features = features.reshape(-1, features.shape[-1]).to(inputs_embeds.dtype)
                if features.shape[0] != int(is_image.sum()):
                    raise ValueError(
                        f"{int(is_image.sum())} image token(s) in token_type_ids but {features.shape[0]} image "
                        f"feature(s) from {pixel_values.shape[0]} image(s)"
                    )
                inputs_embeds = inputs_embeds.index_put((is_image,), features)
            elif bool(is_image.any()):
                raise ValueError("token_type_ids mark image tokens but no pixel_values were given")
            vision_mask = vision_expert_mask(token_type_ids)
            if not bool(vision_mask.any()):
                vision_mask = None  # text only: the language expert everywhere
        if use_cache is None:
            use_cache = self.config.use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            if token_type_ids is not None and q_len > 1:
                position_ids = build_position_ids(token_type_ids, attention_mask)
            else:
                past = cache.get_seq_length() if cache is not None else 0
                position_ids = torch.arange(past, past + q_len, device=inputs_embeds.device).unsqueeze(0)
                position_ids = position_ids.expand(inputs_embeds.shape[0], -1)
        # position_ids are not passed: CogVLM's repeat for image tokens and would read as packed sequences
        mask = create_causal_mask(
            config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache
        )
        h = inputs_embeds
        for layer in self.layers:
            h = layer(h, vision_mask, position_ids, mask, cache, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(h), cache=cache)


class CogVLMForCausalLM(CogVLMPreTrainedModel, GenerationMixin):
    """The captioning model: ``generate(input_ids, token_type_ids, attention_mask, pixel_values, ...)``.

    Build the inputs with :class:`captioning.cogvlm.processing.CogVLMProcessor`. Position
    ids are derived from the token types (:func:`build_position_ids`) and then advance by
    one per generated token, which ``generate`` does on its own once they are passed in.
    """

    def __init__(self, config: CogVLMConfig):
        super().__init__(config)
        self.model = CogVLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            token_type_ids=token_type_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            h = h[:, logits_to_keep]
        logits = self.lm_head(h).float()
        return CausalLMOutputWithPast(logits=logits, cache=out.cache)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        **kwargs,
    ):
        """``GenerationMixin.generate`` with CogVLM's position ids filled in from the token types."""
        if token_type_ids is not None and position_ids is None:
            position_ids = build_position_ids(token_type_ids, attention_mask)
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


__all__ = [
    "CogVLM2Config",
    "CogVLMConfig",
    "CogVLMForCausalLM",
    "CogVLMModel",
    "build_position_ids",
    "vision_expert_mask",
]
