"""The trainer end to end on CPU through the real DeepSpeed engine (one process, gloo), tiny models."""

from __future__ import annotations

import datetime as dt
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from train_fixtures import tiny_config, write_image_shards

from paradiffusion.config import ConfigError
from paradiffusion.schemas import CAPTIONS
from paradiffusion.storage import Table
from training.trainer import COMMIT_MARKER, CheckpointDir, Trainer, TrainingDiverged


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def chain(tiny_models, tmp_path_factory):
    """Stages 1 -> 2 -> 3 on fixture shards; records parameters before and after each stage."""
    root = tmp_path_factory.mktemp("chain")
    keys = write_image_shards(root / "images", n_shards=2, per_shard=6, corrupt=1, missing_caption=1)
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    rows = [
        {
            "key": k,
            "caption": f"A long paragraph describing picture {k}. " * 4,
            "model_id": "vlm",
            "prompt_id": "p",
            "prompt_hash": "h",
            "created_at": t0,
        }
        for k in keys[3:]
    ]
    Table(str(root / "captions"), CAPTIONS).write_shard("0", pa.Table.from_pylist(rows))
    pq.write_table(
        pa.table({"key": keys[2:8], "caption": [f"Handwritten description {k}" for k in keys[2:8]]}),
        root / "paraimage_small.parquet",
    )
    cfg = tiny_config(tiny_models, root)
    cfg.train.stage3.data.captions = str(root / "paraimage_small.parquet")
    cfg.train.stage1.logging.validation_every_steps = 4  # validation images once, at the end of stage 1
    out = {"root": root, "cfg": cfg}
    for stage in (1, 2, 3):
        t = Trainer(cfg, stage)
        t.setup()
        before = {"llm": _snapshot(t.model.llm), "unet": _snapshot(t.model.unet)}
        summary = t.train()
        out[stage] = {
            "trainer": t,
            "summary": summary,
            "before": before,
            "after": {"llm": _snapshot(t.model.llm), "unet": _snapshot(t.model.unet)},
        }
    return out


@pytest.mark.parametrize("stage", [1, 3])
def test_frozen_llm_stays_bit_identical(chain, stage):
    r = chain[stage]
    for k, v in r["before"]["llm"].items():
        assert torch.equal(v, r["after"]["llm"][k]), k
    assert any(not torch.equal(v, r["after"]["unet"][k]) for k, v in r["before"]["unet"].items())
    assert not any(p.requires_grad for p in r["trainer"].model.llm.parameters())


