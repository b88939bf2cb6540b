"""Config machinery: strict models, YAML loading, ``--set`` overrides, error messages.

The file (`pipelines.yaml`) has one section per stage. Each stage owns its section's
schema (a pydantic model in its own package, e.g. ``curation/config.py``, built on
:class:`StrictModel`); the composition layer (``pipelines/config.py``) puts them together
with the core sections defined here (:class:`ProjectConfig`, :class:`RayConfig`,
:class:`ModelsConfig`). This module knows no stage: :func:`load_config_model` loads into
whatever root model it is given, and stages type the composed config as
:class:`RootConfig`. Loading is strict: an unknown key, a wrong type or a value out of
range raises :class:`ConfigError`, whose message names the key, the bad value and what
is allowed.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_serializer, field_validator


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, assignment is validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ConfigError(ValueError):
    """A config file or override that does not validate; the message says how to fix it."""


# --------------------------------------------------------------------------- sections
#: URL schemes a table or data root may use (lower case, ``scheme://``); anything else is a plain path
STORAGE_SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "abfss", "file", "memory")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(/*)(.*)$")
_SCHEMELESS = re.compile(r"^(" + "|".join(STORAGE_SCHEMES) + r")/{1,2}", re.IGNORECASE)


def storage_url_problem(value: str) -> str | None:
    """Why ``value`` is not a usable table location (a mangled or unknown URL), or None when it is.

    A known scheme with ``://`` in lower case, or a plain path. ``s3:/b/x`` or ``s3//b/x``
    would otherwise become a local folder named ``s3:`` (fsspec reads anything else as a
    path), ``S3://`` is not the same protocol to fsspec, and ``s4://`` has no filesystem.
    """
    allowed = ", ".join(f"{s}://" for s in STORAGE_SCHEMES) + " or a plain path"
    v = str(value)
    m = _SCHEME.match(v)
    if m:
        scheme, slashes = m.group(1), m.group(2)
        if scheme.lower() in STORAGE_SCHEMES:
            if slashes != "//" and not (slashes == "///" and scheme.lower() in ("file", "memory")):
                return f"{v!r} looks like a mangled URL (use {scheme.lower()}://...; allowed: {allowed})"
            if scheme != scheme.lower():
                return f"{v!r}: URL schemes are lower case (use {scheme.lower()}://...; allowed: {allowed})"
            if not m.group(3).strip("/") and scheme.lower() != "memory":
                return f"{v!r} names no bucket or folder (allowed: {allowed})"
            return None
        if slashes:  # an unknown scheme://, or scheme:/
            return f"{v!r}: unknown URL scheme {scheme + ':' + slashes!r} (allowed: {allowed})"
        return None  # "name:thing" without a slash: a plain (odd) file name
    if _SCHEMELESS.match(v):
        return f"{v!r} looks like a mangled URL (a ':' is missing; allowed: {allowed})"
    return None


def check_storage_url(value: str) -> str:
    """``value`` when it is a usable table location, else ValueError saying why (for validators)."""
    problem = storage_url_problem(value)
    if problem:
        raise ValueError(problem)
    return value


class ProjectConfig(StrictModel):
    """Where the stage folders live by default."""

    data_root: str = Field(
        "data",
        description="Folder or URL under which each stage writes its table: a plain path or s3://, gs://, gcs://, "
        "az://, abfs://, abfss://, file://, memory:// (lower case)",
    )
    seed: int = Field(0, ge=0, description="Seed for everything that samples.")

    @field_validator("data_root")
    @classmethod
    def _data_root(cls, v: str) -> str:
        return check_storage_url(v)


class RayConfig(StrictModel):
    """How the Ray pipelines find their cluster.

    ``address`` null means: ``RAY_ADDRESS`` from the environment if set, else a local
    Ray started in-process. ``"local"`` always starts a local one; anything else
    (``host:port``, ``ray://host:10001``, ``auto``) joins that cluster.
    """

    address: str | None = None
    node_ip_address: str | None = Field(None, description="This client's IP as the cluster sees it (e.g. 127.0.0.1).")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray (default: all).")
    num_gpus: int | None = Field(None, ge=0, description="GPUs for a local Ray (default: all detected).")
    object_store_memory_gb: float | None = Field(None, gt=0)
    auth_mode: Literal["token"] | None = Field(
        None, description="Set RAY_AUTH_MODE for clusters started with token auth."
    )


class ModelsConfig(StrictModel):
    """Where the models every stage names are cached, and whether a run may download them.

    Before a stage starts, every model its config names is resolved in the driver
    (:mod:`paradiffusion.hub`): found in this cache or a local path, or downloaded
    into it, or the run stops with one line saying what to fix. The run itself then
    reads the cache with the Hub switched off (``HF_HUB_OFFLINE=1``), so Ray workers
    and DeepSpeed ranks never download.
    """

    cache_dir: str | None = Field(
        None,
        description="one folder for every model: Hugging Face files in <cache_dir>/hub, URL downloads in "
        "<cache_dir>/torch/hub/checkpoints. On a cluster, a folder every node mounts (shared file system, or object "
        "storage mounted with e.g. mountpoint-s3/gcsfuse). null: Hugging Face's own cache (HF_HUB_CACHE, HF_HOME) "
        "and torch's (TORCH_HOME)",
    )
    offline: bool = Field(
        False,
        description="never download: every model must already be in the cache or a local path "
        "(HF_HUB_OFFLINE=1 in the environment does the same)",
    )
    lock: str | None = Field(
        None,
        description="the models lock file (relative paths from the current folder, like every path here): "
        "`paradiffusion models fetch` writes the commit each Hugging Face model resolved to, and every run loads "
        "exactly those commits (a cache at another commit is refused). null: no lock, branches resolve to their "
        "newest cached commit",
    )

    @field_validator("cache_dir")
    @classmethod
    def _local_folder(cls, v: str | None) -> str | None:
        if v is not None and "://" in v:
            raise ValueError(
                "must be a folder on this machine's file system (loaders read model files from disk); for object "
                "storage, mount the bucket (e.g. mountpoint-s3, gcsfuse) and give the mount point"
            )
        return v


#: option names whose values are credentials (in ``storage.options``): never written out, hidden in logs
SECRET_OPTION_KEYS = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "client_secret",
        "account_key",
        "sas_token",
        "credentials",
        "connection_string",
    }
)


def mask_secret_options(value: Any) -> Any:
    """``value`` (nested dicts of storage options) with every credential replaced by ``**********``."""
    if isinstance(value, dict):
        return {k: "**********" if k in SECRET_OPTION_KEYS else mask_secret_options(v) for k, v in value.items()}
    return value


class StorageConfig(StrictModel):
    """How tables on object storage are reached (``project.data_root: s3://bucket/prefix``).

    Every setting is optional: null means what the environment says, the usual AWS
    variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
    ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``,
    ``AWS_PROFILE``) or, with none of them, botocore's own chain (instance roles, config
    files). What is resolved in the driver is handed to Ray workers, DataLoader processes
    and img2dataset explicitly (:mod:`paradiffusion.storage`), so cluster nodes need no
    copy of the driver's environment. Credentials are never written out: saved configs
    show ``**********`` and logs and error messages have them replaced.
    """

    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, Ceph, R2, a local test server), e.g. http://127.0.0.1:9000"
    )
    region: str | None = Field(None, description="S3 region name, e.g. us-east-1")
    profile: str | None = Field(None, description="a named profile of the AWS config files")
    key: SecretStr | None = Field(None, description="access key id (prefer AWS_ACCESS_KEY_ID in the environment)")
    secret: SecretStr | None = Field(
        None, description="secret access key (prefer AWS_SECRET_ACCESS_KEY in the environment)"
    )
    token: SecretStr | None = Field(None, description="session token (prefer AWS_SESSION_TOKEN in the environment)")
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="extra fsspec storage options by protocol, e.g. {s3: {default_block_size: 8388608}, gcs: {...}}",
    )

    @field_serializer("options")
    def _masked_options(self, v: dict) -> dict:
        return mask_secret_options(v)  # saved configs and `paradiffusion config` never show them

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL, e.g. http://127.0.0.1:9000")
        return v


class RootConfig(Protocol):
    """The composed config as the core and the stages see it (``pipelines.config.PipelinesConfig`` is one).

    The core sections are typed here; a stage reads its own section by name
    (``cfg.filter``, ``cfg.caption``), which this protocol lets through as ``Any``, so no
    stage's section type needs to be known below the composition layer.
    """

    project: ProjectConfig
    ray: RayConfig
    models: ModelsConfig
    storage: StorageConfig

    def model_dump(self, *, mode: str = "python", **kwargs: Any) -> dict[str, Any]: ...

    def __getattr__(self, name: str) -> Any: ...


M = TypeVar("M", bound=BaseModel)


# --------------------------------------------------------------------------- loading
def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as YAML (numbers, booleans, null, lists)."""
    from paradiffusion.log import redact

    if "=" not in item:
        raise ConfigError(f"--set {redact(item)!r}: expected KEY=VALUE, e.g. --set filter.thresholds.aesthetic_min=6")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {_shown(item)!r}: the key must be dotted section names, e.g. filter.batch_size")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _shown(item: str) -> str:
    """A ``--set`` item as an error may quote it: a credential's value hidden."""
    from paradiffusion.log import redact_argv

    return redact_argv([item])[0]


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"--set {_shown(item)!r}: {part!r} holds a value, not a section")
            node = nxt
        node[path[-1]] = value
    return data


