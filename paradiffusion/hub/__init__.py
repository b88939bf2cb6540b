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

The package, along its seams: :mod:`.refs` (what a setting names, the one-line error),
:mod:`.cache` (cache folders, offline mode), :mod:`.layouts` (what a complete copy holds),
:mod:`.locate` (find or download one model), :mod:`.resolve` (a command's models, the one
line for a failure) and :mod:`.lock` (``models.lock``: the commit each Hub model is held at).
"""

from paradiffusion.hub.cache import ModelCache, env_offline, go_offline, model_cache, run_env, run_environment
from paradiffusion.hub.layouts import LAYOUTS, Layout, _parts, _View, missing_files, select_files
from paradiffusion.hub.locate import (
    LockMismatch,
    Resolved,
    _cached_tree,
    _hf_storage,
    _read_json,
    _sidecar,
    dedupe,
    download,
    download_url,
    locate,
    sha256_file,
    url_destination,
)
from paradiffusion.hub.lock import ModelsLock, movable, pin, resolved_commit, run_models
from paradiffusion.hub.refs import (
    _HEX64,
    _SHA,
    HTTP_TIMEOUT,
    ModelRef,
    ModelUnavailable,
    _first_line,
    _NotThere,
    looks_local,
    model_ref,
    open_clip_refs,
    unmanaged,
    weights_ref,
)
from paradiffusion.hub.resolve import explain, follow_ups, human_size, resolve, resolve_for_run

__all__ = [
    "HTTP_TIMEOUT",
    "LAYOUTS",
    "LockMismatch",
    "ModelsLock",
    "Layout",
    "ModelCache",
    "ModelRef",
    "ModelUnavailable",
    "Resolved",
    "_HEX64",
    "_NotThere",
    "_SHA",
    "_View",
    "_cached_tree",
    "_first_line",
    "_hf_storage",
    "_parts",
    "_read_json",
    "_sidecar",
    "dedupe",
    "download",
    "download_url",
    "env_offline",
    "explain",
    "follow_ups",
    "go_offline",
    "human_size",
    "locate",
    "looks_local",
    "missing_files",
    "movable",
    "pin",
    "model_cache",
    "model_ref",
    "open_clip_refs",
    "resolve",
    "resolve_for_run",
    "resolved_commit",
    "run_models",
    "run_env",
    "run_environment",
    "select_files",
    "sha256_file",
    "unmanaged",
    "url_destination",
    "weights_ref",
]
