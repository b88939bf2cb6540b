"""Models named in the config: declared by each stage, resolved before the stage starts.

Each stage's light CLI module declares the models its resolved config names
(``Command.models(cfg, args) -> list[ModelRef]``). :func:`paradiffusion.cli.run_command`
resolves them in the driver before anything else runs (no Ray, no DeepSpeed, no data):

- a local folder or file must exist and hold a model (config + weights); what is
  missing is named;
- a Hugging Face repository (revision, subfolder, the files its loader reads) must be
  in the cache, or is downloaded into it when downloads are allowed;
- an open_clip name + pretrained tag becomes the Hub file open_clip itself fetches
  (read from open_clip's own pretrained table);
- a URL (the LAION aesthetic head) is downloaded, resumably, into torch.hub's cache
  folder, where ``torch.hub.load_state_dict_from_url`` finds it.

A model that cannot be had stops the run with :class:`ModelUnavailable`, whose message
is ONE line: the setting, what was tried, and the fix. After a successful resolution the
run goes offline (``HF_HUB_OFFLINE=1``, inherited by Ray workers and DeepSpeed ranks), so
every loader reads what was resolved and none waits on a network.

``paradiffusion models fetch`` / ``check`` (:mod:`pipelines.hub_cli`) use the same
declarations to fill a cache folder where there is network and to verify it where there
is none. Nothing heavy is imported at module level (stage CLI modules import this).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from paradiffusion.log import get_logger

if TYPE_CHECKING:
    from paradiffusion.config import ModelsConfig

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


# =========================================================================== where models live
@dataclass(frozen=True)
class ModelCache:
    """The folders models are cached in: Hugging Face's cache layout and torch.hub's checkpoints."""

    hub_dir: Path  # models--org--name/{blobs,refs,snapshots,trees}
    url_dir: Path  # <TORCH_HOME>/hub/checkpoints: torch.hub.load_state_dict_from_url looks here
    root: Path | None = None  # models.cache_dir when set

    def __str__(self) -> str:
        return str(self.root) if self.root else f"{self.hub_dir} + {self.url_dir}"


#: Environment variables this process exported for the run (Ray cluster jobs get them too).
_RUN_ENV: dict[str, str] = {}


def run_env() -> dict[str, str]:
    """The variables the model resolution exported: HF_HUB_CACHE, TORCH_HOME, HF_HUB_OFFLINE."""
    return dict(_RUN_ENV)


def _export(name: str, value: str) -> None:
    os.environ[name] = value
    _RUN_ENV[name] = value
    consts = sys.modules.get("huggingface_hub.constants")
    if consts is not None:  # already imported in this process: its values were read from the old environment
        if name == "HF_HUB_CACHE":
            consts.HF_HUB_CACHE = value
        elif name == "HF_HUB_OFFLINE":
            consts.HF_HUB_OFFLINE = value == "1"


def env_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set to a true value, as huggingface_hub reads it."""
    v = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return v.strip().upper() in {"1", "ON", "YES", "TRUE"}


def model_cache(cfg: ModelsConfig | None, export: bool = True) -> ModelCache:
    """The cache folders for ``cfg`` (``models.cache_dir``, else the libraries' own, from the environment).

    With ``cache_dir`` set and ``export``, ``HF_HUB_CACHE`` and ``TORCH_HOME`` are pointed at it
    for this process and everything it starts.
    """
    if cfg is not None and cfg.cache_dir:
        root = Path(os.path.expanduser(cfg.cache_dir)).resolve()
        hub, torch_home = root / "hub", root / "torch"
        if export:
            _export("HF_HUB_CACHE", str(hub))
            _export("TORCH_HOME", str(torch_home))
        return ModelCache(hub, torch_home / "hub" / "checkpoints", root)
    from huggingface_hub import constants

    # torch.hub._get_torch_home, without importing torch.
    torch_home = os.path.expanduser(
        os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
    )
    hub = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    return ModelCache(Path(os.path.expanduser(hub)), Path(torch_home) / "hub" / "checkpoints")


