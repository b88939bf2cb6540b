"""One precision per text state: the LLM states a stage trains on are the states it samples with.

Training in bf16 (DeepSpeed on its CPU accelerator here), the frozen LLM still computes in
``train.model.llm_dtype`` (fp32 by default, what the release samples with): the states the UNet
trains on in the step, the states ``cache-text`` stores, and the states ``generate`` computes
from the export (whose paradiffusion.json records the dtype) are the same numbers. The bf16
alternative is measured against it: its difference in the states and in one denoising step."""

from __future__ import annotations

import json

import torch
from train_fixtures import tiny_config, write_image_shards

from training.trainer import Trainer


class _Captured(Trainer):
    """Keeps the token ids, the 2D attention mask and the LLM's last hidden states of every
    training forward (the LLM itself gets the mask built on the host: training.modeling.llm_attention_mask)."""

    def setup(self):
        super().setup()
        self.seen, self.masks = [], []

        def hook(module, args, kwargs, out):
            self.seen.append((kwargs["input_ids"].clone(), self.masks[len(self.seen)], out.last_hidden_state))

        self.model.llm.register_forward_hook(hook, with_kwargs=True)

    def _text_inputs(self, batch, dropped):
        text = super()._text_inputs(batch, dropped)
        self.masks.append(text["attention_mask"].clone())
        return text


def test_training_cache_and_generate_share_the_llm_states(tiny_models, tmp_path):
    from training.modeling import load_llm
    from training.pipeline import ParaDiffusionPipeline
    from training.text_cache import TextCache, cache_text

    write_image_shards(tmp_path / "images", n_shards=1, per_shard=4)
    cfg = tiny_config(tiny_models, tmp_path, max_steps=2, caption_dropout=0.0,
                      **{"data.num_workers": 0, "ema.enabled": False})  # fmt: skip
    cfg.train.deepspeed.precision = "bf16"
    t = _Captured(cfg, 1)
    t.train()
    assert t.dtype == torch.bfloat16 and t.model.unet.dtype == torch.bfloat16
    assert {p.dtype for p in t.model.llm.parameters()} == {torch.float32}  # not cast by DeepSpeed's bf16 engine
    info = json.loads((tmp_path / "train" / "stage1" / "export" / "paradiffusion.json").read_text())
    assert info["llm_dtype"] == "float32"

    pipe = ParaDiffusionPipeline.from_pretrained(str(tmp_path / "train" / "stage1" / "export"), device="cpu")
    assert next(pipe.llm.parameters()).dtype == torch.float32  # as recorded, with no llm_dtype given
    ids, mask, trained = t.seen[0]
    assert trained.dtype == torch.float32
    with torch.no_grad():
        sampled = pipe.llm(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(sampled, trained)  # the same numbers, not merely close

    cfg.train.stage1.data.text_cache = str(tmp_path / "tc")
    cache_text(cfg, 1)
    cache = TextCache(str(tmp_path / "tc"))
    assert cache.settings["dtype"] == "float32"
    caption = pipe.tokenizer.decode(ids[0][mask[0].bool()], skip_special_tokens=True)
    states, _ = cache.batch([caption])
    assert torch.equal(states[0], trained[0])

    # the bf16 LLM (llm_dtype: bfloat16, recorded so generate follows it): measured against fp32
    bf16 = load_llm(tiny_models["llm"], dtype=torch.bfloat16)
    with torch.no_grad():
        low = bf16(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        d_states = float((low - trained).abs().max())
        scale = float(trained.abs().max())
        unet = t.model.unet.float()
        x = torch.randn((ids.shape[0], unet.config.in_channels, 4, 4), generator=torch.Generator().manual_seed(0))
        step = torch.full((ids.shape[0],), 500)
        eps = unet(x, step, encoder_hidden_states=trained).sample
        eps_low = unet(x, step, encoder_hidden_states=low).sample
        d_eps = float((eps_low - eps).abs().max())
    print(json.dumps({"max_abs_states": d_states, "states_scale": scale, "max_abs_eps": d_eps}))
    # measured on the tiny model (2-layer Llama, width 64): states 2.9e-2 (0.7 % of their largest, 4.2),
    # one UNet step's output 8.4e-4; bounded at about twice that
    assert 0 < d_states <= 1.5e-2 * scale
    assert 0 < d_eps <= 2e-3
