"""What a config setting names: ModelRef (Hub repo, open_clip tag, URL, folder, file) and the one-line error."""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from paradiffusion.log import get_logger

log = get_logger("models")

Kind = Literal["hf", "folder", "file", "url", "unmanaged"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHA = re.compile(r"^[0-9a-f]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_WEIGHT_EXTS = (
    ".safetensors",
    ".bin",
    ".pth",
    ".pt",
    ".ckpt",
    ".msgpack",
    ".h5",
    ".onnx",
    ".onnx_data",
    ".gguf",
    ".ot",
    ".tflite",
    ".pb",
    ".npz",
    ".mlmodel",
)
_MEDIA_EXTS = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".mp4", ".pdf")
_DOC_FILE = re.compile(r"(?i)^(\.gitattributes|.*\.md|license.*|notice.*|use_policy.*)$")  # no loader reads these
HTTP_TIMEOUT = 15.0  # seconds for one metadata request: an unreachable Hub fails within seconds, not minutes


# =========================================================================== what a stage declares
@dataclass(frozen=True)
class ModelRef:
    """One model a config setting names, and what a complete copy of it holds.

    ``kind``: ``hf`` (a Hub repository), ``folder`` / ``file`` (local, or ``file`` on any
    fsspec URL), ``url`` (downloaded into torch.hub's cache) or ``unmanaged`` (a package
    fetches it itself; listed, not resolved, and the run stays online).

    ``layout`` says which files make it loadable, as parts ``"<kind>"`` or
    ``"<subfolder>:<kind>"`` (relative to ``subfolder``), kinds from :data:`LAYOUTS`:
    ``transformers``, ``tokenizer``, ``diffusers``, ``scheduler``, ``open_clip``,
    ``open_clip_weights``, ``one_of`` (the first of ``alternatives`` the repo has),
    ``pipeline`` (a diffusers pipeline: files chosen by diffusers itself) or ``any``
    (every file). For a Hub repo the same parts choose what is downloaded: the
    folder's small files plus the weights its loader reads (safetensors over ``.bin``,
    no fp16 variants), not every file of the repo.
    """

    setting: str
    source: str
    kind: Kind
    revision: str | None = None
    subfolder: str | None = None
    layout: tuple[str, ...] = ("any",)
    alternatives: tuple[str, ...] = ()
    revision_setting: str | None = None
    note: str = ""
    value: str | None = None  # what the setting holds, when that is not ``source`` (an open_clip tag)
    commit: str | None = None  # a Hub model's commit from models.lock (paradiffusion.hub.lock.pin)

    @property
    def key(self) -> tuple:
        return (self.kind, self.source, self.revision, self.subfolder, self.layout, self.alternatives)

    def describe(self) -> str:
        """``source`` with its revision and subfolder, as shown in messages and summaries."""
        s = self.source
        if self.subfolder:
            s += f" [{self.subfolder}]"
        if self.revision:
            s += f" @ {self.revision}"
        return s

    def head(self) -> str:
        """``setting = value (what it is)``: how a message about this model starts."""
        extra = [self.note] if self.note and self.note not in (self.source, self.value) else []
        if self.value is not None and self.value != self.source:
            extra.append(f"Hub repo {self.describe()}" if self.kind == "hf" else self.describe())
        return f"{self.setting} = {self.value or self.describe()}" + (f" ({'; '.join(extra)})" if extra else "")


def looks_local(value: str) -> bool:
    """True for an existing path or something that cannot be a Hub id (``owner/name``)."""
    if value.startswith(("/", "./", "../", "~", ".")) or os.path.exists(os.path.expanduser(value)):
        return True
    return not _REPO_ID.match(value)


def model_ref(
    setting: str,
    value: str,
    *,
    revision: str | None = None,
    revision_setting: str | None = None,
    subfolder: str | None = None,
    layout: tuple[str, ...] = ("transformers",),
    note: str = "",
) -> ModelRef:
    """A model named by a Hugging Face id or a local folder (or an http(s) URL of one file)."""
    if value.startswith(("http://", "https://")):
        return ModelRef(setting, value, "url", note=note)
    if looks_local(value):
        return ModelRef(setting, value, "folder", subfolder=subfolder, layout=layout, note=note)
    return ModelRef(
        setting,
        value,
        "hf",
        revision=revision,
        revision_setting=revision_setting,
        subfolder=subfolder,
        layout=layout,
        note=note,
    )


def weights_ref(setting: str, value: str, note: str = "") -> ModelRef:
    """One weights file: a local path, an fsspec URL (``s3://...``) or an http(s) URL."""
    if value.startswith(("http://", "https://")):
        return ModelRef(setting, value, "url", note=note)
    return ModelRef(setting, value, "file", note=note)


def unmanaged(setting: str, value: str, note: str) -> ModelRef:
    """A model a third-party package downloads by itself (listed with ``note``; the run stays online)."""
    return ModelRef(setting, value, "unmanaged", note=note)