@contextlib.contextmanager
def run_environment(cfg: ModelsConfig | None) -> Iterator[None]:
    """Export the cache folders (``models.cache_dir``) for one command; restore the environment afterwards."""
    names = ("HF_HUB_CACHE", "TORCH_HOME", "HF_HUB_OFFLINE")
    before = {n: os.environ.get(n) for n in names}
    consts = sys.modules.get("huggingface_hub.constants")
    before_consts = (consts.HF_HUB_CACHE, consts.HF_HUB_OFFLINE) if consts is not None else None
    _RUN_ENV.clear()
    try:
        if cfg is not None and cfg.cache_dir:
            model_cache(cfg)
        yield
    finally:
        for n, v in before.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v
        consts = sys.modules.get("huggingface_hub.constants")
        if consts is not None:
            if before_consts is not None:
                consts.HF_HUB_CACHE, consts.HF_HUB_OFFLINE = before_consts
            else:  # imported during the command: back to what the restored environment says
                consts.HF_HUB_OFFLINE = env_offline()
                consts.HF_HUB_CACHE = os.environ.get("HF_HUB_CACHE") or os.path.join(consts.HF_HOME, "hub")
        _RUN_ENV.clear()


def go_offline() -> None:
    """From here on, this process and its children read models from the cache only."""
    _export("HF_HUB_OFFLINE", "1")


# =========================================================================== layouts
@dataclass(frozen=True)
class Layout:
    """What a folder of one kind must hold, and which of its files a download takes."""

    describe: str
    required: tuple[str | tuple[str, ...], ...] = ()  # file names, or tuples of alternatives (any one)
    weights: tuple[str, ...] = ()  # weight-file name stems the loader reads ("model" -> model.safetensors, ...)
    small_files: bool = True  # also take the folder's configs, tokenizer files, code (not weights, not media)
    recursive: bool = False  # every file below (for `any`)


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer_config.json",
)

#: layout kind -> what it holds. ``pipeline`` is delegated to diffusers; ``one_of`` uses ``ModelRef.alternatives``.
LAYOUTS: dict[str, Layout] = {
    "transformers": Layout("transformers model", ("config.json",), weights=("model", "pytorch_model")),
    "tokenizer": Layout("tokenizer", (_TOKENIZER_FILES,)),
    "processor": Layout("processor", (("preprocessor_config.json", "processor_config.json"),)),
    "diffusers": Layout("diffusers model", ("config.json",), weights=("diffusion_pytorch_model",)),
    "scheduler": Layout("scheduler", ("scheduler_config.json",)),
    "open_clip": Layout(
        "open_clip model", ("open_clip_config.json",), weights=("open_clip_model", "open_clip_pytorch_model")
    ),
    "open_clip_weights": Layout(
        "open_clip weights", weights=("open_clip_model", "open_clip_pytorch_model"), small_files=False
    ),
    "one_of": Layout("weights file", small_files=False),
    "pipeline": Layout("diffusers pipeline", ("model_index.json",)),
    "any": Layout("model folder", recursive=True),
}


def _parts(ref: ModelRef) -> list[tuple[str, str]]:
    """(folder relative to the model root, layout kind) for each part of ``ref.layout``."""
    base = (ref.subfolder or "").strip("/")
    out = []
    for part in ref.layout:
        sub, _, kind = part.rpartition(":")
        if kind not in LAYOUTS:
            raise ValueError(f"{ref.setting}: unknown layout kind {kind!r} (known: {', '.join(LAYOUTS)})")
        out.append(("/".join(x for x in (base, sub.strip("/")) if x), kind))
    return out


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _is_weight(name: str) -> bool:
    return name.endswith(_WEIGHT_EXTS)


def _is_small_loader_file(name: str) -> bool:
    """Configs, tokenizer files, code: what a loader may read besides the weights (not docs, not media)."""
    return not _is_weight(name) and not name.endswith(_MEDIA_EXTS) and not _DOC_FILE.match(name)


def _weight_re(stems: tuple[str, ...]) -> re.Pattern:
    # The default, non-variant weights: stem.safetensors / stem.bin, or shards stem-00001-of-00002.*
    return re.compile(rf"^({'|'.join(map(re.escape, stems))})(-\d{{5}}-of-\d{{5}})?\.(safetensors|bin)$")


def _preferred_weights(names: Iterable[str], stems: tuple[str, ...]) -> list[str]:
    """The weight files a loader reads: safetensors when the folder has them, else .bin; no variants."""
    rx = _weight_re(stems)
    found = [n for n in names if rx.match(n)]
    safetensors = [n for n in found if n.endswith(".safetensors")]
    return sorted(safetensors or found)


