"""Models resolved before a stage starts; `paradiffusion models fetch/check`.

No test touches the internet: a local stand-in for the Hugging Face Hub
(paradiffusion.testing.fake_hub) answers the way the Hub does, HF_ENDPOINT points at it,
and the URL downloads come from the same local server.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from paradiffusion import hub
from paradiffusion.config import ConfigError
from paradiffusion.testing.fake_hub import FakeHub
from paradiffusion.testing.tiny_clip import build_tiny_clip
from pipelines.config import load_config

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("hub_models")
    info = build_tiny_clip(base / "tiny_clip")
    big = base / "aesthetic_big.bin"  # a URL download large enough to kill half-way
    big.write_bytes(os.urandom(3 << 20))
    return {**info, "big": str(big), "base": base}


@pytest.fixture(scope="module")
def fake_hub(tiny):
    with FakeHub() as server:
        server.add_repo("test-org/tiny-clip", tiny["clip_model"])
        server.add_repo("test-org/gated-clip", tiny["clip_model"], gated=True)
        server.add_file("aesthetic.pth", tiny["aesthetic"])
        server.add_file("big.pth", tiny["big"])
        yield server


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _env(endpoint: str | None, **extra: str) -> dict:
    drop = {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_ENDPOINT", "HF_HUB_CACHE", "TORCH_HOME"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = str(REPO)
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    env.update(extra)
    return env


def _cli(argv: list[str], sets: list[str], env: dict, timeout: float = 300) -> tuple[int, str, float]:
    cmd = [sys.executable, "-m", "paradiffusion", *argv, "--config", os.devnull]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stderr, time.time() - t0


def _filter_sets(tmp_path: Path, clip: str, aesthetic: str | None, *extra: str) -> list[str]:
    return [
        f"project.data_root={tmp_path / 'data'}",
        f"models.cache_dir={tmp_path / 'cache'}",
        f"filter.models.clip_model={clip}",
        f"filter.models.aesthetic={aesthetic if aesthetic else 'null'}",
        *([] if aesthetic else ["filter.thresholds.aesthetic_min=null"]),
        *extra,
    ]


# --------------------------------------------------------------------------- each failure: one line, rc 2, fast
def _failure_cases(tiny, fake_hub, tmp_path):
    """(name, argv, sets, env, words the line must hold)."""
    ep = fake_hub.endpoint
    incomplete = tmp_path / "incomplete_clip"
    incomplete.mkdir()
    (incomplete / "open_clip_config.json").write_text("{}")
    aesthetic_url = f"{ep}/files/aesthetic.pth"
    return [
        (
            "gated",
            ["filter"],
            _filter_sets(tmp_path, "hf-hub:test-org/gated-clip", None),
            _env(ep),
            ["filter.models.clip_model", "gated", "accept the licence", "hf auth login", "HF_TOKEN"],
        ),
        (
            "repo_not_found",
            ["filter"],
            _filter_sets(tmp_path, "hf-hub:test-org/no-such-model", None),
            _env(ep),
            ["filter.models.clip_model", "RepoNotFound", "check the id"],
        ),
        (
            "revision_not_found",
            ["train", "--stage", "1"],
            [
                f"project.data_root={tmp_path / 'data'}",
                f"models.cache_dir={tmp_path / 'cache'}",
                "train.model.llm=test-org/tiny-clip",
                "train.model.llm_revision=no-such-branch",
            ],
            _env(ep),
            ["train.model.llm", "no-such-branch", "RevisionNotFound", "check train.model.llm_revision"],
        ),
        (
            "no_network",
            ["filter"],
            _filter_sets(tmp_path, "hf-hub:test-org/tiny-clip", None),
            _env(f"http://127.0.0.1:{_closed_port()}"),
            ["filter.models.clip_model", "cannot be reached", "models fetch", "local copy"],
        ),
        (
            "offline_not_cached",
            ["filter"],
            _filter_sets(tmp_path, "ViT-B-32", None, "filter.models.clip_pretrained=openai"),
            _env(ep, HF_HUB_OFFLINE="1"),
            ["filter.models.clip_pretrained = openai", "HF_HUB_OFFLINE=1", "models fetch", "not in the model cache"],
        ),
        (
            "local_folder_missing",
            ["filter"],
            _filter_sets(tmp_path, str(tmp_path / "no" / "such" / "clip"), None),
            _env(ep),
            ["filter.models.clip_model", "no such folder"],
        ),
        (
            "local_folder_incomplete",
            ["filter"],
            _filter_sets(tmp_path, str(incomplete), None),
            _env(ep),
            ["filter.models.clip_model", "missing", "open_clip_model.safetensors (or .bin) weights"],
        ),
        (
            "url_404",
            ["filter"],
            _filter_sets(tmp_path, tiny["clip_model"], aesthetic_url.replace("aesthetic.pth", "gone.pth")),
            _env(ep),
            ["filter.models.aesthetic", "HTTP 404", "set filter.models.aesthetic to its path"],
        ),
    ]


CASES = [
    "gated",
    "repo_not_found",
    "revision_not_found",
    "no_network",
    "offline_not_cached",
    "local_folder_missing",
    "local_folder_incomplete",
    "url_404",
]


@pytest.mark.parametrize("case", CASES)
def test_a_model_that_cannot_be_had_ends_the_run_with_one_line(case, tiny, fake_hub, tmp_path):
    name, argv, sets, env, words = next(c for c in _failure_cases(tiny, fake_hub, tmp_path) if c[0] == case)
    # the old failure ran over a minute through Ray task retries: now the driver stops before Ray
    # starts, asking the Hub once. Ray would make its session folder under RAY_TMPDIR.
    ray_tmp = tmp_path / "ray"
    n_before = len(fake_hub.requests)
    rc, err, _ = _cli(argv, sets, {**env, "RAY_TMPDIR": str(ray_tmp)})
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not ray_tmp.exists(), "Ray was started before the model was had"
    asked = [(m, p) for m, p, _ in fake_hub.requests[n_before:]]
    repeated = sorted({r for r in asked if asked.count(r) > 1})
    assert not repeated, f"asked the Hub more than once: {repeated}"  # no retry, no second attempt
    assert not (tmp_path / "data" / "scores").exists()  # nothing started


# --------------------------------------------------------------------------- URL downloads resume
def test_url_download_resumes_after_a_kill(tiny, fake_hub, tmp_path):
    url = f"{fake_hub.endpoint}/files/big.pth"
    sets = _filter_sets(tmp_path, tiny["clip_model"], url)
    dest = tmp_path / "cache" / "torch" / "hub" / "checkpoints" / "big.pth"
    part = dest.with_name("big.pth.part")
    fake_hub.throttle_bytes_per_s = 512 * 1024  # 3 MB in about 6 s: time to kill it half-way
    cmd = [sys.executable, "-m", "paradiffusion", "models", "fetch", "--stages", "filter", "--config", os.devnull]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=_env(fake_hub.endpoint), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if part.is_file() and part.stat().st_size >= 256 * 1024:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        fake_hub.throttle_bytes_per_s = None
    kept = part.stat().st_size
    assert 0 < kept < (3 << 20) and not dest.exists()
    n_before = len(fake_hub.requests)
    rc, err, _ = _cli(["models", "fetch", "--stages", "filter"], sets, _env(fake_hub.endpoint))
    assert rc == 0, err[-3000:]
    ranges = [h.get("Range") for m, p, h in fake_hub.requests[n_before:] if p == "/files/big.pth" and m == "GET"]
    assert ranges and ranges[0] is not None and int(ranges[0].split("=")[1].rstrip("-")) >= kept // 2
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == hashlib.sha256(Path(tiny["big"]).read_bytes()).hexdigest()
    assert not part.exists() and not dest.with_name("big.pth.part.json").exists()
    assert "downloaded" in err


def test_download_url_restarts_when_the_file_changed(tmp_path, fake_hub):
    """A partial download of an older version is not glued to the new one (If-Range)."""
    src = tmp_path / "v.bin"
    src.write_bytes(b"new" * 1000)
    url = fake_hub.add_file("v.bin", src)
    dest = tmp_path / "out" / "v.bin"
    dest.parent.mkdir()
    dest.with_name("v.bin.part").write_bytes(b"old" * 200)
    dest.with_name("v.bin.part.json").write_text(f'{{"url": "{url}", "etag": "\\"stale\\""}}')
    hub.download_url(url, dest, progress=False)
    assert dest.read_bytes() == src.read_bytes()


# --------------------------------------------------------------------------- fetch, check, then run offline
def test_fetch_check_catches_truncation_and_stage_runs_offline_from_the_cache(tiny, fake_hub, tmp_path):
    url = f"{fake_hub.endpoint}/files/aesthetic.pth"
    sets = _filter_sets(tmp_path, "hf-hub:test-org/tiny-clip", url)
    rc, err, _ = _cli(["models", "fetch", "--stages", "filter"], sets, _env(fake_hub.endpoint))
    assert rc == 0, err[-3000:]
    assert "test-org/tiny-clip" in err and "downloaded" in err
    rc, err, _ = _cli(["models", "fetch", "--stages", "filter"], sets, _env(fake_hub.endpoint))
    assert rc == 0 and err.count("up to date") == 2, err[-3000:]

    # check needs no network at all
    dead = _env(f"http://127.0.0.1:{_closed_port()}")
    rc, err, _ = _cli(["models", "check", "--stages", "filter"], sets, dead)
    assert rc == 0 and err.count(" ok") == 2, err[-3000:]

    # the stage's own resolution finds everything in the cache, and the run goes offline
    cfg = load_config([], sets)
    with hub.run_environment(cfg.models):
        resolved = hub.resolve_for_run(cfg.models, [*hub.open_clip_refs("s", "hf-hub:test-org/tiny-clip")])
        assert resolved[0].action == "cached" and os.environ["HF_HUB_OFFLINE"] == "1"
        assert os.environ["HF_HUB_CACHE"] == str(tmp_path / "cache" / "hub")
    assert os.environ.get("HF_HUB_CACHE") != str(tmp_path / "cache" / "hub")  # restored after the command

    # a truncated weight file and an altered URL download are caught, offline
    storage = tmp_path / "cache" / "hub" / "models--test-org--tiny-clip"
    (weights,) = storage.glob("snapshots/*/open_clip_pytorch_model.bin")
    blob = Path(os.path.realpath(weights))
    data = blob.read_bytes()
    blob.write_bytes(data[: len(data) // 2])
    aesthetic = tmp_path / "cache" / "torch" / "hub" / "checkpoints" / "aesthetic.pth"
    raw = bytearray(aesthetic.read_bytes())
    raw[-1] ^= 0xFF
    aesthetic.write_bytes(bytes(raw))
    rc, err, _ = _cli(["models", "check", "--stages", "filter"], sets, dead)
    assert rc == 1
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, err[-3000:]
    assert "open_clip_pytorch_model.bin" in errors[0] and "truncated" in errors[0]
    assert "aesthetic.pth" in errors[1] and "sha256" in errors[1]
    assert "models fetch --repair" in errors[0]
    # --quick (no hashing) still sees the truncation, from the size the Hub published
    rc, err, _ = _cli(["models", "check", "--stages", "filter", "--quick"], sets, dead)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 1 and len(errors) == 1 and "truncated" in errors[0]

    # fetch replaces a file of the wrong size; --repair also hashes, and replaces the altered one
    rc, err, _ = _cli(["models", "fetch", "--stages", "filter"], sets, _env(fake_hub.endpoint))
    assert rc == 0 and "repaired" in err, err[-3000:]
    rc, err, _ = _cli(["models", "check", "--stages", "filter"], sets, dead)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 1 and len(errors) == 1 and "aesthetic.pth" in errors[0] and "sha256" in errors[0]
    rc, err, _ = _cli(["models", "fetch", "--stages", "filter", "--repair"], sets, _env(fake_hub.endpoint))
    assert rc == 0 and "repaired" in err, err[-3000:]
    rc, err, _ = _cli(["models", "check", "--stages", "filter"], sets, dead)
    assert rc == 0, err[-3000:]


@pytest.mark.slow
def test_a_stage_runs_on_fetched_models_without_network(tiny, fake_hub, tmp_path):
    """Fetch the filter's models from the fake Hub and URL, then run the filter with the Hub unreachable."""
    from paradiffusion.testing.image_shards import write_image_shards
    from paradiffusion.testing.sample import build_sample

    records = build_sample(tmp_path / "sample")[:8]
    write_image_shards(records, tmp_path / "sample", tmp_path / "data" / "images", shard_size=4)
    url = f"{fake_hub.endpoint}/files/aesthetic.pth"
    sets = _filter_sets(
        tmp_path,
        "hf-hub:test-org/tiny-clip",
        url,
        "filter.runner=local",
        "filter.thresholds.min_short_side=64",
        "filter.thresholds.aesthetic_min=null",
        "filter.thresholds.clip_score_min=null",
    )
    rc, err, _ = _cli(["models", "fetch", "--stages", "filter"], sets, _env(fake_hub.endpoint))
    assert rc == 0, err[-3000:]
    rc, err, _ = _cli(["filter"], sets, _env(f"http://127.0.0.1:{_closed_port()}"), timeout=600)
    assert rc == 0, err[-5000:]
    assert "filter.models.clip_model: cached" in err and "filter.models.aesthetic: cached" in err
    assert (tmp_path / "data" / "scores" / "_summary.json").is_file()


