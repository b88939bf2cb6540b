"""Start or join Ray the same way in every pipeline.

Local Ray by default; a cluster when ``ray.address`` in the config or the
``RAY_ADDRESS`` environment variable names one (the config wins).
"""

from __future__ import annotations

import os

from paradiffusion.config import RayConfig
from paradiffusion.deps import require
from paradiffusion.log import get_logger

log = get_logger("ray")


def resolve_address(cfg: RayConfig) -> str | None:
    """The cluster address to join, or None for a local Ray."""
    address = cfg.address if cfg.address is not None else os.environ.get("RAY_ADDRESS")
    if address in (None, "", "local"):
        return None
    return address


def _storage_setup_hook(options: dict):
    """A function every Ray worker of this job runs when it starts, on any node: this run's storage
    settings (endpoint, region, credentials), so img2dataset's own Ray tasks and any reader reach
    the tables too. Ray keeps it pickled in the cluster's internal store, not in the job's
    environment variables that its dashboard lists."""

    def apply_storage_settings() -> None:
        from paradiffusion.storage import apply_storage_options

        apply_storage_options(options)

    return apply_storage_settings


def init_ray(cfg: RayConfig, extra: str | None = None) -> str:
    """Initialise Ray once per process; returns a description of where it runs.

    ``extra`` names the project extra that brings Ray for the caller (e.g. ``"curation"``):
    the install hint when Ray is missing.
    """
    ray = require("ray", "ray[data]", extra=extra)
    if cfg.auth_mode:
        os.environ["RAY_AUTH_MODE"] = cfg.auth_mode
    address = resolve_address(cfg)
    if ray.is_initialized():
        res = ray.cluster_resources()
        return (
            f"Ray already initialised in this process ({len(ray.nodes())} node(s), {res.get('CPU', 0):g} CPU, "
            f"{res.get('GPU', 0):g} GPU)"
        )
    kwargs: dict = {"ignore_reinit_error": True, "log_to_driver": True}
    from paradiffusion.storage import worker_storage_options

    storage = worker_storage_options()
    if storage:  # workers on other nodes do not share this process's environment
        kwargs["runtime_env"] = {"worker_process_setup_hook": _storage_setup_hook(storage)}
    if cfg.node_ip_address:
        kwargs["_node_ip_address"] = cfg.node_ip_address
    if address is None:
        os.environ.pop("RAY_ADDRESS", None)  # "local" must not be overridden by the environment
        kwargs.update(include_dashboard=False, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
        if cfg.object_store_memory_gb:
            kwargs["object_store_memory"] = int(cfg.object_store_memory_gb * 2**30)
        ray.init(**kwargs)
        where = "local Ray"
    else:
        from paradiffusion.hub import run_env
        from paradiffusion.offline import NO_PHONE_HOME

        env = run_env()  # the model cache and offline mode this run resolved (a cluster's workers get them here)
        # and the libraries' opt-outs of calls home (this process has them; nodes started elsewhere may not)
        env = {**{k: os.environ.get(k, v) for k, v in NO_PHONE_HOME.items()}, **env}
        if env:
            kwargs["runtime_env"] = {**kwargs.get("runtime_env", {}), "env_vars": env}
        ray.init(address=address, **kwargs)
        where = f"Ray cluster at {address}"
    res = ray.cluster_resources()
    where += f" ({len(ray.nodes())} node(s), {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU)"
    log.info("using %s", where)
    return where
