"""Where models live: the cache folders (models.cache_dir or the libraries' own) and offline mode for the run."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from paradiffusion.config import ModelsConfig


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
    """The variables the model resolution exported: HF_HUB_CACHE, TORCH_HOME, HF_HUB_OFFLINE,
    PARADIFFUSION_MODEL_COMMITS (the commit each Hub model resolved to)."""
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
    names = ("HF_HUB_CACHE", "TORCH_HOME", "HF_HUB_OFFLINE", "PARADIFFUSION_MODEL_COMMITS")
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