# --------------------------------------------------------------------------- what is selected and checked
def test_select_files_takes_what_the_loader_reads():
    listing = [
        ".gitattributes",
        "README.md",
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "model.fp16-00001-of-00001.safetensors",
        "pytorch_model.bin",
        "flax_model.msgpack",
        "tokenizer.json",
        "tokenizer.model",
        "modeling_x.py",
        "figure.png",
        "LICENSE.txt",
        "merges.txt",
        "onnx/model.onnx",
        "original/consolidated.pth",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "vae/config.json",
        "vae/diffusion_pytorch_model.bin",
    ]
    ref = hub.ModelRef("s", "o/r", "hf", layout=("transformers", "tokenizer"))
    assert hub.select_files(listing, ref) == [
        "config.json",
        "generation_config.json",
        "merges.txt",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "modeling_x.py",
        "tokenizer.json",
        "tokenizer.model",
    ]
    unet = hub.ModelRef("s", "o/r", "hf", subfolder="unet", layout=("diffusers",))
    assert hub.select_files(listing, unet) == ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    vae = hub.ModelRef("s", "o/r", "hf", layout=("vae:diffusers",))
    assert hub.select_files(listing, vae) == ["vae/config.json", "vae/diffusion_pytorch_model.bin"]
    tok = hub.ModelRef("s", "o/r", "hf", layout=("tokenizer",))
    assert not any(f.endswith((".safetensors", ".bin")) for f in hub.select_files(listing, tok))
    one = hub.ModelRef("s", "o/r", "hf", layout=("one_of",), alternatives=("x.safetensors", "pytorch_model.bin"))
    assert hub.select_files(listing, one) == ["pytorch_model.bin"]
    assert len(hub.select_files(listing, hub.ModelRef("s", "o/r", "hf"))) == len(listing)  # any: everything


