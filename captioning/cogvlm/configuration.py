"""Configurations of CogVLM (``THUDM/cogvlm-*-hf``) and CogVLM2 (``THUDM/cogvlm2-llama3-*``).

They read and write the ``config.json`` of the official checkpoints field for field (the
vision tower's settings stay a plain ``vision_config`` dict, as on the Hub), so a published
folder loads unchanged and a saved one looks like a published one. Which of the two a
folder holds is decided by :func:`config_class_for`: CogVLM2 configs carry
``num_multi_query_heads`` (grouped-query attention), CogVLM v1 configs do not.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

#: ``vision_config`` of cogvlm-chat-hf / cogvlm-base-490-hf (EVA2-CLIP-E, 490 px, 14 px patches).
COGVLM_VISION = {
    "dropout_prob": 0.0,
    "hidden_act": "gelu",
    "in_channels": 3,
    "num_hidden_layers": 63,
    "hidden_size": 1792,
    "patch_size": 14,
    "num_heads": 16,
    "intermediate_size": 15360,
    "layer_norm_eps": 1e-06,
    "num_positions": 1226,
    "image_size": 490,
}

#: ``vision_config`` of cogvlm2-llama3-chat-19B (the same tower at 1344 px, then a 2x2 conv).
COGVLM2_VISION = {**COGVLM_VISION, "num_positions": 9217, "image_size": 1344}


class CogVLMConfig(PretrainedConfig):
    """CogVLM v1: Vicuna-7B (Llama) with visual experts + EVA2-CLIP-E; defaults are cogvlm-chat-hf's."""

    model_type = ""  # the Hub configs carry no model_type; config_class_for tells the families apart

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        intermediate_size: int = 11008,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-5,
        template_version: str = "chat",
        pad_token_id: int | None = 0,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        vision_config: dict[str, Any] | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.template_version = template_version
        self.use_cache = use_cache
        self.vision_config = dict(vision_config if vision_config is not None else self.default_vision())
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.tie_word_embeddings = tie_word_embeddings
        super().__init__(**kwargs)

    @staticmethod
    def default_vision() -> dict[str, Any]:
        return COGVLM_VISION

    # -- what the modelling code asks of a config, in one place for both versions
    @property
    def is_cogvlm2(self) -> bool:
        return False

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads

    @property
    def rope_theta(self) -> float:
        return 10000.0

    @property
    def vision_downsample(self) -> int:
        """Side of the conv that merges patches before the adapter (1: none)."""
        return 1

    @property
    def vision_tokens(self) -> int:
        """Tokens one image takes in the sequence: the patch grid (after merging) plus BOI and EOI."""
        grid = self.vision_config["image_size"] // self.vision_config["patch_size"] // self.vision_downsample
        return grid * grid + 2


class CogVLM2Config(CogVLMConfig):
    """CogVLM2: Llama-3-8B with visual experts and grouped-query attention; defaults are cogvlm2-llama3-chat-19B's."""

    model_type = ""

    def __init__(
        self,
        vocab_size: int = 128256,
        hidden_size: int = 4096,
        intermediate_size: int = 14336,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_multi_query_heads: int = 8,
        max_position_embeddings: int = 8192,
        rms_norm_eps: float = 1e-5,
        pad_token_id: int | None = 128002,
        bos_token_id: int | None = 128000,
        eos_token_id: int | list[int] | None = 128001,
        **kwargs,
    ):
        self.num_multi_query_heads = num_multi_query_heads
        super().__init__(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            max_position_embeddings=max_position_embeddings,
            rms_norm_eps=rms_norm_eps,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            **kwargs,
        )

    @staticmethod
    def default_vision() -> dict[str, Any]:
        return COGVLM2_VISION

    @property
    def is_cogvlm2(self) -> bool:
        return True

    @property
    def num_key_value_heads(self) -> int:
        return self.num_multi_query_heads

    @property
    def rope_theta(self) -> float:
        return 500000.0

    @property
    def vision_downsample(self) -> int:
        return 2


def config_class_for(config_dict: dict[str, Any]) -> type[CogVLMConfig]:
    """CogVLM2 when the ``config.json`` has ``num_multi_query_heads`` (as cogvlm2-* do), else CogVLM v1."""
    return CogVLM2Config if "num_multi_query_heads" in config_dict else CogVLMConfig
