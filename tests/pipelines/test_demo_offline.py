"""The recorder of outbound connections (paradiffusion/testing/netguard.py) and the opt-outs that keep
our imports silent. The demo itself runs under the recorder in tests/pipelines/test_demo_s3.py
(every stage, Ray workers, DeepSpeed, img2dataset, the eval server): nothing tries to leave."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from paradiffusion.offline import NO_PHONE_HOME
from paradiffusion.testing.netguard import RecordingProxy, guarded_env, local_hosts, read_log

REPO = Path(__file__).resolve().parents[2]


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
