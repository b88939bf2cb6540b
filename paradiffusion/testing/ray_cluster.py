"""A real two-node Ray cluster on this machine, for cluster tests (``@pytest.mark.cluster``).

:class:`LocalRayCluster` starts a head and a worker with the ``ray`` CLI, as an
operator would on two machines, but both on 127.0.0.1, with token auth and a temp
folder of their own so they never touch another Ray on the same machine. Teardown
does not use ``ray stop`` (which stops every Ray of the user on the machine): each
``ray start`` runs in a new process session, and teardown kills exactly the
processes of those sessions (plus any process whose command line names this
cluster's temp folder), then checks that none is left.

The pytest fixture ``ray_cluster`` (tests/conftest.py) wraps it; a client joins with
``ray.init(address=cluster.address, _node_ip_address="127.0.0.1")`` and
``RAY_AUTH_MODE=token`` in its environment, or through the pipelines config:
``cluster.ray_overrides()`` gives the ``--set`` lines (``ray.address``,
``ray.node_ip_address``, ``ray.auth_mode``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

NODE_IP = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((NODE_IP, 0))
        return s.getsockname()[1]


class LocalRayCluster:
    """A head plus ``n_workers`` worker nodes started with ``ray start`` on 127.0.0.1."""

    def __init__(self, n_workers: int = 1, cpus_per_node: int = 1, temp_dir: str | None = None):
        self.n_workers = n_workers
        self.cpus_per_node = cpus_per_node
        # Unix socket paths must stay short: keep the temp folder near the root.
        self.temp_dir = temp_dir or tempfile.mkdtemp(prefix="rayc-", dir="/tmp")
        self.port = free_port()
        self.address = f"{NODE_IP}:{self.port}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        self._sessions: list[int] = []  # session ids (= pid of each `ray start`)
        self._ray = str(Path(sys.executable).with_name("ray"))

    # -- lifecycle
    def _ray_cli(self, *args: str, timeout: float = 120) -> None:
        proc = subprocess.Popen(
            [self._ray, *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._sessions.append(proc.pid)
        out, _ = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"`ray {' '.join(args)}` failed ({proc.returncode}):\n{out[-3000:]}")

    def start(self) -> LocalRayCluster:
        if not (Path.home() / ".ray" / "auth_token").is_file():
            subprocess.run([self._ray, "get-auth-token", "--generate"], env=self.env, check=True, capture_output=True)
        common = [
            "--node-ip-address",
            NODE_IP,
            "--num-cpus",
            str(self.cpus_per_node),
            "--num-gpus",
            "0",
            "--disable-usage-stats",
        ]
        try:
            self._ray_cli(
                "start",
                "--head",
                f"--port={self.port}",
                "--include-dashboard=false",
                f"--temp-dir={self.temp_dir}",
                *common,
            )
            for _ in range(self.n_workers):
                self._ray_cli("start", f"--address={self.address}", *common)
            self.wait_for_nodes(1 + self.n_workers)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_for_nodes(self, n: int, timeout: float = 60) -> None:
        """Wait until ``n`` nodes are alive (checked from a separate client process)."""
        code = (
            "import ray, sys; ray.init(address=sys.argv[1], _node_ip_address='127.0.0.1', log_to_driver=False); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))"
        )
        deadline = time.time() + timeout
        alive = 0
        while time.time() < deadline:
            r = subprocess.run(
                [sys.executable, "-c", code, self.address], env=self.env, capture_output=True, text=True, timeout=120
            )
            lines = r.stdout.strip().splitlines()
            alive = int(lines[-1]) if r.returncode == 0 and lines and lines[-1].isdigit() else 0
            if alive >= n:
                return
            time.sleep(1)
        raise RuntimeError(f"Ray cluster at {self.address}: {alive} of {n} nodes alive after {timeout:.0f} s")

    def processes(self) -> list[psutil.Process]:
        """The processes of this cluster: in one of its sessions, or naming its temp folder."""
        found = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if p.pid == os.getpid():
                    continue
                if os.getsid(p.pid) in self._sessions or self.temp_dir in " ".join(p.info["cmdline"] or []):
                    found.append(p)
            except (psutil.Error, ProcessLookupError, PermissionError):
                continue
        return found

    def stop(self, timeout: float = 15) -> None:
        """Kill this cluster's processes (never `ray stop`) and check none is left."""
        procs = self.processes()
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
        left = [p.pid for p in self.processes()]
        if left:
            raise RuntimeError(f"Ray cluster processes still running after teardown: {left}")
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    # -- for clients
    def ray_overrides(self) -> list[str]:
        """``--set`` lines that point the pipelines config at this cluster."""
        return [f"ray.address={self.address}", f"ray.node_ip_address={NODE_IP}", "ray.auth_mode=token"]

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