def test_missing_files_names_what_a_local_folder_lacks(tmp_path):
    d = tmp_path / "llm"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "tokenizer.json").write_text("{}")
    ref = hub.ModelRef("train.model.llm", str(d), "folder", layout=("transformers", "tokenizer"))
    assert hub.missing_files(hub._View(root=d), ref) == ["model.safetensors (or .bin) weights"]
    (d / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}'
    )
    (d / "model-00001-of-00002.safetensors").write_bytes(b"x")
    assert hub.missing_files(hub._View(root=d), ref) == ["model-00002-of-00002.safetensors"]
    (d / "model-00002-of-00002.safetensors").write_bytes(b"x")
    assert hub.missing_files(hub._View(root=d), ref) == []
    with pytest.raises(hub.ModelUnavailable, match="no such folder"):
        hub.locate(hub.ModelRef("s", str(d / "nope"), "folder", layout=("transformers",)), hub.model_cache(None))
    pipe = tmp_path / "pipe"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "model_index.json").write_text(
        '{"_class_name": "X", "unet": ["diffusers", "UNet2DConditionModel"], '
        '"scheduler": ["diffusers", "DDPMScheduler"], "safety_checker": [null, null]}'
    )
    (pipe / "unet" / "config.json").write_text("{}")
    pref = hub.ModelRef("s", str(pipe), "folder", layout=("pipeline",))
    assert hub.missing_files(hub._View(root=pipe), pref) == [
        "unet/diffusion_pytorch_model.safetensors (or .bin) weights",
        "scheduler/",
    ]


