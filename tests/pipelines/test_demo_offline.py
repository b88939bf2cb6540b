"""No code path of ours calls out of the machine unless the user asked for a download: the demo
(every stage, Ray workers, DeepSpeed, img2dataset, the eval server) runs with outbound connections
refused by a recording proxy and every Python process's sockets audited, and nothing tries."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from paradiffusion.offline import NO_PHONE_HOME
from paradiffusion.testing.netguard import RecordingProxy, guarded_env, local_hosts, read_log

REPO = Path(__file__).resolve().parents[2]

#: The one call we cannot switch off. Ray 2.60 starts a dashboard process with every ray.init (with
#: include_dashboard=False too, to run its UsageStatsHead module), and that module asks the cloud
#: instance-metadata endpoints which cloud it runs on before it looks at RAY_USAGE_STATS_ENABLED
#: (ray/dashboard/modules/usage_stats/usage_stats_head.py `run` -> usage_lib.get_cluster_config_to_report).
#: Link-local / in-cloud names, answered inside the host's own network, 1 s time-out each; never the internet.
RAY_CLOUD_PROBE = ("169.254.169.254", "metadata.google.internal")


def _clean_env() -> dict[str, str]:
    """This process's environment without the opt-outs, so the check sees what our code sets."""
    return {k: v for k, v in os.environ.items() if k not in NO_PHONE_HOME and not k.startswith(("AWS_", "FSSPEC_"))}


def test_the_guard_sees_a_library_that_calls_home(tmp_path):
    """The check can fail: albumentations' import-time version check, with its opt-out removed, is
    caught by the proxy; with our package imported first it does not happen."""
    with RecordingProxy() as proxy:
        env = guarded_env(tmp_path / "g1", proxy.url, base=_clean_env())
        r = subprocess.run([sys.executable, "-c", "import albumentations"], env=env, capture_output=True, timeout=300)
        assert r.returncode == 0
        assert any("pypi.org" in line for line in proxy.requests), proxy.requests

    with RecordingProxy() as proxy:
        env = guarded_env(tmp_path / "g2", proxy.url, base={**_clean_env(), "PYTHONPATH": str(REPO)})
        code = "import paradiffusion, albumentations, img2dataset"
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        starts, attempts = read_log(tmp_path / "g2", local_hosts())
        assert proxy.requests == [] and attempts == [] and len(starts) == 1


def test_the_audit_hook_sees_direct_sockets(tmp_path):
    """A library that ignores the proxy variables and opens its own socket is recorded too. The
    connect is not made (a test sends nothing off this machine): the process raises the audit events
    CPython raises for ``socket.connect`` / ``socket.getaddrinfo`` (PEP 578) with an outside address."""
    code = (
        "import socket, sys\n"
        "s = socket.socket()\n"
        "sys.audit('socket.getaddrinfo', 'pypi.org', 443, 0, 0, 0)\n"
        "sys.audit('socket.connect', s, ('203.0.113.7', 80))\n"
        "sys.audit('socket.connect', s, ('127.0.0.1', 80))\n"
    )
    with RecordingProxy() as proxy:
        env = guarded_env(tmp_path, proxy.url, base=_clean_env())
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
        assert r.returncode == 0, r.stderr
    _, attempts = read_log(tmp_path, local_hosts())
    assert len(attempts) == 2, attempts
    assert attempts[0].startswith("getaddrinfo") and "pypi.org" in attempts[0]
    assert attempts[1].startswith("connect") and "203.0.113.7" in attempts[1]


@pytest.mark.slow
def test_demo_makes_no_outbound_connection(tmp_path):
    scratch = Path(tempfile.mkdtemp(prefix="pd-net-", dir="/tmp"))
    with RecordingProxy() as proxy:
        env = guarded_env(tmp_path / "guard", proxy.url, base=_clean_env())
        env.update(PYTHONPATH=f"{tmp_path / 'guard'}{os.pathsep}{REPO}", TMPDIR=str(scratch), RAY_TMPDIR=str(scratch))
        cmd = [sys.executable, "-m", "paradiffusion", "demo", "--out", str(tmp_path / "demo")]
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=2400)
        assert r.returncode == 0, r.stderr[-5000:]
        requests = list(proxy.requests)
    starts, attempts = read_log(tmp_path / "guard", local_hosts())
    outside = [r for r in requests if not any(host in r for host in RAY_CLOUD_PROBE)]
    assert outside == [], outside
    assert attempts == [], attempts[:20]
    # the hook really ran in the demo's child processes (Ray workers, DeepSpeed, img2dataset), not just the driver
    assert len(starts) >= 5, starts
