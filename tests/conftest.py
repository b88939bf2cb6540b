import os
import sys

# Tests never touch a hub: everything they load is built from configs on disk.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# img2dataset imports wandb, and wandb's console_capture patches the write() of whatever objects
# sys.stdout / sys.stderr are at that moment, for good ("it does not work with some combinations of
# pytest's capfd / capsys fixtures", wandb/sdk/lib/console_capture.py). Under pytest those are capture
# streams that pytest closes (a later write through the patch: "I/O operation on closed file", and a
# test session that dies). Imported here with the interpreter's own streams in place, it patches those,
# which live as long as the process, and leaves pytest's alone.
_streams = sys.stdout, sys.stderr
sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
try:
    import wandb.sdk.lib.console_capture  # noqa: F401
except ImportError:
    pass
finally:
    sys.stdout, sys.stderr = _streams


# --------------------------------------------------------------------------- ray_cluster
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster():
    """A real Ray cluster on this machine: a head and one worker node (1 CPU each), started
    with `ray start`, token auth, its own temp folder. Yields a
    :class:`paradiffusion.testing.ray_cluster.LocalRayCluster` (``.address``, ``.env``,
    ``.ray_overrides()``). Torn down by killing its own processes, never `ray stop`.
    Use it only in tests marked ``@pytest.mark.cluster``."""
    from paradiffusion.testing.ray_cluster import LocalRayCluster

    with LocalRayCluster(n_workers=1, cpus_per_node=1) as cluster:
        yield cluster


# --------------------------------------------------------------------------- S3 (moto's server on 127.0.0.1)
@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server in a process of its own on 127.0.0.1, for the session.
    Yields a :class:`paradiffusion.testing.s3.S3Server` (``.endpoint_url``, ``.env()``,
    ``.make_bucket(name)``, ``.request_counts()``)."""
    pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[dev]')")
    pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[dev]')")
    from paradiffusion.testing.s3 import S3Server

    with S3Server() as srv:
        yield srv


@pytest.fixture(autouse=True)
def _process_storage_settings():
    """Each test starts with this process's storage settings as the session began and leaves them so:
    a CLI call in-process applies the `storage` settings to the whole process (fsspec's defaults,
    ``FSSPEC_*`` variables handed to children, secrets for redaction), which must not reach the
    next test (a Ray cluster started later would inherit them)."""
    import copy

    import fsspec

    from paradiffusion import log as pd_log
    from paradiffusion import storage

    conf, configured = copy.deepcopy(fsspec.config.conf), copy.deepcopy(storage._CONFIGURED)
    secrets = set(pd_log._SECRETS)
    env = {k: v for k, v in os.environ.items() if k.startswith("FSSPEC_")}
    yield
    for k in [k for k in os.environ if k.startswith("FSSPEC_")]:
        del os.environ[k]
    os.environ.update(env)
    fsspec.config.conf.clear()
    fsspec.config.conf.update(conf)
    storage._CONFIGURED.clear()
    storage._CONFIGURED.update(configured)
    pd_log._SECRETS.clear()
    pd_log._SECRETS.update(secrets)


@pytest.fixture
def s3_root(s3_server, monkeypatch):
    """A fresh bucket ``s3://t-<random>`` on the test server, with this process's storage
    settings pointing at it (through the AWS variables, as a user sets them); restored after
    the test (by ``_process_storage_settings``)."""
    import uuid

    from paradiffusion import storage

    url = s3_server.make_bucket(f"t-{uuid.uuid4().hex[:12]}")
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    storage.configure_storage(None)
    return url