def test_open_clip_tags_become_the_hub_file_open_clip_reads():
    import open_clip  # the real table, to compare with what is read without importing it

    (ref,) = hub.open_clip_refs("filter.models.clip_model", "ViT-L-14", "openai", "filter.models.clip_pretrained")
    want = open_clip.get_pretrained_cfg("ViT-L-14", "openai")["hf_hub"].rstrip("/")
    assert (ref.kind, ref.source, ref.layout, ref.setting) == (
        "hf",
        want,
        ("open_clip_weights",),
        "filter.models.clip_pretrained",
    )
    assert hub.open_clip_refs("s", "ViT-B-32", None) == []  # random weights: nothing to load
    (hf,) = hub.open_clip_refs("s", "hf-hub:laion/CLIP-ViT-L-14-laion2B-s32B-b82K")
    assert hf.source == "laion/CLIP-ViT-L-14-laion2B-s32B-b82K" and hf.layout == ("open_clip",)
    with pytest.raises(hub.ModelUnavailable, match="no pretrained tag 'nope'.*openai"):
        hub.open_clip_refs("s", "ViT-L-14", "nope", "p")
    refs = hub.open_clip_refs("s", "ViT-B-16-SigLIP", "webli")
    assert any(r.layout == ("tokenizer",) for r in refs)  # its text tower uses a Hugging Face tokenizer


