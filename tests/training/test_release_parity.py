"""Our pipeline against the official release's own code (github.com/weijiawu/ParaDiffusion).

Always: our side on the fixed tiny release-layout checkpoint against the release's outputs
recorded by ``scripts/release_parity.py record-fixture`` (fixtures/release_parity.*), and
that the comparison tells the release's settings from diffusers' and masked conditioning.
With the release's code and environment (``PARADIFFUSION_RELEASE_DIR``,
``PARADIFFUSION_RELEASE_PYTHON``; docs/release_parity.md): the live comparison, and our
stage-3 export sampled through the release's code path. Skipped with a message otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
FIXTURE = Path(__file__).parent / "fixtures" / "release_parity"


def _load_harness():
    spec = importlib.util.spec_from_file_location("release_parity", REPO / "scripts" / "release_parity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def harness():
    return _load_harness()


@pytest.fixture(scope="module")
def recorded() -> dict:
    return {
        "meta": json.loads(FIXTURE.with_suffix(".json").read_text()),
        "arrays": dict(np.load(FIXTURE.with_suffix(".npz"))),
    }


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory) -> str:
    from paradiffusion.testing.tiny_diffusion import build_tiny_release

    return build_tiny_release(tmp_path_factory.mktemp("tiny_release"))


@pytest.fixture(scope="module")
def ours(harness, tiny_release, recorded) -> dict:
    return harness.our_side(tiny_release, recorded["meta"]["settings"])


def test_the_tiny_checkpoint_is_the_recorded_one(harness, tiny_release, recorded):
    assert harness.checkpoint_digest(tiny_release) == recorded["meta"]["checkpoint_sha256"], (
        "build_tiny_release now builds other weights than the recorded fixture's; if that is meant, re-record it: "
        "python scripts/release_parity.py record-fixture (needs the release's code and environment)"
    )


def test_ours_equals_the_releases_recorded_outputs(harness, ours, recorded):
    n = len(recorded["meta"]["settings"]["prompts"])
    limits = harness.bounds(recorded["meta"])
    diff = harness.differences(harness.compact(ours, n), recorded["arrays"], limits)
    assert all(d["ok"] for d in diff.values()), diff
    assert diff["embeds"]["max_abs_diff"] <= 1e-4 and diff["images"]["max_abs_diff"] <= 1e-4
    assert diff["latents"]["max_abs_diff"] <= limits["latents"] <= 1e-3  # absolute, at the reference's noise level
    assert recorded["arrays"]["input_ids"].shape == (1 + n, 256)  # "" and the prompts, padded to 256
    images = recorded["arrays"]["images"]
    assert ((images > 0.01) & (images < 0.99)).mean() > 0.5  # mostly unclamped: the comparison has teeth


def test_latents_are_compared_absolutely(harness, ours, recorded):
    """1e-3 added to the largest latent (about 60 on a random model) fails: the latents are judged
    by an absolute bound, not relative to their size."""
    import numpy as np

    n = len(recorded["meta"]["settings"]["prompts"])
    moved = harness.compact(ours, n)
    lat = np.array(moved["latents"], dtype=np.float64)
    i = np.unravel_index(np.abs(lat).argmax(), lat.shape)
    assert abs(lat[i]) > 10
    lat[i] += 1e-3
    diff = harness.differences({**moved, "latents": lat}, recorded["arrays"], harness.bounds(recorded["meta"]))
    assert not diff["latents"]["ok"] and diff["latents"]["max_abs_diff"] >= 1e-3 - 5e-4


def test_the_comparison_tells_the_release_settings_apart(harness, tiny_release, recorded):
    """diffusers' own DPM-Solver settings or masked conditioning give other images: the fixture would notice."""
    from diffusers import DPMSolverMultistepScheduler

    from training.pipeline import ParaDiffusionPipeline

    s = recorded["meta"]["settings"]
    pipe = ParaDiffusionPipeline.from_pretrained(tiny_release, torch_dtype=torch.float32, device="cpu")
    release_sched = pipe.scheduler
    plain = DPMSolverMultistepScheduler.from_config(
        DPMSolverMultistepScheduler.load_config(tiny_release, subfolder="scheduler")
    )
    plain.set_timesteps(s["steps"])
    assert not np.array_equal(plain.timesteps.numpy(), recorded["arrays"]["timesteps"])  # steps_offset 0 vs 1

    def images(scheduler, conditioning):
        pipe.scheduler, pipe.conditioning = scheduler, conditioning
        gen = torch.Generator().manual_seed(s["seed"])
        kw = {k: s[k] for k in ("width", "height")}
        return pipe(s["prompts"], generator=gen, num_inference_steps=s["steps"], guidance_scale=s["guidance"],
                    output_type="np", **kw)  # fmt: skip

    ref = recorded["arrays"]["images"]
    assert np.abs(images(plain, "release") - ref).max() > 1e-2
    assert np.abs(images(release_sched, "masked") - ref).max() > 1e-2


def test_exports_the_release_code_cannot_sample_are_refused(harness, tmp_path):
    (tmp_path / "paradiffusion.json").write_text(
        json.dumps({"llm": "l", "vae": "v", "max_length": 256, "format": 2, "conditioning": "masked"})
    )
    with pytest.raises(SystemExit, match="masked"):
        harness.model_parts(tmp_path)
    (tmp_path / "text_projection").mkdir()
    with pytest.raises(SystemExit, match="projection"):
        harness.model_parts(tmp_path)


