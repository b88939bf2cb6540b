"""bf16 training keeps fp32 where it matters: the EMA and the exports come from DeepSpeed's
fp32 master weights (ZeRO-2 and ZeRO-3, one CPU rank, bf16 on DeepSpeed's CPU accelerator)."""

from __future__ import annotations

import json

import pytest
import torch
from train_fixtures import tiny_config, write_image_shards

from training.ema import Fragment, ShardedEMA
from training.trainer import Trainer


def test_ema_of_bf16_training_moves_like_the_fp32_reference():
    """The simulation behind the fp32 EMA (numbers quoted in README): 20k steps of weights near 1
    drifting by 0.2 in total; the decay is the default (0.9999 with the (1+k)/(10+k) warmup).
    Our EMA, fed the fp32 masters, follows a float64 EMA; an EMA kept in bf16 from the bf16
    weights (what the trainer did before) stalls near its start."""
    steps, n, drift = 20_000, 512, 0.2
    w0 = 1.0 + torch.linspace(-0.25, 0.25, n)
    master = w0.clone()
    ours = ShardedEMA([Fragment("w", master.shape, 0, master)], decay=0.9999, warmup="ratio")
    ref = w0.double()
    bf16 = w0.bfloat16()
    for t in range(1, steps + 1):
        master.copy_(w0 + drift * t / steps)  # the optimizer updates the masters in place
        d = ours.update([Fragment("w", master.shape, 0, master)])
        assert d == (0.0 if t == 1 else min(0.9999, t / (9 + t)))  # (1 + k) / (10 + k), k = t - 1
        ref = d * ref + (1 - d) * master.double()
        bf16 = bf16 - (1 - d) * (bf16 - master.bfloat16())  # in bf16, from the bf16 module weights
    moved = {
        "weights": float((master - w0).mean()),
        "fp32 EMA (ours)": float((ours.values["w"] - w0).mean()),
        "float64 reference": float((ref - w0.double()).mean()),
        "bf16 EMA": float((bf16.float() - w0).mean()),
    }
    print(json.dumps(moved))
    assert abs(moved["weights"] - drift) < 1e-5
    assert abs(moved["fp32 EMA (ours)"] - moved["float64 reference"]) < 1e-4
    assert float((ours.values["w"].double() - ref).abs().max()) < 1e-5
    assert 0.17 < moved["fp32 EMA (ours)"] < 0.19  # lags ~1/9 of the run behind, as the warmup says
    assert moved["bf16 EMA"] < 0.25 * moved["fp32 EMA (ours)"]


def test_ema_decay_schedules_follow_diffusers():
    from diffusers.training_utils import EMAModel

    p = [torch.nn.Parameter(torch.zeros(1))]
    for warmup, kw in (("ratio", {}), ("power", {"use_ema_warmup": True, "inv_gamma": 2.0, "power": 0.75})):
        ref = EMAModel(p, decay=0.999, **kw)
        ours = ShardedEMA([], decay=0.999, warmup=warmup, inv_gamma=2.0, power=0.75)
        assert [ours.decay_at(n) for n in range(1, 3000, 7)] == [ref.get_decay(n) for n in range(1, 3000, 7)]
    assert ShardedEMA([], decay=0.99, warmup="none").decay_at(5) == 0.99