def _unwrap(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation like ``Model | None`` or ``dict[str, Model]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType, list, dict, typing.Annotated):
        for arg in typing.get_args(annotation):
            found = _unwrap(arg)
            if found is not None:
                return found
    return None


def _model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] | None = root
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int) or part not in model.model_fields:
            continue  # list index, dict key or union tag
        model = _unwrap(model.model_fields[part].annotation)
    return model


def _describe_allowed(root: type[BaseModel], loc: tuple) -> str:
    parent = _model_at(root, loc[:-1])
    if parent is None:
        return ""
    field = parent.model_fields.get(str(loc[-1]))
    if field is None:
        return ""
    bits = []
    for meta in field.metadata:
        for name, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(meta, name, None) is not None:
                bits.append(f"{sym} {getattr(meta, name)}")
    ann = field.annotation
    args = typing.get_args(ann)
    if typing.get_origin(ann) is Literal:
        bits.append("one of " + ", ".join(repr(a) for a in args))
    elif any(typing.get_origin(a) is Literal for a in args):
        lits = [x for a in args if typing.get_origin(a) is Literal for x in typing.get_args(a)]
        bits.append("one of " + ", ".join(repr(a) for a in lits) + (" or null" if type(None) in args else ""))
    if field.description:
        bits.append(field.description)
    return "; ".join(bits)