# --------------------------------------------------------------------------- what each stage declares
def _declared(argv_sets: list[str], command: str) -> list[hub.ModelRef]:
    from paradiffusion.cli import load_command
    from pipelines.cli import COMMANDS

    cfg = load_config([REPO / "pipelines.yaml"], argv_sets)
    return load_command(COMMANDS[command]).models(cfg, None)


def test_stages_declare_the_models_their_config_names():
    sources = {c: [(r.setting, r.source, r.kind) for r in _declared([], c)] for c in ("filter", "train", "eval")}
    assert sources["filter"] == [
        ("filter.models.clip_pretrained", "timm/vit_large_patch14_clip_224.openai", "hf"),
        (
            "filter.models.aesthetic",
            "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth",
            "url",
        ),
    ]
    assert sources["train"] == [
        ("train.model.llm", "meta-llama/Llama-2-7b-hf", "hf"),
        ("train.model.vae", "madebyollin/sdxl-vae-fp16-fix", "hf"),
    ]
    gen = _declared([], "eval-generate")
    assert [(r.setting, r.source, r.layout[0]) for r in gen] == [
        ("eval.models.paradiffusion.path", "weijiawu/ParaDiffusion", "any"),
        ("eval.models.sdxl.path", "stabilityai/stable-diffusion-xl-base-1.0", "pipeline"),
    ]
    # eval's DPG-Bench judge is a captioner entry: its weights are resolved like the caption stage's
    judge = [(r.setting, r.source) for r in _declared([], "eval") if r.setting.startswith("caption.")]
    assert judge == [("caption.captioners.qwen2_5_vl.model", "Qwen/Qwen2.5-VL-7B-Instruct")]
    assert not any(r.setting.startswith("caption.") for r in _declared(["eval.metrics.dpg.questions=null"], "eval"))
    # the default captioner (native CogVLM) names its weights and Vicuna's tokenizer
    assert [(r.setting, r.source) for r in _declared([], "caption")] == [
        ("caption.captioners.cogvlm.model", "THUDM/cogvlm-chat-hf"),
        ("caption.captioners.cogvlm.tokenizer", "lmsys/vicuna-7b-v1.5"),
    ]
    # remote code that is not pinned is refused before anything is downloaded
    with pytest.raises(ConfigError, match="pinned"):
        _declared(["caption.captioner=cogvlm_remote"], "caption")
    qwen = _declared(["caption.captioner=qwen2_5_vl"], "caption")
    assert [(r.source, r.revision) for r in qwen] == [
        ("Qwen/Qwen2.5-VL-7B-Instruct", "cc594898137f460bfe9f0759e9844b3ce807cfb5")
    ]