def test_stage2_changes_only_lora_in_the_llm(chain):
    r = chain[2]
    changed = {k for k, v in r["before"]["llm"].items() if not torch.equal(v, r["after"]["llm"][k])}
    assert changed and all("lora_" in k for k in changed)
    trainable = {n for n, p in r["trainer"].model.llm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_stages_write_summary_config_checkpoints_and_exports(chain):
    root = chain["root"]
    for stage in (1, 2, 3):
        out = root / "train" / f"stage{stage}"
        s = json.loads((out / "_summary.json").read_text())
        assert s["steps"] == 4 and s["samples_trained_this_run"] >= 7
        assert s["in"] == 12 and s["out"] == 12 - s["rejected_total"]
        assert s["last_loss"] == s["last_loss"]  # finite, not NaN
        assert (out / "_config.yaml").is_file() and (out / "deepspeed_config.json").is_file()
        assert [p.name for _, p in CheckpointDir(str(out / "checkpoints")).committed()] == [
            "step-00000002",
            "step-00000004",
        ]
        exp = out / "export"
        assert (exp / "unet" / "config.json").is_file() and not (
            exp / "text_projection"
        ).exists()  # the release's shape
        assert (exp / "text_encoder_lora").is_dir() == (stage >= 2)  # stage 3 carries the stage-2 LoRA
        info = json.loads((exp / "paradiffusion.json").read_text())
        assert info["stage"] == stage and info["max_length"] == (256 if stage == 1 else 32)
        assert info["conditioning"] == "release" and info["text_projection"] == "none"
        assert any((out / "tensorboard").iterdir())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(root / "train" / "stage1" / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert "validation" in ev.Tags()["images"] and "train/loss" in ev.Tags()["scalars"]
    assert len(ev.Scalars("train/loss")) == 4
    assert chain[1]["summary"].rejected["missing caption"] == 1
    assert chain[1]["summary"].rejected["decode error"] == 1  # the truncated JPEG, met when loaded
    assert chain[3]["summary"].rejected["missing caption"] == 6  # rows not in ParaImage-Small


def test_export_loads_in_the_pipeline_and_generates(chain):
    from training.pipeline import ParaDiffusionPipeline

    pipe = ParaDiffusionPipeline.from_pretrained(str(chain["root"] / "train" / "stage3" / "export"), device="cpu")
    g = torch.Generator().manual_seed(0)
    images = pipe(
        ["a red square", "a long paragraph " * 10],
        height=24,
        width=16,
        num_inference_steps=3,
        guidance_scale=7.5,
        generator=g,
    )
    assert [im.size for im in images] == [(16, 24), (16, 24)]
    again = pipe("a red square", height=24, width=16, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert list(again[0].getdata()) == list(images[0].getdata())  # seeded: reproducible
    with pytest.raises(ValueError, match="multiples of 2"):  # the tiny VAE's downsampling (the release's: 8)
        pipe("x", height=25, width=16, num_inference_steps=2)


def test_official_layout_loads(chain, tiny_models, tmp_path):
    """The release layout: Llama-2-7b-hf/, text_encoder_lora/, unet/, sdxl-vae-fp16-fix/, scheduler/."""
    import shutil

    from training.pipeline import ParaDiffusionPipeline

    exp = chain["root"] / "train" / "stage3" / "export"
    rel = tmp_path / "release"
    shutil.copytree(tiny_models["llm"], rel / "Llama-2-7b-hf")
    shutil.copytree(tiny_models["vae"], rel / "sdxl-vae-fp16-fix")
    for d in ("unet", "text_encoder_lora", "scheduler"):
        shutil.copytree(exp / d, rel / d)
    pipe = ParaDiffusionPipeline.from_pretrained(str(rel), device="cpu", torch_dtype=torch.float32)
    assert (pipe.max_length, pipe.conditioning) == (256, "release")  # no paradiffusion.json: the release's settings
    assert pipe("x", height=8, width=8, num_inference_steps=2)[0].size == (8, 8)


class _Killed(Exception):
    pass


class _KillAt(Trainer):
    """A trainer whose process 'dies' just before computing step ``kill_at``."""

    kill_at = 6

    def train_step(self, batches):
        if self.step + 1 == self.kill_at:
            raise _Killed
        return super().train_step(batches)


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_is_exact(tiny_models, tmp_path, precision):
    """Killed after logging step 5 (the last checkpoint is step 4): the resumed run repeats the
    uninterrupted run's losses bit for bit, ends with the same (EMA) export, and the logs hold
    each step once with the learning rate that step used."""
    write_image_shards(tmp_path / "images", n_shards=2, per_shard=5)

    def config(name):
        cfg = tiny_config(
            tiny_models,
            tmp_path,
            max_steps=6,
            **{"data.random_crop": True, "optim.warmup_steps": 4, "data.num_workers": 2},
        )
        cfg.train.stage1.output = str(tmp_path / name)
        cfg.train.deepspeed.precision = precision
        return cfg

    ref = Trainer(config("ref"), 1)
    ref.train()
    first = _KillAt(config("run"), 1)
    with pytest.raises(_Killed):
        first.train()
    assert first.history == ref.history[:5]
    assert [r["step"] for r in _metrics(tmp_path / "run")] == [1, 2, 3, 4, 5]
    resumed = Trainer(config("run"), 1)
    resumed.train()
    assert resumed.summary.extra["resumed_from"] == "step-00000004"
    assert resumed.history == ref.history[4:]  # bit-identical losses, step for step
    from safetensors.torch import load_file

    assert not (tmp_path / "run" / "export" / "text_projection").exists()  # the release's shape: none
    for part in ("unet/diffusion_pytorch_model.safetensors",):
        a = load_file(str(tmp_path / "ref" / "export" / part))
        b = load_file(str(tmp_path / "run" / "export" / part))
        assert all(torch.equal(a[k], b[k]) for k in a)

    rows, ref_rows = _metrics(tmp_path / "run"), _metrics(tmp_path / "ref")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # each step once
    assert [(r["loss"], r["lr"]) for r in rows] == [(r["loss"], r["lr"]) for r in ref_rows]
    assert [r["lr"] for r in rows] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])  # warmup: used, not next
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert [e.step for e in ev.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]


class _NanAt(Trainer):
    bad_step = 3

    def batch_generator(self):
        for batch in super().batch_generator():
            if self.step + 1 == self.bad_step:
                batch = {**batch, "pixel_values": torch.full(batch["pixel_values"].shape, float("nan"))}
            yield batch


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_models, tmp_path):
    write_image_shards(tmp_path / "images", n_shards=1, per_shard=6)
    cfg = tiny_config(tiny_models, tmp_path, max_steps=6)
    t = _NanAt(cfg, 1)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 3.*last good checkpoint is .*step-00000002"):
        t.train()
    ck = CheckpointDir(str(tmp_path / "train" / "stage1" / "checkpoints"))
    assert [s for s, _ in ck.committed()] == [2]
    assert not (tmp_path / "train" / "stage1" / "export").exists()


