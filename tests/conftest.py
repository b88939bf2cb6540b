import os

# Tests never touch a hub: everything they load is built from configs on disk.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