class _Recorder(Trainer):
    """Records, after each optimizer step, an independent reference EMA: diffusers' EMAModel fed
    the fp32 masters read with DeepSpeed's documented ``safe_get_full_fp32_param``, and the EMA
    the trainer used to keep (EMAModel over the bf16 module parameters)."""

    def setup(self):
        from diffusers.training_utils import EMAModel

        super().setup()
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.ref_params = [torch.nn.Parameter(w) for w in self._masters().values()]
        self.ref = EMAModel(self.ref_params, decay=self.scfg.ema.decay)
        self.old = None
        if self.tcfg.deepspeed.zero_stage < 3:  # (ZeRO-3's module parameters are partitioned)
            self.old = EMAModel([p for p in self.model.parameters() if p.requires_grad], decay=self.scfg.ema.decay)

    def _masters(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        params = dict(self.model.named_parameters())
        return {n: safe_get_full_fp32_param(params[n]).detach().clone() for n in self.names}

    def train_step(self, batches):
        m = super().train_step(batches)
        for p, w in zip(self.ref_params, self._masters().values(), strict=True):
            p.data.copy_(w)
        self.ref.step(self.ref_params)
        if self.old is not None:
            self.old.step([p for p in self.model.parameters() if p.requires_grad])
        return m


def _export_weights(out) -> dict[str, torch.Tensor]:
    """The export's tensors by their name in the model (unet.*, projection.*, llm.*lora*.default.*)."""
    from safetensors.torch import load_file

    exp = out / "export"
    w = {f"unet.{k}": v for k, v in load_file(str(exp / "unet" / "diffusion_pytorch_model.safetensors")).items()}
    if (exp / "text_projection").is_dir():  # only the `text_projection: linear` variant has one
        proj = load_file(str(exp / "text_projection" / "model.safetensors"))
        w.update({f"projection.{k}": v for k, v in proj.items()})
    for k, v in load_file(str(exp / "text_encoder_lora" / "adapter_model.safetensors")).items():
        w[
            "llm."
            + k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        ] = v
    return w


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_bf16_training_exports_fp32_master_weights_and_fp32_ema(tiny_models, tmp_path, zero_stage):
    from deepspeed.utils import safe_get_full_fp32_param

    write_image_shards(tmp_path / "images", n_shards=1, per_shard=6)
    cfg = tiny_config(tiny_models, tmp_path, max_steps=3, **{"ema.export": False})
    cfg.train.stage1.train_lora, cfg.train.stage1.max_length = True, 32  # LoRA trains too: in the EMA
    cfg.train.deepspeed.precision = "bf16"
    cfg.train.deepspeed.zero_stage = zero_stage
    if zero_stage == 3:  # ZeRO-3 partitions the LLM in the training dtype: the bf16 LLM, recorded in the export
        cfg.train.model.llm_dtype = "bfloat16"
    t = _Recorder(cfg, 1)
    t.train()
    assert t.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in t.model.parameters() if p.requires_grad)
    # the frozen LLM weights stay in train.model.llm_dtype (fp32 by default) under bf16 DeepSpeed
    assert {p.dtype for p in t.model.llm.parameters() if not p.requires_grad} == {
        torch.float32 if zero_stage == 2 else torch.bfloat16
    }
    assert any("lora_A" in n for n in t.names) and any(n.startswith("unet.") for n in t.names)
    params = dict(t.model.named_parameters())
    masters = {n: safe_get_full_fp32_param(params[n]).detach() for n in t.names}

    raw = _export_weights(tmp_path / "train" / "stage1")  # ema.export=false: the fp32 master weights
    assert set(raw) == set(t.names)
    assert all(raw[n].dtype == torch.float32 and torch.equal(raw[n], masters[n]) for n in t.names)
    assert any(not torch.equal(raw[n], raw[n].bfloat16().float()) for n in t.names)  # not bf16-rounded

    ema = t.ema.full(t.engine, t.device)  # the trainer's EMA, gathered
    ref = dict(zip(t.names, t.ref.shadow_params, strict=True))
    err = max(float((ema[n] - ref[n]).abs().max()) for n in t.names)
    assert err < 1e-6, err  # tracks the fp32 reference
    if t.old is not None:  # a bf16 EMA of the bf16 weights does not
        old = dict(zip(t.names, t.old.shadow_params, strict=True))
        err_old = max(float((old[n].float() - ref[n]).abs().max()) for n in t.names)
        assert err_old > 1e-4, err_old

    # ema.export=true: the export pairs the averaged UNet with the averaged projection and LoRA
    (tmp_path / "train" / "stage1" / "export" / "paradiffusion.json").unlink()  # force a new export
    t.scfg.ema.export = True
    t.export()
    exported = _export_weights(tmp_path / "train" / "stage1")
    assert all(torch.equal(exported[n], ema[n]) for n in t.names)
    info = json.loads((tmp_path / "train" / "stage1" / "export" / "paradiffusion.json").read_text())
    assert info["ema_weights"] is True


def test_ema_pieces_reload_across_world_sizes(tmp_path):
    """EMA files of two ranks (pieces [0, 6) and [6, 10) of a parameter) load into one rank that
    holds all of it, and back into the two pieces: a resume with another number of ranks."""
    full = torch.arange(10, dtype=torch.float32)
    halves = [ShardedEMA([Fragment("w", full.shape, s, full[s:e].clone())]) for s, e in ((0, 6), (6, 10))]
    for r, ema in enumerate(halves):
        ema.updates = 7
        torch.save(ema.state_dict(), tmp_path / f"ema-rank-{r}.pt")
    files = sorted(tmp_path.glob("ema-rank-*.pt"))
    one = ShardedEMA([Fragment("w", full.shape, 0, torch.zeros(10))])
    one.load(files, None)
    assert torch.equal(one.values["w"], full) and one.updates == 7
    torch.save(one.state_dict(), tmp_path / "one.pt")
    back = ShardedEMA([Fragment("w", full.shape, 6, torch.zeros(4))])
    back.load([tmp_path / "one.pt"], None)
    assert torch.equal(back.values["w"], full[6:])
    short = ShardedEMA([Fragment("w", full.shape, 0, torch.zeros(10))])
    with pytest.raises(RuntimeError, match="lacks"):
        short.load(files[:1], files[0])