@pytest.mark.parametrize(
    "log_every, ckpt_every, bad, stops_at, committed",
    [(5, 2, 3, 4, [2]), (3, 100, 2, 3, [])],
    ids=["seen-before-the-next-checkpoint", "seen-at-the-log-interval"],
)
def test_nan_is_read_every_few_steps_and_never_saved(tiny_models, tmp_path, log_every, ckpt_every, bad, stops_at,
                                                     committed):  # fmt: skip
    """The loss is read from the device at log steps and before every checkpoint (no read per step):
    a NaN at step ``bad`` stops the run at the next of those, and nothing from that step on is saved."""
    write_image_shards(tmp_path / "images", n_shards=1, per_shard=6)
    cfg = tiny_config(tiny_models, tmp_path, max_steps=6, **{"logging.every_steps": log_every,
                                                             "checkpoint.every_steps": ckpt_every})  # fmt: skip
    t = type("NanAt", (_NanAt,), {"bad_step": bad})(cfg, 1)
    where = r"last good checkpoint is .*step-00000002" if committed else "no checkpoint was written yet"
    with pytest.raises(TrainingDiverged, match=rf"loss is nan at step {bad} .*steps {bad}-{stops_at} ran .*{where}"):
        t.train()
    assert t.step == stops_at and [s for s, _ in t.history] == list(range(1, bad))
    ck = CheckpointDir(str(tmp_path / "train" / "stage1" / "checkpoints"))
    assert [s for s, _ in ck.committed()] == committed
    assert not (tmp_path / "train" / "stage1" / "export").exists()
    logged = _metrics(tmp_path / "train" / "stage1") if (tmp_path / "train/stage1/metrics.jsonl").exists() else []
    assert all(r["step"] < bad for r in logged)


@pytest.mark.parametrize("text", ["llm", "text_cache"])
def test_no_device_value_is_read_during_a_step(tiny_models, tmp_path, monkeypatch, text):
    """Per micro-batch the trainer's code reads nothing back from the device (on a GPU each read
    waits for the queued work): no .item(), bool(), float(), .tolist(), .cpu(), .numpy() in
    training/ while a step runs; losses, norms and flags are read every logging.every_steps."""
    import sys
    from pathlib import Path

    import training

    write_image_shards(tmp_path / "images", n_shards=1, per_shard=6)
    cfg = tiny_config(tiny_models, tmp_path, max_steps=4, caption_dropout=0.5,
                      **{"logging.every_steps": 4, "data.num_workers": 0})  # fmt: skip
    if text == "text_cache":
        from training.text_cache import cache_text

        cfg.train.stage1.data.text_cache = str(tmp_path / "tc")
        cache_text(cfg, 1)
    pkg = str(Path(training.__file__).parent)
    reads, in_step = [], [False]

    def spy(name, orig):
        def wrapped(self, *a, **kw):
            caller = sys._getframe(1).f_code
            if in_step[0] and caller.co_filename.startswith(pkg):
                reads.append(f"{name} in {caller.co_name}")
            return orig(self, *a, **kw)

        return wrapped

    for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "__format__",
                 "__array__"):  # fmt: skip
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))

    class Watched(Trainer):
        def train_step(self, batches):
            in_step[0] = True
            try:
                return super().train_step(batches)
            finally:
                in_step[0] = False

    t = Watched(cfg, 1)
    t.train()
    assert t.step == 4 and len(t.history) == 4
    assert reads == []