class _View:
    """A folder's files: on disk, or a repository listing (no file contents)."""

    def __init__(self, root: Path | None = None, listing: Iterable[str] | None = None):
        self.root = root
        self.listing = sorted(listing) if listing is not None else None

    def names(self, folder: str) -> set[str] | None:
        """Files directly in ``folder`` (None: no such folder)."""
        if self.listing is not None:
            prefix = folder + "/" if folder else ""
            got = {p[len(prefix) :] for p in self.listing if p.startswith(prefix) and "/" not in p[len(prefix) :]}
            has_folder = not folder or any(p.startswith(prefix) for p in self.listing)
            return got if has_folder else None
        d = self.root / folder if folder else self.root
        if not d.is_dir():
            return None
        return {e.name for e in os.scandir(d) if e.is_file()}  # follows links: a dangling one is missing

    def all_files(self, folder: str) -> list[str]:
        if self.listing is not None:
            prefix = folder + "/" if folder else ""
            return [p for p in self.listing if p.startswith(prefix)]
        d = self.root / folder if folder else self.root
        return sorted(
            str(p.relative_to(self.root)).replace(os.sep, "/")
            for p in d.rglob("*")
            if p.is_file() and ".cache" not in p.relative_to(self.root).parts
        )

    def read_json(self, rel: str) -> dict | None:
        if self.root is None:
            return None
        try:
            return json.loads((self.root / rel).read_text())
        except (OSError, ValueError):
            return None


def _missing_weights(view: _View, folder: str, names: set[str], stems: tuple[str, ...]) -> list[str]:
    for stem in stems:
        for index in (f"{stem}.safetensors.index.json", f"{stem}.bin.index.json"):
            if index in names:
                doc = view.read_json(_join(folder, index))
                if doc is None:
                    continue
                shards = sorted(set((doc.get("weight_map") or {}).values()))
                return [_join(folder, s) for s in shards if s not in names]
    if _preferred_weights(names, stems):
        return []
    return [_join(folder, f"{stems[0]}.safetensors (or .bin) weights")]


def _missing_pipeline(view: _View, folder: str) -> list[str]:
    index = view.read_json(_join(folder, "model_index.json"))
    if index is None:
        return [] if view.root is None else [_join(folder, "model_index.json")]
    missing = []
    for comp, spec in index.items():
        if comp.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
            continue
        cls = str(spec[1])
        sub = _join(folder, comp)
        names = view.names(sub)
        if names is None:
            missing.append(sub + "/")
        elif cls.endswith("Scheduler") or "Scheduler" in cls:
            missing += [] if "scheduler_config.json" in names else [_join(sub, "scheduler_config.json")]
        elif "Tokenizer" in cls:
            missing += [] if any(n in names for n in _TOKENIZER_FILES) else [_join(sub, "tokenizer files")]
        elif "Processor" in cls or "FeatureExtractor" in cls:
            missing += [] if "preprocessor_config.json" in names else [_join(sub, "preprocessor_config.json")]
        else:
            stems = ("diffusion_pytorch_model",) if spec[0] == "diffusers" else ("model", "pytorch_model")
            missing += [] if "config.json" in names else [_join(sub, "config.json")]
            missing += _missing_weights(view, sub, names, stems)
    return missing


def missing_files(view: _View, ref: ModelRef) -> list[str]:
    """What ``ref``'s layout needs and the folder (or listing) lacks; [] when complete."""
    missing: list[str] = []
    for folder, kind in _parts(ref):
        lay = LAYOUTS[kind]
        names = view.names(folder)
        if names is None:
            missing.append(f"{folder or '.'}/ (no such folder)")
            continue
        for req in lay.required:
            alts = (req,) if isinstance(req, str) else req
            if not any(a in names for a in alts):
                missing.append(_join(folder, " or ".join(alts)))
        if lay.weights:
            missing += _missing_weights(view, folder, names, lay.weights)
        if kind == "one_of" and not any(a in names for a in ref.alternatives):
            missing.append(_join(folder, " or ".join(ref.alternatives)))
        if kind == "pipeline" and not missing:
            missing += _missing_pipeline(view, folder)
        if kind == "any" and not view.all_files(folder):
            missing.append(f"{folder or '.'}/ (empty)")
    return missing


def select_files(listing: Iterable[str], ref: ModelRef) -> list[str]:
    """The files of a repository listing that ``ref`` downloads (its loader's files, not the whole repo)."""
    paths = sorted(listing)
    view = _View(listing=paths)
    chosen: set[str] = set()
    for folder, kind in _parts(ref):
        lay = LAYOUTS[kind]
        if lay.recursive:
            chosen.update(view.all_files(folder))
            continue
        names = view.names(folder) or set()
        if kind == "one_of":  # the first alternative the repo has (open_clip tries them in this order)
            first = next((a for a in ref.alternatives if a in names), None)
            if first:
                chosen.add(_join(folder, first))
            continue
        if lay.small_files:
            chosen.update(_join(folder, n) for n in names if _is_small_loader_file(n))
        if lay.weights:
            chosen.update(_join(folder, n) for n in _preferred_weights(names, lay.weights))
    return sorted(chosen)