# --------------------------------------------------------------------------- the run's environment
def test_a_ray_cluster_job_gets_the_model_cache_and_offline_mode(monkeypatch, tmp_path):
    import types

    from paradiffusion.config import ModelsConfig, RayConfig
    from paradiffusion.raycluster import init_ray

    calls: dict = {}
    fake_ray = types.SimpleNamespace(
        is_initialized=lambda: False, init=lambda **kw: calls.update(kw), cluster_resources=dict, nodes=list
    )
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    with hub.run_environment(ModelsConfig(cache_dir=str(tmp_path / "m"))):
        hub.go_offline()
        init_ray(RayConfig(address="10.0.0.1:6379"))
        assert os.environ["TORCH_HOME"] == str(tmp_path / "m" / "torch")
    from paradiffusion.offline import NO_PHONE_HOME

    assert calls["runtime_env"]["env_vars"] == {  # (beside it, maybe the storage settings' worker setup hook)
        "HF_HUB_CACHE": str(tmp_path / "m" / "hub"),
        "TORCH_HOME": str(tmp_path / "m" / "torch"),
        "HF_HUB_OFFLINE": "1",
        **NO_PHONE_HOME,  # the libraries' opt-outs of calls home reach the cluster's workers too
    }
    assert set(calls["runtime_env"]) <= {"env_vars", "worker_process_setup_hook"}
    assert os.environ.get("TORCH_HOME") != str(tmp_path / "m" / "torch")  # restored after the command


def test_models_command_names_the_commands_that_declare_models(capsys):
    from pipelines.cli import main

    assert main(["models", "check", "--stages", "stats", "--config", os.devnull]) == 2
    err = capsys.readouterr().err
    assert "stats" in err and "filter" in err and "train" in err
    with pytest.raises(Exception, match="cache_dir"):
        load_config([], ["models.cache_dir=s3://bucket/models"])


# --------------------------------------------------------------------------- models.lock
def _cached_repo(hub_dir: Path, repo: str, commit: str, files: dict[str, str], ref: str | None = "main") -> Path:
    """A Hugging Face cache entry as huggingface_hub lays it out: snapshots/<commit>/..., refs/<branch>."""
    storage = hub_dir / ("models--" + repo.replace("/", "--"))
    snap = storage / "snapshots" / commit
    for name, text in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_text(text)
    if ref:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return storage


def test_a_run_loads_the_locked_commit_and_refuses_a_cache_at_another(tmp_path):
    from paradiffusion.config import ModelsConfig, resolved_config_document

    old, new = "a" * 40, "b" * 40
    files = {"config.json": "{}", "model.safetensors": "x"}
    lock_file = tmp_path / "models.lock"
    lock = hub.ModelsLock.read(lock_file)
    assert lock.entries == {} and lock.path == lock_file  # no file yet: an empty lock
    lock.set("org/llm", None, old, ["train.model.llm"])
    lock.write()
    assert hub.ModelsLock.read(lock_file).commit_for("org/llm", "main") == old
    assert lock_file.read_text().startswith("# models.lock")
    ref = hub.model_ref("train.model.llm", "org/llm")
    cfg = ModelsConfig(cache_dir=str(tmp_path / "cache"), offline=True, lock=str(lock_file))

    # the cache's main moved on (another fetch, another project): refused, one line naming both commits
    storage = _cached_repo(tmp_path / "cache" / "hub", "org/llm", new, files)
    _cached_repo(tmp_path / "cache" / "hub", "org/llm", old, files, ref=None)
    with hub.run_environment(cfg), pytest.raises(hub.ModelUnavailable) as err:
        hub.resolve_for_run(cfg, [ref])
    line = str(err.value)
    assert "\n" not in line and old in line and new in line and "models.lock" in line and "models fetch" in line

    # the cache's ref names the locked commit: that snapshot is what the run loads, and records
    (storage / "refs" / "main").write_text(old)
    with hub.run_environment(cfg):
        (res,) = hub.resolve_for_run(cfg, [ref])
        assert res.commit == old and res.path.endswith(old)
        assert hub.resolved_commit("org/llm", None) == old  # what loaders pass as the revision, in any process
        assert hub.resolved_commit("org/llm", "main") == old and hub.resolved_commit("org/other", None) is None
        doc = resolved_config_document({"x": 1}, "train")
        assert doc["models"] == [{"model": "org/llm", "revision": None, "commit": old, "settings": ["train.model.llm"]}]
    assert hub.resolved_commit("org/llm", None) is None  # the command's environment is restored

    # a snapshot fetched by commit, with no ref yet: the ref is written so offline loaders find it
    (storage / "refs" / "main").unlink()
    with hub.run_environment(cfg):
        hub.resolve_for_run(cfg, [ref])
    assert (storage / "refs" / "main").read_text() == old

    # without a lock the branch resolves to the cache's newest, as before; a full SHA needs no lock entry
    (storage / "refs" / "main").write_text(new)
    unlocked = ModelsConfig(cache_dir=str(tmp_path / "cache"), offline=True)
    with hub.run_environment(unlocked):
        assert hub.resolve_for_run(unlocked, [ref])[0].commit == new
    with hub.run_environment(cfg):
        pinned = hub.model_ref("s", "org/llm", revision=old)
        assert not hub.movable(pinned) and hub.resolve_for_run(cfg, [pinned])[0].commit == old


