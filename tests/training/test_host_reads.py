"""Host reads of tensor values in a training step, process-wide: from any caller (torch's
optimizer, DeepSpeed, transformers, diffusers, ours), counted by training.syncs.HostReads and
pinned per step with their sources. On a GPU each read of a device tensor is a wait for the
device; reads of tensors that stay on the host in a GPU run too are counted as ``host ...``.
bench/train_gpu.py counts the real waits on a GPU (torch.cuda.set_sync_debug_mode)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from train_fixtures import tiny_config, write_image_shards

from training.syncs import HostReads, device_reads, host_side
from training.trainer import Trainer

DS = "deepspeed/runtime"
#: DeepSpeed ZeRO-1/2's step: its overflow check (bf16 with check_grad_overflow) and the gradient-norm
#: test before the step (fp32, or bf16 with the check), and the clipping's test of the norm (clipping on).
OVERFLOW = {f"item {DS}/zero/stage_1_and_2.py:has_overflow": 1}
NORM_TESTS = {f"item {DS}/utils.py:is_invalid_grad_norm": 2}
CLIP_TEST = {f"item {DS}/utils.py:is_invalid_grad_norm": 1}
ADAMW = {"host item torch/optim/optimizer.py:_get_value": 1}  # its step counter: a CPU tensor
#: transformers reading the LLM's 2D mask (to choose SDPA's is_causal): done on the host by
#: training.modeling.llm_attention_mask, so the LLM's forward reads nothing on the device.
LLM_MASK = {"host item transformers/masking_utils.py:_ignore_causal_mask_sdpa": 2}

CASES = {
    # LLM run every step (frozen, stage 1 without a text cache), bf16 as on a GPU
    "llm-bf16": ({"precision": "bf16"}, {}, {**OVERFLOW, **NORM_TESTS, **ADAMW, **LLM_MASK}),
    # stage 2's shape (the LoRA trains, the LLM runs every step), DeepSpeed's per-step check off
    "lora-bf16-nocheck": ({"precision": "bf16", "check_grad_overflow": False}, {"train_lora": True, "max_length": 32},
                          {**CLIP_TEST, **ADAMW, **LLM_MASK}),
    # the text cache (stages 1 and 3): no LLM in the step; fp32 (DeepSpeed tests the norm in fp32)
    "text-cache-fp32": ({"precision": "fp32"}, {"text_cache": True}, {**NORM_TESTS, **ADAMW}),
}  # fmt: skip


class _Counted(Trainer):
    def setup(self):
        super().setup()
        self.per_step: list[Counter] = []

    def train_step(self, batches):
        with HostReads() as reads:
            m = super().train_step(batches)
        self.per_step.append(reads.take())
        return m


@pytest.mark.parametrize("case", list(CASES))
def test_host_reads_per_step_are_pinned_with_their_sources(tiny_models, tmp_path, case):
    ds, stage, want = CASES[case]
    write_image_shards(tmp_path / "images", n_shards=1, per_shard=6)
    cfg = tiny_config(tiny_models, tmp_path, max_steps=3, caption_dropout=0.5,
                      **{"logging.every_steps": 3, "data.num_workers": 0})  # fmt: skip
    for k, v in ds.items():
        setattr(cfg.train.deepspeed, k, v)
    cfg.train.stage1.train_lora = stage.get("train_lora", False)
    cfg.train.stage1.max_length = stage.get("max_length", cfg.train.stage1.max_length)
    if stage.get("text_cache"):
        from training.text_cache import cache_text

        cfg.train.stage1.data.text_cache = str(tmp_path / "tc")
        cache_text(cfg, 1)
    t = _Counted(cfg, 1)
    t.train()
    got = [dict(s) for s in t.per_step]
    print(case, json.dumps(got, indent=1))
    assert len(got) == 3
    assert got == [want] * 3  # every step: exactly these reads, from these callers
    per_step = device_reads(Counter(want))
    assert per_step == {"llm-bf16": 3, "lora-bf16-nocheck": 1, "text-cache-fp32": 2}[case]


def _foreign_step(x: torch.Tensor) -> None:
    """Reads as other libraries make them (the counter does not care who calls)."""
    torch.nonzero(x > 0)
    bool((x > 0).any())
    x.sum().item()
    x.tolist()


def test_the_counter_sees_every_kind_of_read_from_any_caller():
    x = torch.randn(8)
    with HostReads() as reads:
        _foreign_step(x)
        with host_side():
            x.max().item()
        y = x * 2  # no read
        torch.repeat_interleave(y, torch.tensor([1] * 8), output_size=8)  # the size given: no read
    got = reads.take()
    src = "tests/training/test_host_reads.py:_foreign_step"
    assert got == Counter({f"nonzero {src}": 1, f"item {src}": 2, f"tolist {src}": 1,
                           "host item tests/training/test_host_reads.py:test_the_counter_sees_every_kind_of_read_from_any_caller": 1})  # fmt: skip
    assert device_reads(got) == 4
    with HostReads() as reads:
        pass
    assert reads.take() == Counter()