# =========================================================================== resolution
@dataclass
class Resolved:
    """Where a model was found (or put), and what it is."""

    ref: ModelRef
    path: str | None
    action: str  # local | cached | downloaded | not managed
    commit: str | None = None
    files: list[str] = field(default_factory=list)  # relative to the model root (Hub/url/file: what was checked)
    size: int = 0
    settings: list[str] = field(default_factory=list)  # every setting that names this model


def dedupe(refs: Iterable[ModelRef]) -> list[tuple[ModelRef, list[str]]]:
    """Each distinct model once, with every setting that names it."""
    seen: dict[tuple, tuple[ModelRef, list[str]]] = {}
    for r in refs:
        if r.key in seen:
            if r.setting not in seen[r.key][1]:
                seen[r.key][1].append(r.setting)
        else:
            seen[r.key] = (r, [r.setting])
    return list(seen.values())


def _hf_storage(cache: ModelCache, repo: str) -> Path:
    return cache.hub_dir / ("models--" + repo.replace("/", "--"))


def _hf_commit(storage: Path, revision: str | None) -> str | None:
    if revision and _SHA.match(revision):
        return revision
    ref_file = storage / "refs" / (revision or "main")
    try:
        return ref_file.read_text().strip() or None
    except OSError:
        return None


def _cached_tree(storage: Path, commit: str) -> dict | None:
    """The repository listing huggingface_hub cached at download time (sizes, LFS sha256, git blob ids)."""
    try:  # huggingface_hub writes trees/<commit>.json on every snapshot_download; read it with its own reader
        from huggingface_hub._tree_cache import read_tree_cache
    except ImportError:  # pragma: no cover - other huggingface_hub versions: verify against blob names only
        return None
    return read_tree_cache(str(storage), commit)


def _sizes(root: Path, files: list[str]) -> int:
    total = 0
    for f in files:
        with contextlib.suppress(OSError):
            total += (root / f).stat().st_size
    return total


def locate(ref: ModelRef, cache: ModelCache) -> Resolved:
    """Find ``ref`` on this machine without any network; raises ``_NotThere`` (internal) or ModelUnavailable."""
    return _LOCATORS[ref.kind](ref, cache)


def _locate_folder(ref: ModelRef, cache: ModelCache) -> Resolved:
    p = Path(os.path.expanduser(ref.source))
    if not p.exists():
        pathlike = ref.source.startswith(("/", ".", "~")) or ref.source.count("/") > 1
        raise ModelUnavailable(
            f"{ref.head()}: no such folder{'' if pathlike else ', and not a Hugging Face id (owner/name)'}. "
            f"Fix: point {ref.setting} at the model folder{'' if pathlike else ', or give its Hub id'}",
            setting=ref.setting,
        )
    if not p.is_dir():
        raise ModelUnavailable(
            f"{ref.head()}: is a file, expected a model folder. Fix: point it at the folder",
            setting=ref.setting,
        )
    missing = missing_files(_View(root=p), ref)
    if missing:
        raise ModelUnavailable(
            f"{ref.head()}: not a complete {_layout_name(ref)} folder: missing "
            f"{_list(missing)}. Fix: point {ref.setting} at the folder that holds them, or copy them in",
            setting=ref.setting,
        )
    files = [f for folder, _ in _parts(ref) for f in _View(root=p).all_files(folder)]
    return Resolved(ref, str(p), "local", files=files, size=_sizes(p, files))


