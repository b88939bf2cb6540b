"""Content fingerprints for cache keys: weights and reference folders.

A cache of features is valid only for the exact weights that made them and the exact
files they were made from. Names, sizes and modification times are not enough: new
weights copied into the same folder (or a reference image rewritten with its old
timestamp) keep them. So every key here is a SHA-256 of file *contents* (with each
file's path relative to its root), or, for weights that are not local files (a hub
name resolved by the loader), of the loaded parameters themselves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

_CHUNK = 1 << 20


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def files_digest(files: Iterable[Path], root: Path) -> str:
    """SHA-256 over every file's path relative to ``root`` and the SHA-256 of its content."""
    h = hashlib.sha256()
    for f in sorted(files):
        with open(f, "rb") as fh:
            content = hashlib.file_digest(fh, "sha256").hexdigest()
        h.update(f"\0{f.relative_to(root).as_posix()}\0{content}".encode())
    return h.hexdigest()


def path_fingerprint(path: str | Path) -> str:
    """The content fingerprint of a local file, or of every file under a folder (hidden
    files and folders such as ``.cache`` or ``.git`` left out: they change without the
    weights changing)."""
    p = Path(path)
    if p.is_file():
        return "file:" + files_digest([p], p.parent)
    files = [f for f in p.rglob("*") if f.is_file() and not _hidden(f, p)]
    if not files:
        raise FileNotFoundError(f"{path}: no files to fingerprint")
    return "dir:" + files_digest(files, p)


def module_fingerprint(module) -> str:
    """SHA-256 of a torch module's state dict (names, dtypes, shapes and bytes)."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "params:" + h.hexdigest()


def local_path(spec: str | None) -> Path | None:
    """``spec`` as a local file or folder (``local-dir:`` / ``file://`` prefixes allowed), else None."""
    if not spec:
        return None
    for prefix in ("local-dir:", "file://"):
        spec = spec.removeprefix(prefix)
    p = Path(spec).expanduser()
    return p if p.exists() else None


def weights_fingerprint(*specs: str | None, module=None) -> str:
    """The fingerprint of the weights named by ``specs`` (e.g. a CLIP model name and its
    pretrained tag): the file contents of those that are local paths; when none is, the
    loaded ``module``'s parameters; the names alone only when neither is available."""
    local = [p for p in (local_path(s) for s in specs) if p is not None]
    if local:
        return "+".join(path_fingerprint(p) for p in local)
    if module is not None:
        return module_fingerprint(module)
    return "name:" + ":".join(str(s) for s in specs)