def test_a_damaged_lock_is_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "models.lock"
    for text in ("version: 1\nmodels:\n  org/x@main: {commit: nothex}\n", "models: [1, 2]\n", "a: [\n"):
        bad.write_text(text)
        with pytest.raises(hub.ModelUnavailable) as err:
            hub.ModelsLock.read(bad)
        assert str(bad) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow  # four CLI runs
def test_fetch_writes_the_lock_and_every_node_fetches_the_locked_commit(tiny, tmp_path):
    """fetch locks main's commit; after main moves, another cache still gets the locked commit; --update moves it."""
    import shutil

    import yaml

    v2 = tmp_path / "clip_v2"
    shutil.copytree(tiny["clip_model"], v2)
    (v2 / "open_clip_config.json").write_text((v2 / "open_clip_config.json").read_text() + "\n")
    lock_file = tmp_path / "models.lock"
    with FakeHub() as server:
        v1_sha = server.add_repo("test-org/lock-clip", tiny["clip_model"])
        env = _env(server.endpoint)

        def sets(cache: str) -> list[str]:
            return _filter_sets(tmp_path, "hf-hub:test-org/lock-clip", None, f"models.lock={lock_file}") + [
                f"models.cache_dir={tmp_path / cache}"
            ]

        rc, err, _ = _cli(["models", "fetch", "--stages", "filter"], sets("node1"), env)
        assert rc == 0, err[-3000:]
        doc = yaml.safe_load(lock_file.read_text())
        assert doc["models"]["test-org/lock-clip@main"]["commit"] == v1_sha
        assert "filter.models.clip_model" in doc["models"]["test-org/lock-clip@main"]["settings"]

        v2_sha = server.add_repo("test-org/lock-clip", v2)  # upstream moves main
        assert v2_sha != v1_sha
        rc, err, _ = _cli(["models", "fetch", "--stages", "filter"], sets("node2"), env)
        assert rc == 0, err[-3000:]
        storage = tmp_path / "node2" / "hub" / "models--test-org--lock-clip"
        assert [p.name for p in (storage / "snapshots").iterdir()] == [v1_sha]  # the locked commit, not main's
        assert (storage / "refs" / "main").read_text() == v1_sha
        assert yaml.safe_load(lock_file.read_text()) == doc  # unchanged

        # a node whose cache has main at another commit: the stage refuses, one line naming both
        (storage / "refs" / "main").write_text(v2_sha)
        dead = _env(f"http://127.0.0.1:{_closed_port()}", HF_HUB_OFFLINE="1")
        rc, err, _ = _cli(["filter"], sets("node2"), dead)
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert rc == 2 and len(lines) == 1 and v1_sha in lines[0] and v2_sha in lines[0], err[-3000:]

        # --update locks main's newest commit and says what changed
        rc, err, _ = _cli(["models", "fetch", "--stages", "filter", "--update"], sets("node1"), env)
        assert rc == 0, err[-3000:]
        assert yaml.safe_load(lock_file.read_text())["models"]["test-org/lock-clip@main"]["commit"] == v2_sha
        assert f"{v1_sha[:12]} -> {v2_sha[:12]}" in err