def _locate_file(ref: ModelRef, cache: ModelCache) -> Resolved:
    if "://" in ref.source:
        try:
            import fsspec

            fs, path = fsspec.core.url_to_fs(ref.source)
            ok = fs.isfile(path)
            size = fs.size(path) if ok else 0
        except Exception as exc:  # noqa: BLE001 - missing filesystem package, credentials, network
            raise ModelUnavailable(
                f"{ref.head()}: cannot open it ({type(exc).__name__}: {_first_line(exc)}). "
                "Fix: check the URL and credentials, or copy the file to a local path",
                setting=ref.setting,
            ) from None
        if not ok:
            raise ModelUnavailable(f"{ref.head()}: no such file. Fix: check the path", ref.setting)
        return Resolved(ref, ref.source, "local", size=size)
    p = Path(os.path.expanduser(ref.source))
    if not p.exists():
        raise ModelUnavailable(
            f"{ref.head()}: no such file. Fix: point {ref.setting} at the weights file "
            "(or give its http(s) URL to download it)",
            setting=ref.setting,
        )
    if p.is_dir():
        raise ModelUnavailable(
            f"{ref.head()}: is a folder, expected a weights file. Fix: name the file itself",
            setting=ref.setting,
        )
    if p.stat().st_size == 0:
        raise ModelUnavailable(f"{ref.head()}: the file is empty. Fix: copy it again", ref.setting)
    return Resolved(ref, str(p), "local", files=[p.name], size=p.stat().st_size)


def url_destination(ref: ModelRef, cache: ModelCache) -> Path:
    """Where torch.hub.load_state_dict_from_url(url) keeps ``url``: its checkpoints folder + the URL's file name."""
    from urllib.parse import urlparse

    return cache.url_dir / os.path.basename(urlparse(ref.source).path)


def _sidecar(dest: Path) -> Path:
    return dest.with_name(dest.name + ".source.json")


def _locate_url(ref: ModelRef, cache: ModelCache) -> Resolved:
    dest = url_destination(ref, cache)
    if not dest.is_file():
        raise _NotThere(f"not downloaded into {dest.parent}")
    meta = _read_json(_sidecar(dest))
    if meta and meta.get("url") != ref.source:
        raise ModelUnavailable(
            f"{ref.head()}: {dest} already holds a download of {meta.get('url')} (torch.hub names "
            f"cached files by the URL's file name). Fix: download one of them yourself and set {ref.setting} to its path",
            setting=ref.setting,
        )
    return Resolved(ref, str(dest), "cached", files=[dest.name], size=dest.stat().st_size)


def _locate_hf(ref: ModelRef, cache: ModelCache) -> Resolved:
    storage = _hf_storage(cache, ref.source)
    commit = _hf_commit(storage, ref.revision)
    snapshot = storage / "snapshots" / commit if commit else None
    if snapshot is None or not snapshot.is_dir():
        raise _NotThere(f"not in the model cache {cache.hub_dir}")
    if any(kind == "pipeline" for _, kind in _parts(ref)):
        path = _pipeline_download(ref, cache, local_only=True)
        files = _View(root=Path(path)).all_files("")
        return Resolved(ref, path, "cached", commit, files, _sizes(Path(path), files))
    tree = _cached_tree(storage, commit)
    if tree is not None:
        files = select_files(tree, ref)
        absent = [f for f in files if not (snapshot / f).is_file()]
        if absent:
            raise _NotThere(f"incomplete in the model cache {cache.hub_dir}: missing {_list(absent)}")
    else:
        files = [f for folder, _ in _parts(ref) for f in _View(root=snapshot).all_files(folder)]
    missing = missing_files(_View(root=snapshot), ref)
    if missing:
        raise _NotThere(f"incomplete in the model cache {cache.hub_dir}: missing {_list(missing)}")
    path = snapshot / ref.subfolder if ref.subfolder else snapshot
    return Resolved(ref, str(path), "cached", commit, files, _sizes(snapshot, files))


def _locate_unmanaged(ref: ModelRef, cache: ModelCache) -> Resolved:
    return Resolved(ref, None, "not managed")


_LOCATORS = {
    "folder": _locate_folder,
    "file": _locate_file,
    "url": _locate_url,
    "hf": _locate_hf,
    "unmanaged": _locate_unmanaged,
}


def _list(items: list[str], n: int = 4) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def _layout_name(ref: ModelRef) -> str:
    return " + ".join(dict.fromkeys(LAYOUTS[k].describe for _, k in _parts(ref)))