def open_clip_refs(
    setting: str, name: str, pretrained: str | None = None, pretrained_setting: str | None = None
) -> list[ModelRef]:
    """What ``open_clip.create_model_and_transforms(name, pretrained)`` reads.

    ``hf-hub:org/repo`` is that repository (config + weights); a local folder (or
    ``local-dir:``) must hold ``open_clip_config.json`` + weights; a built-in name with a
    tag is the Hub file open_clip's pretrained table names for it (open_clip prefers the
    repo's ``open_clip_model.safetensors`` and falls back to the ``.bin``), plus the
    Hugging Face tokenizer its model config names, if any; a built-in name with a file
    path is that file; without ``pretrained`` nothing is loaded (random weights).
    """
    psetting = pretrained_setting or setting
    if name.startswith("hf-hub:"):
        repo = name.removeprefix("hf-hub:")
        return [ModelRef(setting, repo, "hf", layout=("open_clip",), note="open_clip", value=name)]
    if name.startswith("local-dir:") or (looks_local(name) and "/" in name) or os.path.isdir(name):
        return [ModelRef(setting, name.removeprefix("local-dir:"), "folder", layout=("open_clip",), note="open_clip")]
    refs: list[ModelRef] = []
    table = _open_clip_tables()
    builtin = name.replace("/", "-")
    model_cfg = table.model_config(builtin)
    if model_cfg is None:
        known = ", ".join(sorted(table.models())[:12])
        raise ModelUnavailable(
            f"{setting} = {name}: not an open_clip model name, hf-hub:org/repo id or local folder "
            f"(open_clip names: {known}, ...). Fix: use a name from open_clip.list_models(), or hf-hub:org/repo",
            setting=setting,
        )
    if pretrained:
        if looks_local(pretrained) and (os.path.sep in pretrained or os.path.exists(pretrained)):
            refs.append(ModelRef(psetting, pretrained, "file", note=f"open_clip {name} weights"))
        else:
            cfg = table.pretrained_cfg(builtin, pretrained)
            if not cfg:
                tags = ", ".join(table.tags(builtin)) or "none"
                raise ModelUnavailable(
                    f"{psetting} = {pretrained}: open_clip has no pretrained tag {pretrained!r} for {name} "
                    f"(its tags: {tags}). Fix: use one of those tags, or a weights file path",
                    setting=psetting,
                )
            note = f"open_clip {name}"
            if cfg.get("hf_hub"):
                # open_clip's convention: "org/repo/" is the repo's default weights, "org/repo/file.pt" that file.
                repo, filename = os.path.split(cfg["hf_hub"])
                if filename:
                    alts = tuple(dict.fromkeys([*_safe_alternatives(filename), filename]))
                    refs.append(
                        ModelRef(
                            psetting, repo, "hf", layout=("one_of",), alternatives=alts, note=note, value=pretrained
                        )
                    )
                else:
                    refs.append(
                        ModelRef(psetting, repo, "hf", layout=("open_clip_weights",), note=note, value=pretrained)
                    )
            else:  # pragma: no cover - every tag of the pinned open_clip has a Hub copy
                refs.append(unmanaged(psetting, cfg.get("url", pretrained), f"{note}: open_clip downloads it itself"))
    tokenizer = (model_cfg.get("text_cfg") or {}).get("hf_tokenizer_name")
    if tokenizer:
        refs.append(model_ref(setting, tokenizer, layout=("tokenizer",), note=f"the tokenizer of open_clip {name}"))
    return refs


def _safe_alternatives(filename: str) -> list[str]:
    # open_clip's own rule (pretrained._get_safe_alternatives): try a .safetensors twin first.
    if filename == "open_clip_pytorch_model.bin":
        return ["open_clip_model.safetensors"]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors"]
    return []


class _OpenClipTables:
    """open_clip's pretrained table and model configs, read without importing the package.

    ``import open_clip`` pulls in torch and torchvision (about 10 s of CPU on a small
    machine); the tag table is plain data in ``open_clip/pretrained.py`` and the model
    configs are JSON files, so the driver loads just those (torch blocked) to know within
    a second which Hub file a tag means. When open_clip is already imported, it is used.
    """

    def __init__(self) -> None:
        import importlib.util

        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            raise ModelUnavailable(
                "open_clip is not installed (needed to resolve open_clip model names); install it with: "
                "pip install -e '.[curation]'",
                setting="",
            )
        self.root = Path(list(spec.submodule_search_locations)[0])
        if "open_clip" in sys.modules:
            self._mod = sys.modules["open_clip"].pretrained
        else:
            self._mod = self._load_pretrained_module()

    def _load_pretrained_module(self):
        import importlib
        import types

        pkg_name = "_paradiffusion_open_clip_tables"
        if pkg_name + ".pretrained" in sys.modules:
            return sys.modules[pkg_name + ".pretrained"]
        pkg = types.ModuleType(pkg_name)
        pkg.__path__ = [str(self.root)]  # a stand-in package: open_clip's files, not its __init__
        sys.modules[pkg_name] = pkg
        saved = sys.modules.get("safetensors.torch", _MISSING)
        if saved is _MISSING:
            sys.modules["safetensors.torch"] = None  # type: ignore[assignment]  # its import would load torch
        try:
            return importlib.import_module(pkg_name + ".pretrained")
        finally:
            if saved is _MISSING:
                del sys.modules["safetensors.torch"]

    def models(self) -> list[str]:
        return [p.stem for p in (self.root / "model_configs").glob("*.json")]

    def model_config(self, name: str) -> dict | None:
        f = self.root / "model_configs" / f"{name}.json"
        return json.loads(f.read_text()) if f.is_file() else None

    def pretrained_cfg(self, name: str, tag: str) -> dict:
        return self._mod.get_pretrained_cfg(name, tag)

    def tags(self, name: str) -> list[str]:
        return list(self._mod.list_pretrained_tags_by_model(name))


_MISSING = object()
_TABLES: _OpenClipTables | None = None


def _open_clip_tables() -> _OpenClipTables:
    global _TABLES
    if _TABLES is None:
        _TABLES = _OpenClipTables()
    return _TABLES


# =========================================================================== errors
class ModelUnavailable(Exception):
    """A model a setting names cannot be had. The message is one line: setting, what was tried, the fix."""

    def __init__(self, message: str, setting: str = ""):
        super().__init__(" ".join(message.split()))  # one line, whatever went into it
        self.setting = setting


class _NotThere(Exception):
    """Internal: the model is not (completely) on this machine; ``detail`` says what is missing."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