def test_the_reference_noise_is_the_largest_difference_between_its_runs(harness):
    """``compare --repeat``: the latents' bound is NOISE_FACTOR x the largest difference over the
    release's repeated runs (whichever thread count gave it), not the last run's."""
    a = {"input_ids": np.zeros((2, 4)), "embeds": np.zeros(3), "latents": np.zeros(3), "images": np.zeros(3),
         "timesteps": np.arange(3)}  # fmt: skip
    runs = [{**a, "latents": np.array([0.0, 3e-5, 0.0])}, {**a, "latents": np.array([0.0, 0.0, -1e-5])}]
    unbounded = {k: float("inf") for k in harness.BOUNDS}
    repeats = [
        {"threads": n, "differences": harness.differences(a, r, unbounded)} for n, r in zip([2, 1], runs, strict=True)
    ]
    noise = harness.noise_of(repeats)
    assert noise["latents"] == {"max_abs_diff": pytest.approx(3e-5), "threads": 2}
    assert noise["embeds"]["max_abs_diff"] == 0.0
    assert harness.bounds({"reference_noise": noise})["latents"] == pytest.approx(harness.NOISE_FACTOR * 3e-5)


def test_unet_config_comparison(harness, tmp_path):
    from training.config import DEFAULT_UNET

    f = tmp_path / "config.json"
    f.write_text(json.dumps({**DEFAULT_UNET, "_class_name": "UNet2DConditionModel", "cross_attention_dim": 2048}))
    diff = harness.unet_config_diff(str(f))
    assert diff["cross_attention_dim"] == {"ours": 4096, "file": 2048}
    assert "block_out_channels" not in diff and "attention_head_dim" not in diff


# ---------------------------------------------------------------------------- with the release's code
def _release_env() -> tuple[str, str]:
    d, py = os.environ.get("PARADIFFUSION_RELEASE_DIR"), os.environ.get("PARADIFFUSION_RELEASE_PYTHON")
    if not d or not (Path(d) / "pipeline_stable_diffusion_llama.py").is_file():
        pytest.skip(
            "the release's code is not here: set PARADIFFUSION_RELEASE_DIR to a checkout of "
            "github.com/weijiawu/ParaDiffusion (docs/release_parity.md)"
        )
    if not py:
        pytest.skip("set PARADIFFUSION_RELEASE_PYTHON to a Python with the release's versions (docs/release_parity.md)")
    probe = subprocess.run(
        [py, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import pipeline_stable_diffusion_llama", d],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ""},
    )
    if probe.returncode != 0:
        pytest.skip(f"{py} cannot import the release's pipeline: {probe.stderr.strip().splitlines()[-1:]}")
    return d, py


def test_release_code_equals_ours_live(harness, tiny_release, recorded, ours):
    release_dir, python = _release_env()
    settings = recorded["meta"]["settings"]
    rel = harness.run_release(tiny_release, settings, release_dir, python)
    noise = harness.reference_noise(tiny_release, settings, release_dir, python, rel)  # the release against itself
    diff = harness.differences(ours, rel["arrays"], harness.bounds({"reference_noise": noise}))
    print("the release against itself (1 vs 2 threads):", json.dumps(noise), "ours against it:", json.dumps(diff))
    assert all(d["ok"] for d in diff.values()), (diff, noise)
    n = len(settings["prompts"])
    again = harness.differences(harness.compact(rel["arrays"], n), recorded["arrays"], harness.bounds(recorded["meta"]))
    assert all(d["ok"] for d in again.values()), ("the recorded fixture no longer matches the release", again)


@pytest.mark.slow
def test_our_stage3_export_through_the_release_code(harness, tiny_models, tmp_path):
    """Stages 1 -> 2 -> 3 (release conditioning, LoRA in stage 2) on CPU, then the export in the release's pipeline."""
    release_dir, python = _release_env()
    from train_fixtures import tiny_config, write_image_shards

    from training.trainer import Trainer

    write_image_shards(tmp_path / "images", n_shards=1, per_shard=6)
    cfg = tiny_config(tiny_models, tmp_path, max_steps=3, **{"data.caption_source": "alt_text"})
    for stage in (1, 2, 3):
        Trainer(cfg, stage).train()
    export = tmp_path / "train" / "stage3" / "export"
    info = json.loads((export / "paradiffusion.json").read_text())
    assert (info["conditioning"], info["max_length"]) == ("release", 32) and (export / "text_encoder_lora").is_dir()
    settings = {**recorded_settings(harness), "steps": 20}
    rel = harness.run_release(str(export), settings, release_dir, python)
    noise = harness.reference_noise(str(export), settings, release_dir, python, rel)
    diff = harness.differences(
        harness.our_side(str(export), settings), rel["arrays"], harness.bounds({"reference_noise": noise})
    )
    assert all(d["ok"] for d in diff.values()), diff
    assert rel["max_length"] == 32  # the release's tokenizer was told the export's max_length


def recorded_settings(harness) -> dict:
    return harness.fixture_settings()