def _read_json(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- downloads
def download(ref: ModelRef, cache: ModelCache) -> None:
    """Fetch ``ref`` into the cache (online); raises what the download raised."""
    if ref.kind == "hf":
        _download_hf(ref, cache)
    elif ref.kind == "url":
        download_url(ref.source, url_destination(ref, cache))
    else:  # pragma: no cover - callers only download remote kinds
        raise ValueError(f"nothing to download for a {ref.kind} model")


def _download_hf(ref: ModelRef, cache: ModelCache) -> None:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.hf_api import RepoFile

    api = HfApi()
    info = api.repo_info(ref.source, revision=ref.revision, timeout=HTTP_TIMEOUT)  # fails fast: 404, no network
    if any(kind == "pipeline" for _, kind in _parts(ref)):
        _pipeline_download(ref, cache, local_only=False)
        return
    listing = [
        f.path for f in api.list_repo_tree(ref.source, recursive=True, revision=info.sha) if isinstance(f, RepoFile)
    ]
    lacking = missing_files(_View(listing=listing), ref)
    if lacking:
        raise _RepoLacks(lacking, info.sha)
    files = select_files(listing, ref)
    if getattr(info, "gated", False) and files:  # one HEAD says whether this account may download, before any bar
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        get_hf_file_metadata(hf_hub_url(ref.source, files[0], revision=info.sha), timeout=HTTP_TIMEOUT)
    log.info("downloading %s (%d files) into %s", ref.describe(), len(files), cache.hub_dir)
    snapshot_download(
        ref.source,
        revision=ref.revision,
        cache_dir=str(cache.hub_dir),
        allow_patterns=[_glob_escape(f) for f in files],
        etag_timeout=HTTP_TIMEOUT,
    )


class _RepoLacks(Exception):
    def __init__(self, missing: list[str], commit: str):
        super().__init__(", ".join(missing))
        self.missing, self.commit = missing, commit


def _glob_escape(path: str) -> str:
    # allow_patterns are fnmatch patterns; an exact path must not be read as one.
    return re.sub(r"([\[\]*?])", r"[\1]", path)


def _pipeline_download(ref: ModelRef, cache: ModelCache, local_only: bool) -> str:
    """A diffusers pipeline: diffusers chooses its files (components, no unused variants), as from_pretrained does."""
    from diffusers import DiffusionPipeline

    try:
        return str(
            DiffusionPipeline.download(
                ref.source, revision=ref.revision, cache_dir=str(cache.hub_dir), local_files_only=local_only
            )
        )
    except (OSError, ValueError) as exc:
        if local_only:
            raise _NotThere(f"incomplete in the model cache {cache.hub_dir} ({_first_line(exc)})") from None
        raise


def download_url(url: str, dest: Path, timeout: float = HTTP_TIMEOUT, progress: bool = True) -> Path:
    """Download ``url`` to ``dest``: resumable, atomic, with a progress bar and a recorded sha256.

    Bytes go to ``dest.part``; a rerun after a kill asks for the rest (HTTP Range, with
    If-Range so a changed file starts over). The complete file is renamed into place and
    ``dest.source.json`` records the URL, size and sha256 (``models check`` verifies them).
    urllib is enough for one file and keeps this dependency-free; huggingface_hub's
    downloader only speaks to Hub endpoints.
    """
    import urllib.error
    import urllib.request

    from paradiffusion.stage import progress as bar

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    part_meta = dest.with_name(dest.name + ".part.json")
    meta = _read_json(part_meta) or {}
    offset = part.stat().st_size if part.is_file() and meta.get("url") == url else 0
    if offset == 0:
        part.unlink(missing_ok=True)
    headers = {"User-Agent": "paradiffusion-toolkit", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if meta.get("etag") or meta.get("last_modified"):
            headers["If-Range"] = meta.get("etag") or meta.get("last_modified")
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # nothing left to send: the part may already be complete
            total = _remote_size(url, timeout)
            if total == offset:
                return _finish_download(url, part, part_meta, dest, meta)
            part.unlink(missing_ok=True)
            part_meta.unlink(missing_ok=True)
            return download_url(url, dest, timeout, progress)
        raise
    with resp:
        if resp.status == 206 and offset:
            start = int(re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", "bytes 0-")).group(1))
            if start != offset:
                raise OSError(f"the server resumed at byte {start}, not {offset}")
            mode = "ab"
        else:
            offset, mode = 0, "wb"
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        meta = {"url": url, "etag": resp.headers.get("ETag"), "last_modified": resp.headers.get("Last-Modified")}
        part_meta.write_text(json.dumps(meta))
        if offset:
            log.info("resuming %s at %.1f MB", dest.name, offset / 1e6)
        with (
            open(part, mode) as out,
            bar(iter(()), total=total, desc=dest.name, unit="B", unit_scale=True, disable=not progress) as pbar,
        ):
            pbar.update(offset)
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                out.write(chunk)
                pbar.update(len(chunk))
    got = part.stat().st_size
    if total is not None and got != total:
        raise OSError(f"the connection closed after {got} of {total} bytes; rerun to resume")
    return _finish_download(url, part, part_meta, dest, meta)


def _remote_size(url: str, timeout: float) -> int | None:
    import urllib.request

    req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "paradiffusion-toolkit"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        n = r.headers.get("Content-Length")
        return int(n) if n is not None else None


def _finish_download(url: str, part: Path, part_meta: Path, dest: Path, meta: dict) -> Path:
    digest = sha256_file(part)
    os.replace(part, dest)
    record = {
        "url": url,
        "size": dest.stat().st_size,
        "sha256": digest,
        "etag": meta.get("etag"),
        "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp = _sidecar(dest).with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, _sidecar(dest))
    part_meta.unlink(missing_ok=True)
    return dest


def sha256_file(path: Path, pbar=None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            if pbar is not None:
                pbar.update(len(chunk))
    return h.hexdigest()


# --------------------------------------------------------------------------- the one line
def _chain(exc: BaseException) -> list[BaseException]:
    out, seen = [], set()
    while exc is not None and id(exc) not in seen:
        out.append(exc)
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return out


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def explain(exc: BaseException, ref: ModelRef, cache: ModelCache) -> str:
    """The one line for a failed download of ``ref``: setting, what was tried, the fix."""
    import urllib.error
    from urllib.parse import urlparse

    from huggingface_hub import errors as hf

    head = ref.head()
    local_fix = f"set {ref.setting} to a local copy"
    chain = _chain(exc)

    def find(*types):
        return next((e for e in chain if isinstance(e, types)), None)

    if isinstance(exc, _RepoLacks):
        return (
            f"{head}: the repository (commit {exc.commit[:12]}) has no {_list(exc.missing)}. "
            f"Fix: check the id{' and subfolder' if ref.subfolder else ''} in {ref.setting}, or {local_fix}"
        )
    status = ""
    if (e := find(hf.HfHubHTTPError)) is not None and getattr(e, "response", None) is not None:
        status = f"{e.response.status_code} {e.response.headers.get('X-Error-Code') or ''}".strip()
    page = f"{_endpoint()}/{ref.source}" if ref.kind == "hf" else ref.source
    if find(hf.GatedRepoError):
        return (
            f"{head}: a gated repository; downloading it needs an accepted licence and a token (the Hub answered "
            f"{status or 'GatedRepo'}). Fix: accept the licence on {page} with your account, then run `hf auth "
            f"login` or set HF_TOKEN; or {local_fix}"
        )
    if find(hf.RevisionNotFoundError):
        where = ref.revision_setting or f"the revision of {ref.setting}"
        return (
            f"{head}: {ref.source} has no revision {ref.revision!r} ({status or '404 RevisionNotFound'}). "
            f"Fix: check {where}: a branch, tag or commit SHA from {page} > Files and versions"
        )
    if find(hf.RepositoryNotFoundError):
        return (
            f"{head}: no model repository {ref.source} on {_endpoint()} ({status or '404 RepoNotFound'}; a private "
            f"repository also needs a token) and no local folder of that name. Fix: check the id in {ref.setting} "
            "(owner/name, as on the model page), or set it to a local folder"
        )
    if (e := find(hf.RemoteEntryNotFoundError)) is not None:
        return (
            f"{head}: a file it needs is not in the repository ({status or '404 EntryNotFound'}: "
            f"{_first_line(e, 120)}). Fix: check {ref.setting}"
            f"{' and its subfolder' if ref.subfolder else ''}, or {local_fix}"
        )
    if (e := find(urllib.error.HTTPError)) is not None:
        return (
            f"{head}: the server answered HTTP {e.code} {e.reason}. Fix: check the URL, or download the file "
            f"elsewhere and set {ref.setting} to its path"
        )
    offline = find(hf.OfflineModeIsEnabled)
    network = offline or find(*_network_errors())
    if network is not None:
        where = _endpoint() if ref.kind == "hf" else urlparse(ref.source).netloc
        what = "offline mode is on" if offline else f"{where} cannot be reached ({_first_line(network, 100)})"
        return (
            f"{head}: not in the model cache {cache.hub_dir if ref.kind == 'hf' else cache.url_dir} and {what}. "
            f"Fix: {local_fix}, or run `paradiffusion models fetch` on a machine with network and point "
            "models.cache_dir at the fetched folder"
        )
    if (e := find(hf.HfHubHTTPError)) is not None:
        return (
            f"{head}: the Hub answered {status or 'an error'} ({_first_line(e, 160)}). "
            "Fix: check the id and your access, or rerun later"
        )
    return f"{head}: download failed ({type(exc).__name__}: {_first_line(exc)}). Fix: rerun to resume, or {local_fix}"


def _network_errors() -> tuple[type[BaseException], ...]:
    import socket
    import urllib.error

    types: list[type[BaseException]] = [urllib.error.URLError, socket.timeout, ConnectionError, TimeoutError]
    for mod in ("httpx2", "httpx"):
        m = sys.modules.get(mod)
        if m is not None:
            types += [m.ConnectError, m.TimeoutException, m.NetworkError]
    return tuple(types)


def _offline_line(ref: ModelRef, cache: ModelCache, detail: str, why: str) -> str:
    head = ref.head()
    return (
        f"{head}: {detail}, and downloads are off ({why}). Fix: run `paradiffusion models fetch` where there is "
        f"network (same models.cache_dir), or set {ref.setting} to a local copy"
    )


# --------------------------------------------------------------------------- resolve
def resolve(
    refs: Iterable[ModelRef], cache: ModelCache, *, offline: bool, offline_reason: str = "HF_HUB_OFFLINE=1"
) -> list[Resolved]:
    """Find every model, downloading what is missing unless ``offline``; the first failure raises ModelUnavailable."""
    out: list[Resolved] = []
    queue = dedupe(refs)
    done: set[tuple] = set()
    while queue:
        ref, settings = queue.pop(0)
        done.add(ref.key)
        try:
            res = locate(ref, cache)
        except _NotThere as miss:
            if offline:
                raise ModelUnavailable(_offline_line(ref, cache, miss.detail, offline_reason), ref.setting) from None
            t0 = time.time()
            try:
                download(ref, cache)
                res = locate(ref, cache)
            except ModelUnavailable:
                raise
            except _NotThere as still:
                raise ModelUnavailable(
                    f"{ref.head()}: downloaded, but {still.detail}. Fix: rerun to resume",
                    ref.setting,
                ) from None
            except Exception as exc:  # noqa: BLE001 - every failure becomes its one line
                raise ModelUnavailable(explain(exc, ref, cache), ref.setting) from None
            res.action = "downloaded"
            log.info(
                "%s: downloaded %s (%s) in %.0f s", ref.setting, ref.describe(), human_size(res.size), time.time() - t0
            )
        res.settings = settings
        out.append(res)
        for extra in follow_ups(res):
            if extra.key not in done:
                queue.append((extra, [extra.setting]))
    return out


def follow_ups(res: Resolved) -> list[ModelRef]:
    """Models a resolved one names in its own files: the HF tokenizer of an open_clip hf-hub model."""
    if res.path is None or not any(k == "open_clip" for _, k in _parts(res.ref)) or res.ref.kind != "hf":
        return []
    cfg = _read_json(Path(res.path) / "open_clip_config.json") or {}
    tok = ((cfg.get("model_cfg") or {}).get("text_cfg") or {}).get("hf_tokenizer_name")
    if not tok:
        return []
    return [
        model_ref(
            res.ref.setting, tok, layout=("tokenizer",), note=f"the tokenizer of {res.ref.value or res.ref.source}"
        )
    ]


def resolve_for_run(cfg: ModelsConfig, refs: list[ModelRef]) -> list[Resolved]:
    """What ``paradiffusion <stage>`` does before the stage: resolve, then go offline for the run."""
    if not refs:
        return []
    t0 = time.time()
    cache = model_cache(cfg)
    offline = cfg.offline or env_offline()
    reason = "models.offline: true" if cfg.offline else "HF_HUB_OFFLINE=1"
    resolved = resolve(refs, cache, offline=offline, offline_reason=reason)
    for r in resolved:
        what = f" ({r.ref.note})" if r.ref.note and r.path else ""
        log.info("%s: %s %s%s", ", ".join(r.settings), r.action, r.path or r.ref.note, what)
    if all(r.ref.kind != "unmanaged" for r in resolved):
        go_offline()
    else:
        log.info("some models are fetched by their own packages: the run keeps Hub access")
    log.info("models resolved in %.1f s (cache %s)", time.time() - t0, cache)
    return resolved


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


__all__ = [
    "LAYOUTS",
    "ModelCache",
    "ModelRef",
    "ModelUnavailable",
    "Resolved",
    "dedupe",
    "download",
    "download_url",
    "env_offline",
    "explain",
    "go_offline",
    "locate",
    "missing_files",
    "model_cache",
    "model_ref",
    "open_clip_refs",
    "resolve",
    "resolve_for_run",
    "run_env",
    "run_environment",
    "select_files",
    "unmanaged",
    "weights_ref",
]