_SECRET_FIELDS = {"key", "secret", "token", "password"}
#: a setting name that holds a credential (``storage.key``, ``secret_key``, ``sas_token``, ``password``, ...)
_SECRET_NAME = re.compile(r"(^|_)(key|secret|token|password|credentials?)($|_)|secret|token|password", re.IGNORECASE)


def _is_secret_loc(loc: tuple) -> bool:
    """Whether a config location holds a credential: the credential fields anywhere, and every
    secret-looking name in the ``storage`` section (including unknown keys like ``secret_key``)."""
    names = [str(p) for p in loc]
    if any(n in _SECRET_FIELDS for n in names):
        return True
    return bool(names) and names[0] == "storage" and any(_SECRET_NAME.search(n) for n in names[1:])


def register_config_secrets(data: Any, loc: tuple = ()) -> None:
    """Register for redaction every credential in raw config data (before it is validated, so a
    validation error, an unknown key or an echo can never print one): the values of the
    ``storage`` section's secret-looking settings, at any depth (``storage.options.s3.secret``)."""
    from paradiffusion.log import add_secret

    if isinstance(data, dict):
        for k, v in data.items():
            if not loc and k != "storage":
                continue
            register_config_secrets(v, (*loc, str(k)))
    elif isinstance(data, (list, tuple)):
        for v in data:
            register_config_secrets(v, loc)
    elif data is not None and _is_secret_loc(loc):
        add_secret(str(data))