@pytest.mark.slow  # torch.compile's graph capture of the tiny UNet: ~30 s on a busy 2-core machine
def test_compile_and_gradient_checkpointing_per_stage(tiny_models, tmp_path):
    """compile.unet compiles the UNet in place (parameter names, checkpoints and the export unchanged)
    and trains with the eager losses; gradient checkpointing is a per-stage setting."""
    from safetensors.torch import load_file

    write_image_shards(tmp_path / "images", n_shards=1, per_shard=4)
    runs = {}
    for name in ("eager", "compiled"):
        cfg = tiny_config(tiny_models, tmp_path, max_steps=2, **{"gradient_checkpointing.unet": False})
        cfg.train.stage1.output = str(tmp_path / name)
        if name == "compiled":  # aot_eager: torch.compile's graph capture without inductor's C++ build (CPU test)
            cfg.train.stage1.compile.unet = True
            cfg.train.stage1.compile.backend = "aot_eager"
        t = Trainer(cfg, 1)
        t.train()
        runs[name] = t
    eager, compiled = runs["eager"], runs["compiled"]
    assert compiled.model.unet._compiled_call_impl is not None and eager.model.unet._compiled_call_impl is None
    assert not compiled.model.unet.is_gradient_checkpointing
    assert [x for _, x in compiled.history] == pytest.approx([x for _, x in eager.history], rel=1e-5)
    a = load_file(str(tmp_path / "eager" / "export" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "compiled" / "export" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys()
    cfg = tiny_config(tiny_models, tmp_path, max_steps=2)
    from training.modeling import build_model

    assert build_model(cfg.train, cfg.train.stage1)[0].unet.is_gradient_checkpointing  # the default: on


def test_partial_checkpoint_is_ignored(tiny_models, tmp_path, monkeypatch):
    write_image_shards(tmp_path / "images", n_shards=1, per_shard=6)
    cfg = tiny_config(tiny_models, tmp_path, max_steps=2)
    Trainer(cfg, 1).train()
    ck_root = tmp_path / "train" / "stage1" / "checkpoints"
    # A save killed before its marker, and one that died in its temp folder (e.g. disk full).
    fake = ck_root / "step-00000099"
    fake.mkdir()
    (fake / "rank-0.pt").write_bytes(b"partial")
    (ck_root / ".tmp-step-00000100").mkdir()
    assert CheckpointDir(str(ck_root)).newest()[0] == 2

    cfg4 = tiny_config(tiny_models, tmp_path, max_steps=4)
    real_save = torch.save

    def disk_full(obj, f, *a, **kw):
        if str(f).endswith("rank-0.pt") and "step-00000004" in str(f):
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", disk_full)
    t = Trainer(cfg4, 1)
    with pytest.raises(OSError, match="No space"):
        t.train()
    assert t.summary.extra["resumed_from"] == "step-00000002"  # not the fake step 99
    assert not fake.exists() and not (ck_root / ".tmp-step-00000100").exists()  # cleaned at start
    assert [s for s, _ in CheckpointDir(str(ck_root)).committed()] == [2]  # the failed save is not committed
    assert not (ck_root / "step-00000004" / COMMIT_MARKER).exists()
    monkeypatch.setattr(torch, "save", real_save)
    t2 = Trainer(cfg4, 1)
    t2.train()
    assert t2.summary.extra["resumed_from"] == "step-00000002" and t2.step == 4


def test_cli_train_and_generate(tiny_models, tmp_path, capsys):
    from pipelines.cli import main

    write_image_shards(tmp_path / "images", n_shards=1, per_shard=4)
    cfg = tiny_config(tiny_models, tmp_path, max_steps=1)
    f = tmp_path / "cfg.yaml"
    import yaml

    f.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["train", "--stage", "1", "--config", str(f)]) == 0
    exp = tmp_path / "train" / "stage1" / "export"
    sets = [
        f"generate.model={exp}",
        "generate.height=16",
        "generate.width=24",
        "generate.num_inference_steps=2",
        f"generate.output={tmp_path / 'png'}",
    ]
    argv = ["generate", "--config", str(f), "--prompt", "a cat"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    from PIL import Image

    (png,) = sorted((tmp_path / "png").glob("*.png"))
    im = Image.open(png)
    assert im.size == (24, 16) and im.text["prompt"] == "a cat"
    assert json.loads(im.text["parameters"])["guidance_scale"] == 7.5
    capsys.readouterr()
    missing_ckpt = ["--set", f"train.stage2.init_from={tmp_path / 'nothing'}"]
    assert main(["train", "--stage", "2", "--config", str(f), *missing_ckpt]) == 2  # a config error naming it
    assert str(tmp_path / "nothing") in capsys.readouterr().err
    bad_model = ["--set", f"generate.model={tmp_path / 'none'}"]
    assert main(["generate", "--config", str(f), "--prompt", "x", *bad_model]) == 2  # a model that cannot be had
    assert str(tmp_path / "none") in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_model_overfits_a_handful_of_images(tiny_models, tmp_path):
    write_image_shards(tmp_path / "images", n_shards=1, per_shard=4)
    cfg = tiny_config(
        tiny_models,
        tmp_path,
        max_steps=120,
        caption_dropout=0.0,
        min_snr_gamma=None,
        **{"data.random_flip": False, "optim.lr": 2e-3, "checkpoint.every_steps": 1000, "logging.every_steps": 50},
    )
    t = Trainer(cfg, 1)
    t.train()
    losses = [loss for _, loss in t.history]
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.6 * first, (first, last)


def test_zero3_trains_resumes_and_exports_full_weights(tiny_models, tmp_path):
    from safetensors.torch import load_file

    write_image_shards(tmp_path / "images", n_shards=1, per_shard=4)
    cfg = tiny_config(tiny_models, tmp_path, max_steps=2)
    cfg.train.deepspeed.zero_stage = 3
    Trainer(cfg, 1).train()
    cfg.train.stage1.max_steps = 3
    t = Trainer(cfg, 1)
    t.train()
    assert t.summary.extra["resumed_from"] == "step-00000002" and t.step == 3
    assert t.ema is not None and t.ema.updates == 3  # the EMA (ZeRO-3 pieces) resumed with the run
    w = load_file(str(tmp_path / "train" / "stage1" / "export" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert w["conv_in.weight"].shape == (32, 4, 3, 3)  # gathered, not a ZeRO-3 partition


def test_cached_latents_train_without_decoding(tiny_models, tmp_path):
    from training.latents import cache_latents, latents_path

    write_image_shards(tmp_path / "images", n_shards=2, per_shard=3, corrupt=1)
    cfg = tiny_config(tiny_models, tmp_path, max_steps=2)
    s = cache_latents(cfg, 1, batch_size=2)
    assert s.n_in == 6 and s.n_out == 5 and s.rejected["decode error"] == 1
    assert cache_latents(cfg, 1).skipped_done == 2  # resumable: committed shards are skipped
    cfg.train.stage1.data.latents = latents_path(cfg, 1)
    t = Trainer(cfg, 1)
    t.setup()
    batch = next(iter(t.data))
    assert "latent_moments" in batch and "pixel_values" not in batch
    assert batch["latent_moments"].shape[1] == 8  # mean + logvar of 4 latent channels
    t.train()
    assert t.step == 2 and all(loss == loss for _, loss in t.history)
    assert t.summary.rejected["no cached latent"] == 1  # the corrupt image has none

    # The cache records what its latents depend on; other settings stop with the setting named.
    for key, value in (("resolution", 24), ("bucket_step", 8), ("max_aspect_ratio", 1.5)):
        bad = cfg.model_copy(deep=True)
        setattr(bad.train.stage1.data, key, value)
        with pytest.raises(ConfigError, match=rf"train\.stage1\.data\.{key} is {value} but the latent cache"):
            Trainer(bad, 1).setup()
        with pytest.raises(ConfigError, match=rf"data\.{key}"):  # nor can shards of other settings be added
            cache_latents(bad, 1)
    from diffusers import AutoencoderKL

    other = AutoencoderKL.from_pretrained(tiny_models["vae"])
    with torch.no_grad():
        other.encoder.conv_in.weight.mul_(1.5)
    other.save_pretrained(str(tmp_path / "other_vae"))
    bad = cfg.model_copy(deep=True)
    bad.train.model.vae = str(tmp_path / "other_vae")
    with pytest.raises(ConfigError, match=r"train\.model\.vae = .*other_vae is not the VAE"):
        Trainer(bad, 1).setup()
