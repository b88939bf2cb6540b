"""Native CogVLM and CogVLM2 (no remote code) for the pinned transformers: config, model, processor, loader.

``type: cogvlm`` in ``caption.captioners`` uses this package; see
:class:`captioning.captioners.CogVLMCaptioner`. The tests prove it equal to the reference
(Hub remote) code on tiny random models: ``tests/captioning/test_cogvlm_parity.py``.
"""

from captioning.cogvlm.configuration import CogVLM2Config, CogVLMConfig, config_class_for
from captioning.cogvlm.loading import CheckpointError, check_checkpoint, load_model
from captioning.cogvlm.processing import TEMPLATES, CogVLMProcessor, render_prompt

__all__ = [
    "TEMPLATES",
    "CheckpointError",
    "CogVLM2Config",
    "CogVLMConfig",
    "CogVLMProcessor",
    "check_checkpoint",
    "config_class_for",
    "load_model",
    "render_prompt",
]