def format_validation_error(exc: ValidationError, root: type[BaseModel], source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc)
        value = err.get("input")
        shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
        if _is_secret_loc(loc):
            shown = "***"  # a credential is never echoed, not even a malformed one
        if len(shown) > 80:
            shown = shown[:77] + "..."
        if err["type"] == "extra_forbidden":
            parent = _model_at(root, loc[:-1])
            allowed = ", ".join(parent.model_fields) if parent is not None else "?"
            lines.append(f"  - {key}: unknown key (value {shown}); allowed keys here: {allowed}")
            continue
        allowed = _describe_allowed(root, loc)
        msg = f"  - {key} = {shown}: {err['msg']}"
        if allowed:
            msg += f" (allowed: {allowed})"
        lines.append(msg)
    from paradiffusion.log import redact

    return redact("\n".join(lines))


#: settings that name a table or folder location (checked by :func:`storage_url_problem` at load time)
TABLE_LOCATION_KEYS = frozenset(
    {
        "data_root",
        "output",
        "input",
        "images",
        "scores",
        "captions",
        "latents",
        "text_cache",
        "init_from",
        "train_output",
        "export_dir",
        "staging_dir",
        "data_dir",
        "storage_path",
    }
)


def table_url_problems(data: Any, loc: tuple = ()) -> list[str]:
    """``key: why`` for every table location in ``data`` (a config dict) that is a mangled URL
    (``s3:/``, ``s3//``, ``S3://``) or names a scheme no fsspec filesystem has (``s4://``)."""
    import fsspec

    out = []
    if isinstance(data, dict):
        for k, v in data.items():
            out += table_url_problems(v, (*loc, str(k)))
    elif isinstance(data, str) and loc and loc[-1] in TABLE_LOCATION_KEYS:
        problem = storage_url_problem(data)
        m = _SCHEME.match(data)
        # an input may also be any other fsspec protocol (https://, hf://): only unknown ones are refused
        if problem and m and m.group(2) == "//" and m.group(1) in fsspec.available_protocols():
            problem = None
        if problem:
            out.append(f"{'.'.join(loc)}: {problem}")
    return out


def load_config_model(
    root: type[M],
    paths: list[str | os.PathLike] | str | os.PathLike | None = None,
    overrides: list[str] | None = None,
) -> M:
    """Load one or more YAML files (later ones override earlier ones), then ``--set`` overrides, into ``root``.

    ``paths`` None loads ``pipelines.yaml`` from the current folder when it exists and
    the defaults otherwise. ``root`` is the composed model (``pipelines.config.load_config``
    passes ``PipelinesConfig``).
    """
    if paths is None:
        paths = ["pipelines.yaml"] if Path("pipelines.yaml").exists() else []
    elif isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    data: dict = {}
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        data = _deep_merge(data, loaded)
    register_config_secrets(data)
    data = apply_overrides(data, overrides or [])
    register_config_secrets(data)  # before validation: no error below may print a credential
    from paradiffusion.log import redact_argv

    source = " + ".join(str(p) for p in paths) or "defaults"
    if overrides:
        source += " + --set " + " ".join(redact_argv(list(overrides)))
    try:
        model = root.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, root, source)) from None
    problems = table_url_problems(model.model_dump(mode="json"))
    if problems:
        raise ConfigError(f"invalid config ({source}):\n" + "\n".join(f"  - {p}" for p in problems))
    return model


def config_fingerprint(section: BaseModel | dict) -> str:
    data = section.model_dump(mode="json") if isinstance(section, BaseModel) else section
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def resolved_config_document(cfg: BaseModel | dict, stage: str) -> dict:
    """What is saved beside an output: the whole resolved config (a model or its dict) plus how it was run."""
    from paradiffusion import __version__
    from paradiffusion.hub.lock import run_models
    from paradiffusion.log import redact_argv

    return {
        "stage": stage,
        "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(redact_argv(sys.argv)),
        "paradiffusion_version": __version__,
        "config": cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else copy.deepcopy(cfg),
        "models": run_models(),
    }
