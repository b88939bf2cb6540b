"""Proof of equality with the official ParaDiffusion release's own pipeline code.

The release (github.com/weijiawu/ParaDiffusion) ships ``pipeline_stable_diffusion_llama.py``
(``StableDiffusionLlamaPipeline``) and ``demo.py`` (how it is built: ``LlamaModel`` in fp32
+ the peft LoRA, tokenizer pad = EOS and ``model_max_length`` 256, DPM-Solver from the
``scheduler/`` folder, 100 steps, guidance 7.5, 1024x640). That repository has no licence,
so none of its code is in this one: this script imports it from a checkout you name and
runs it in an environment with the versions it was written for. It never installs or
fetches anything.

    # the release's code (any checkout of the repository) and an environment it runs in
    export PARADIFFUSION_RELEASE_DIR=/path/to/ParaDiffusion          # has pipeline_stable_diffusion_llama.py
    export PARADIFFUSION_RELEASE_PYTHON=/path/to/release-env/bin/python
    python scripts/release_parity.py compare --tiny /tmp/tiny_release      # a tiny random release-layout model
    python scripts/release_parity.py compare --model data/train/stage3/export   # our export, via the release code
    python scripts/release_parity.py compare --model /weights/ParaDiffusion --steps 100 --width 1024 --height 640
    python scripts/release_parity.py record-fixture                        # tests/training/fixtures/release_parity.*
    python scripts/release_parity.py compare --tiny /tmp/tiny_release --fixture-settings --repeat 1,2  # its own noise
    python scripts/release_parity.py unet-config /weights/ParaDiffusion/unet/config.json

``compare`` runs the same prompts, seed, steps, guidance and size through the release's
pipeline (in ``PARADIFFUSION_RELEASE_PYTHON``, CPU, fp32) and through
``training.pipeline.ParaDiffusionPipeline`` (here), and reports the largest absolute
difference of the token ids, the text embeddings (unconditional "" and prompts), the
final latents and the decoded images (floats in [0, 1]); it fails when one is above its
absolute bound (:data:`BOUNDS`: 1e-4 for the text states and images; for the latents the
noise level of the release's own arithmetic, measured between two runs of the release with 1
and 2 torch threads, which ``record-fixture`` records and ``compare --repeat`` prints). ``record-fixture`` stores the release's outputs for the fixed tiny
checkpoint of :func:`paradiffusion.testing.tiny_diffusion.build_tiny_release`, so the test
suite checks our side against them without the release's environment. See
docs/release_parity.md for the environment used and the measured differences.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RELEASE_FILE = "pipeline_stable_diffusion_llama.py"
FIXTURE = REPO / "tests" / "training" / "fixtures" / "release_parity"
TOLERANCE = 1e-4
#: Absolute bounds per output. The latents' is at the noise level of the reference itself:
#: NOISE_FACTOR x the largest difference between two runs of the release's pipeline (1 and 2
#: torch threads: another order of the float sums) on the fixture's settings. Until a fixture
#: records its own (``reference_noise``), LATENT_NOISE is used: the release's own, measured with
#: ``compare --tiny DIR --fixture-settings --repeat 1,2`` in its environment (3b5be64c, torch 2.13.0+cpu,
#: transformers 4.30.1, diffusers 0.20.0; 2026-12-07): 1 vs 1 thread 0, 1 vs 2 threads 9.54e-5
#: (our side by the same method: 9.7e-5; ours against the recorded release: 1.95e-4;
#: docs/release_parity.md).
LATENT_NOISE = 9.54e-5
NOISE_FACTOR = 4
BOUNDS = {"embeds": TOLERANCE, "latents": NOISE_FACTOR * LATENT_NOISE, "images": TOLERANCE}

#: Prompts of the comparison: a short one, a paragraph longer than 256 tokens (cut, as the
#: release cuts it), and one that starts with spaces (transformers 5 tokenizes that
#: differently unless told otherwise) and has characters outside the tiny vocabulary
#: (byte fallback).
PROMPTS = [
    "A red fox sitting in fresh snow at dawn.",
    " ".join(
        [
            "A peaceful scene of a small town in winter, with snow-covered houses and trees around.",
            "The town is surrounded by mountains, and the sky is covered in clouds.",
            "In the foreground, there is a boat docked on the river, covered in snow.",
        ]
        * 6
    ),
    "   Two cats on a windowsill near Tōkyō tower, one ginger and one black ☃.",
]
#: ``compare``'s defaults: the release's steps and guidance, demo.py's seed, a tiny 8:5 image.
DEFAULTS = {"seed": 45, "steps": 100, "guidance": 7.5, "width": 64, "height": 40}
#: The recorded fixture's: fewer steps and a smaller image, so the test suite stays quick on
#: a CPU (25 steps still take DPM-Solver's second-order path to the end, unlike < 15).
FIXTURE_SETTINGS = {"prompts": PROMPTS, "seed": 45, "steps": 25, "guidance": 7.5, "width": 48, "height": 32}


# ---------------------------------------------------------------------------- both sides
def model_parts(model: str | Path) -> dict:
    """Where the release's ``get_pipe`` would find each part of ``model`` (official layout or our export).

    Stdlib only: it also runs in the release's environment.
    """
    root = Path(model)
    info_file = root / "paradiffusion.json"
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        if (root / "text_projection").is_dir():
            raise SystemExit(
                f"{root}: has text_projection/ (the projection variant); the release's code feeds the LLM states "
                "to the UNet directly and cannot sample it"
            )
        if info.get("format", 1) >= 2 and info.get("conditioning") != "release":
            raise SystemExit(
                f"{root}: trained with {info.get('conditioning')!r} conditioning; the release's code pads to "
                "max_length and gives the UNet no mask, so it would not sample it as trained"
            )
        llm, vae, max_length = info["llm"], info["vae"], int(info["max_length"])
    else:
        llm, vae, max_length = str(root / "Llama-2-7b-hf"), str(root / "sdxl-vae-fp16-fix"), 256
    lora = root / "text_encoder_lora"
    return {
        "llm": llm,
        "lora": str(lora) if lora.is_dir() else None,
        "unet": str(root / "unet"),
        "vae": vae,
        "scheduler": str(root / "scheduler"),
        "max_length": max_length,
    }


# ---------------------------------------------------------------------------- the release's side
def release_side(model: str, release_dir: str, settings: dict, out: str) -> None:
    """Build the release's pipeline as its demo.py ``get_pipe`` does (fp32, CPU) and run it.

    Runs in the release's environment: imports only its libraries and its module.
    """
    import numpy as np
    import torch

    sys.path.insert(0, release_dir)
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from pipeline_stable_diffusion_llama import StableDiffusionLlamaPipeline
    from transformers import AutoTokenizer, LlamaModel

    torch.set_num_threads(int(settings.get("threads", 1)))
    parts = model_parts(model)
    text_encoder = LlamaModel.from_pretrained(parts["llm"])  # fp32, as in demo.py
    if parts["lora"]:
        from peft import PeftModel

        text_encoder = PeftModel.from_pretrained(text_encoder, parts["lora"])
    tokenizer = AutoTokenizer.from_pretrained(parts["llm"])
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = parts["max_length"]
    scheduler = DPMSolverMultistepScheduler.from_pretrained(parts["scheduler"])
    vae = AutoencoderKL.from_pretrained(parts["vae"])
    unet = UNet2DConditionModel.from_pretrained(parts["unet"])
    pipe = StableDiffusionLlamaPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to("cpu")
    pipe.enable_attention_slicing()  # as demo.py
    pipe.set_progress_bar_config(disable=True)
    prompts = settings["prompts"]
    tok = dict(padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
    ids = tokenizer(prompts, **tok).input_ids
    neg_ids = tokenizer([""] * len(prompts), **tok).input_ids
    with torch.no_grad():
        embeds = pipe._encode_prompt(prompts, torch.device("cpu"), 1, True, None)  # [uncond ""; prompts]
    final = {}

    def keep(i, t, latents):
        final["latents"] = latents.detach().clone()

    images = pipe(
        prompt=prompts,
        width=settings["width"],
        height=settings["height"],
        generator=torch.Generator("cpu").manual_seed(settings["seed"]),
        num_inference_steps=settings["steps"],
        guidance_scale=settings["guidance"],
        output_type="np",
        callback=keep,
        callback_steps=1,
    ).images
    np.savez(
        out,
        input_ids=torch.cat([neg_ids, ids]).numpy(),
        embeds=embeds.float().numpy(),
        latents=final["latents"].float().numpy(),
        images=np.asarray(images, dtype=np.float32),
        timesteps=pipe.scheduler.timesteps.numpy(),
    )
    versions = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "diffusers", "peft", "tokenizers", "huggingface_hub", "accelerate", "numpy"):
        versions[name] = __import__(name).__version__
    Path(out).with_suffix(".json").write_text(json.dumps({"versions": versions, "max_length": parts["max_length"]}))


def release_commit(release_dir: str) -> dict:
    """The release checkout's git commit (when it is a git checkout) and the sha256 of its pipeline file."""
    doc = {"pipeline_sha256": hashlib.sha256((Path(release_dir) / RELEASE_FILE).read_bytes()).hexdigest()}
    try:
        doc["commit"] = subprocess.run(
            ["git", "-C", release_dir, "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        doc["commit"] = None
    return doc


def run_release(model: str, settings: dict, release_dir: str, release_python: str) -> dict:
    """Run :func:`release_side` in ``release_python``; returns its arrays and metadata."""
    import numpy as np

    if not (Path(release_dir) / RELEASE_FILE).is_file():
        raise SystemExit(
            f"{release_dir}: no {RELEASE_FILE}; point --release-dir at a checkout of weijiawu/ParaDiffusion"
        )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "release.npz"
        cmd = [release_python, str(Path(__file__).resolve()), "_release-side", "--model", str(model)]
        cmd += ["--release-dir", release_dir, "--settings", json.dumps(settings), "--npz", str(out)]
        env = {**os.environ, "PYTHONPATH": "", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"the release's pipeline failed ({release_python}):\n{proc.stderr[-4000:]}")
        arrays = dict(np.load(out))
        meta = json.loads(out.with_suffix(".json").read_text())
    return {"arrays": arrays, **meta, **release_commit(release_dir)}


# ---------------------------------------------------------------------------- our side
def our_side(model: str, settings: dict) -> dict:
    """The same settings through ``ParaDiffusionPipeline`` (fp32, CPU)."""
    import torch

    sys.path.insert(0, str(REPO))
    from training.pipeline import ParaDiffusionPipeline

    pipe = ParaDiffusionPipeline.from_pretrained(str(model), torch_dtype=torch.float32, device="cpu")
    prompts = settings["prompts"]
    states, _, ids = pipe.encode([""] * len(prompts) + prompts)
    latents = pipe(
        prompts,
        width=settings["width"],
        height=settings["height"],
        num_inference_steps=settings["steps"],
        guidance_scale=settings["guidance"],
        generator=torch.Generator("cpu").manual_seed(settings["seed"]),
        output_type="latent",
    )
    return {
        "input_ids": ids.numpy(),
        "embeds": states.float().numpy(),
        "latents": latents.float().numpy(),
        "images": pipe.decode(latents, "np"),
        "timesteps": pipe.scheduler.timesteps.numpy(),
    }


def bounds(meta: dict | None = None) -> dict:
    """The absolute bound per output: :data:`BOUNDS`, the latents' from a fixture's recorded
    ``reference_noise`` when it has one (NOISE_FACTOR x it)."""
    b = dict(BOUNDS)
    noise = (meta or {}).get("reference_noise", {}).get("latents", {}).get("max_abs_diff")
    if noise is not None:
        b["latents"] = NOISE_FACTOR * max(float(noise), 1e-6)
    return b


def differences(ours: dict, release: dict, limits: dict | None = None) -> dict:
    """Largest absolute difference per output (ids: count of differing ids), each against its
    absolute bound (``limits``, default :data:`BOUNDS`)."""
    import numpy as np

    limits = limits or BOUNDS
    out = {}
    for key in ("input_ids", "embeds", "latents", "images", "timesteps"):
        a, b = np.asarray(ours[key]), np.asarray(release[key])
        if a.shape != b.shape:
            out[key] = {"shape_ours": list(a.shape), "shape_release": list(b.shape), "ok": False}
            continue
        if key in ("input_ids", "timesteps"):
            n = int((a != b).sum())
            out[key] = {"differing": n, "ok": n == 0}
        else:
            d = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
            scale = float(np.abs(b).max())
            out[key] = {"max_abs_diff": d, "max_abs_value": scale, "bound": limits[key], "ok": d <= limits[key]}
    return out


def repeat_release(
    model: str, settings: dict, release_dir: str, release_python: str, first: dict, threads: list[int]
) -> list[dict]:
    """The release against itself: one more run per entry of ``threads`` (each in a process of its
    own, with that many torch threads), each compared with ``first`` (its run with
    ``settings["threads"]``, default 1). Same threads: is a run reproducible from process to
    process; other threads: another order of the float sums (the CPU's noise)."""
    unbounded = {k: float("inf") for k in BOUNDS}
    out = []
    for n in threads:
        again = run_release(model, {**settings, "threads": n}, release_dir, release_python)
        out.append({"threads": n, "differences": differences(first["arrays"], again["arrays"], unbounded)})
    return out


def noise_of(repeats: list[dict]) -> dict:
    """The largest difference per output over :func:`repeat_release`'s runs (the reference's noise)."""
    noise: dict = {}
    for r in repeats:
        for key, v in r["differences"].items():
            if "max_abs_diff" in v and v["max_abs_diff"] >= noise.get(key, {"max_abs_diff": -1.0})["max_abs_diff"]:
                noise[key] = {"max_abs_diff": v["max_abs_diff"], "threads": r["threads"]}
    return noise


def reference_noise(model: str, settings: dict, release_dir: str, release_python: str, first: dict) -> dict:
    """The release's own run-to-run noise: ``first`` (its run with 1 thread) against a run with 2."""
    return noise_of(repeat_release(model, settings, release_dir, release_python, first, [2]))


def report(diff: dict) -> bool:
    ok = all(v["ok"] for v in diff.values())
    for key, v in diff.items():
        detail = ", ".join(f"{k}={v[k]:.3g}" if isinstance(v[k], float) else f"{k}={v[k]}" for k in v if k != "ok")
        print(f"  {key:10s} {'ok  ' if v['ok'] else 'FAIL'} {detail}")
    print("EQUAL within the bounds" if ok else "DIFFERENT (beyond a bound)")
    return ok


# ---------------------------------------------------------------------------- the fixture
def checkpoint_digest(root: str | Path) -> str:
    """sha256 of every tensor (by file and name) and of the tokenizer model of a tiny release folder."""
    from safetensors.numpy import load_file

    h = hashlib.sha256()
    root = Path(root)
    for f in sorted(root.rglob("*.safetensors")):
        for name, arr in sorted(load_file(str(f)).items()):
            h.update(f"{f.relative_to(root)}:{name}:{arr.dtype}:{arr.shape}".encode())
            h.update(arr.tobytes())
    tok = json.loads((root / "Llama-2-7b-hf" / "tokenizer.json").read_text())
    h.update(json.dumps(tok["model"], sort_keys=True).encode())
    return h.hexdigest()


def compact(arrays: dict, n: int) -> dict:
    """Keep one copy of the unconditional ("") rows of ``input_ids`` / ``embeds`` (the first
    ``n`` rows are all the same): the fixture stays a few hundred KB."""
    import numpy as np

    out = dict(arrays)
    for key in ("input_ids", "embeds"):
        a = np.asarray(arrays[key])
        if not all(np.array_equal(a[0], a[i]) for i in range(1, n)):
            raise ValueError(f"{key}: the unconditional rows differ from each other")
        out[key] = np.concatenate([a[:1], a[n:]])
    return out


def fixture_settings() -> dict:
    return dict(FIXTURE_SETTINGS)


def record_fixture(release_dir: str, release_python: str, out: Path = FIXTURE) -> dict:
    """Run the release on the tiny checkpoint and store its outputs + metadata under ``out``.npz/.json."""
    import numpy as np

    sys.path.insert(0, str(REPO))
    from paradiffusion.testing.tiny_diffusion import build_tiny_release

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_release(Path(tmp) / "tiny_release")
        settings = fixture_settings()
        rel = run_release(model, settings, release_dir, release_python)
        noise = reference_noise(model, settings, release_dir, release_python, rel)
        ours = our_side(model, settings)
        diff = differences(ours, rel["arrays"], bounds({"reference_noise": noise}))
        meta = {
            "what": "outputs of the release's StableDiffusionLlamaPipeline on build_tiny_release(seed=0)",
            "settings": settings,
            "checkpoint_sha256": checkpoint_digest(model),
            "release": {k: rel[k] for k in ("commit", "pipeline_sha256", "versions", "max_length")},
            "reference_noise": noise,  # the release against itself (1 vs 2 threads): the latents' bound
            "ours_at_recording": diff,
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out.with_suffix(".npz"), **compact(rel["arrays"], len(settings["prompts"])))
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


# ---------------------------------------------------------------------------- UNet config
def unet_config_diff(path: str) -> dict:
    """Keys where a UNet config.json (e.g. the release's) differs from ``training.config.DEFAULT_UNET``."""
    import inspect

    sys.path.insert(0, str(REPO))
    from diffusers import UNet2DConditionModel

    from training.config import DEFAULT_UNET

    params = inspect.signature(UNet2DConditionModel.__init__).parameters.items()
    ours = {k: p.default for k, p in params if k != "self" and p.default is not inspect.Parameter.empty}
    ours.update(DEFAULT_UNET)
    theirs = json.loads(Path(path).read_text())
    keys = sorted(
        (set(ours) | set(theirs)) - {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}
    )
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    return {k: {"ours": norm(ours.get(k)), "file": theirs.get(k)} for k in keys if norm(ours.get(k)) != theirs.get(k)}


# ---------------------------------------------------------------------------- command line
def _release_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--release-dir", default=os.environ.get("PARADIFFUSION_RELEASE_DIR"))
    ap.add_argument("--release-python", default=os.environ.get("PARADIFFUSION_RELEASE_PYTHON", sys.executable))


def _need_release(args) -> None:
    if not args.release_dir:
        raise SystemExit(
            "no release checkout: set PARADIFFUSION_RELEASE_DIR (or --release-dir) to a clone of "
            "github.com/weijiawu/ParaDiffusion, and PARADIFFUSION_RELEASE_PYTHON to a Python with its versions "
            "(docs/release_parity.md)"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare", help="the release's pipeline vs ours on one model folder")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="an official-layout folder or one of our exports")
    src.add_argument("--tiny", help="build the tiny random release-layout checkpoint here and use it")
    c.add_argument("--no-lora", action="store_true", help="--tiny without text_encoder_lora/")
    c.add_argument("--prompt", action="append", help="prompt (repeatable); default: the fixture's four")
    for k, v in DEFAULTS.items():
        c.add_argument(f"--{k}", type=type(v), default=v)
    c.add_argument("--json", help="write the differences here")
    c.add_argument(
        "--fixture-settings",
        action="store_true",
        help="the recorded fixture's settings (25 steps, 48x32): the ones the test's bound is for",
    )
    c.add_argument("--repeat", metavar="THREADS", nargs="?", const="1,2",
                   help="also run the release once more per thread count (default 1,2), each in a process of its "
                        "own, and compare it with its first run (1 thread): its own noise, the latents' bound")  # fmt: skip
    _release_args(c)
    r = sub.add_parser("record-fixture", help="store the release's outputs on the tiny checkpoint for the tests")
    r.add_argument("--out", default=str(FIXTURE))
    _release_args(r)
    u = sub.add_parser("unet-config", help="compare a UNet config.json with our default UNet (training.config)")
    u.add_argument("config")
    h = sub.add_parser("_release-side")  # internal: runs in the release's environment
    h.add_argument("--model", required=True)
    h.add_argument("--release-dir", required=True)
    h.add_argument("--settings", required=True)
    h.add_argument("--npz", required=True)
    args = ap.parse_args(argv)

    if args.cmd == "_release-side":
        release_side(args.model, args.release_dir, json.loads(args.settings), args.npz)
        return 0
    if args.cmd == "unet-config":
        diff = unet_config_diff(args.config)
        print(json.dumps(diff, indent=1) if diff else "same as training.config.DEFAULT_UNET")
        return 0
    _need_release(args)
    if args.cmd == "record-fixture":
        meta = record_fixture(args.release_dir, args.release_python, Path(args.out))
        print(json.dumps(meta["ours_at_recording"], indent=1))
        return 0
    model = args.model
    if args.tiny:
        sys.path.insert(0, str(REPO))
        from paradiffusion.testing.tiny_diffusion import build_tiny_release

        model = build_tiny_release(args.tiny, lora=not args.no_lora)
    settings = {"prompts": args.prompt or PROMPTS, **{k: getattr(args, k) for k in DEFAULTS}}
    if args.fixture_settings:
        settings = {**fixture_settings(), **({"prompts": args.prompt} if args.prompt else {})}
    rel = run_release(model, settings, args.release_dir, args.release_python)
    ours = our_side(model, settings)
    repeats, noise = None, None
    if args.repeat:
        threads = [int(n) for n in args.repeat.split(",")]
        repeats = repeat_release(model, settings, args.release_dir, args.release_python, rel, threads)
        noise = noise_of(repeats)
        for r in repeats:
            print(f"the release against itself (1 thread vs {r['threads']}, another process): " + ", ".join(
                f"{k} {v['max_abs_diff']:.3g}" for k, v in r["differences"].items() if "max_abs_diff" in v))  # fmt: skip
        print(f"  latents' bound: {NOISE_FACTOR} x {noise['latents']['max_abs_diff']:.3g} = "
              f"{bounds({'reference_noise': noise})['latents']:.3g}")  # fmt: skip
    diff = differences(ours, rel["arrays"], bounds({"reference_noise": noise} if noise else None))
    print(f"release {rel['commit'] or '(not a git checkout)'} {RELEASE_FILE} sha256 {rel['pipeline_sha256'][:12]}")
    print("release environment: " + ", ".join(f"{k} {v}" for k, v in rel["versions"].items()))
    print(
        f"model {model}: {len(settings['prompts'])} prompts, {settings['steps']} steps, guidance {settings['guidance']}, "
        f"{settings['width']}x{settings['height']}, seed {settings['seed']}, {rel['max_length']} tokens"
    )
    ok = report(diff)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "model": str(model),
                    "settings": settings,
                    "release": {k: rel[k] for k in ("commit", "pipeline_sha256", "versions")},
                    "differences": diff,
                    "release_repeats": repeats,
                },
                indent=1,
            )
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
