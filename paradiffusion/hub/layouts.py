"""What a complete copy of a model holds (LAYOUTS) and which files of a repository a download takes."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from paradiffusion.hub.refs import _DOC_FILE, _MEDIA_EXTS, _WEIGHT_EXTS, ModelRef


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
