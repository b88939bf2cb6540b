"""Record every attempt to reach another machine, in this process and every Python process it starts.

:func:`guarded_env` returns environment variables for a child process:

- a ``sitecustomize`` on ``PYTHONPATH`` that installs an audit hook (PEP 578) in every Python
  process that inherits the environment (Ray workers, DeepSpeed ranks, img2dataset's processes,
  subprocesses of those): it writes one line per process start and one per ``socket.getaddrinfo``
  of a host name or ``socket.connect`` to an address that is not loopback;
- ``HTTP_PROXY`` / ``HTTPS_PROXY`` pointing at :class:`RecordingProxy`, a proxy on 127.0.0.1 that
  records what it was asked for and refuses it (403), with this machine's own addresses in ``NO_PROXY``.

So a library that honours the proxy variables is caught by the proxy, and one that opens its own
sockets is caught by the audit hook; a process that never started Python (a browser) is not covered.
"""

from __future__ import annotations

import os
import socketserver
import threading
from pathlib import Path

_SITECUSTOMIZE = r"""
import os, sys
_LOG = os.environ.get("PD_NETGUARD_LOG")

def _pd_netguard_install():
    import socket, traceback
    loopback = ("127.", "::1", "localhost", "0.0.0.0", "::")

    def write(line):
        try:
            with open(_LOG, "a") as fh:
                fh.write(line + "\n")
        except OSError:
            pass

    write("start %d %s" % (os.getpid(), " ".join(sys.argv[:3])[:200]))

    def where():
        frames = [f for f in traceback.extract_stack()[:-2] if "netguard" not in f.filename]
        return " <- ".join("%s:%d" % (os.path.basename(f.filename), f.lineno) for f in frames[-6:])

    def hook(event, args):
        try:
            if event == "socket.getaddrinfo":
                host = args[0]
                if isinstance(host, bytes):
                    host = host.decode(errors="replace")
                if host and isinstance(host, str) and not host.startswith(loopback):
                    write("getaddrinfo %d %s %s | %s" % (os.getpid(), host, args[1], where()))
            elif event == "socket.connect":
                addr = args[1]
                if isinstance(addr, tuple) and addr and isinstance(addr[0], str) and not addr[0].startswith(loopback):
                    write("connect %d %s %s | %s" % (os.getpid(), addr[0], addr[1] if len(addr) > 1 else "", where()))
        except Exception:
            pass

    sys.addaudithook(hook)

if _LOG:
    _pd_netguard_install()
"""


#: The one call we cannot switch off. Ray 2.60 starts a dashboard process with every ray.init (with
#: include_dashboard=False too, to run its UsageStatsHead module), and that module asks the cloud
#: instance-metadata endpoints which cloud it runs on before it looks at RAY_USAGE_STATS_ENABLED
#: (ray/dashboard/modules/usage_stats/usage_stats_head.py `run` -> usage_lib.get_cluster_config_to_report).
#: Link-local / in-cloud names, answered inside the host's own network, 1 s time-out each; never the internet.
RAY_CLOUD_PROBE = ("169.254.169.254", "metadata.google.internal")


class RecordingProxy:
    """An HTTP proxy on 127.0.0.1 that answers every request 403 and keeps its request line."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                line = self.rfile.readline(2048).decode("latin-1").strip()
                if line:
                    outer.requests.append(line)
                self.wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> RecordingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def guarded_env(folder: Path, proxy_url: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment whose Python processes log network attempts to ``folder/net.log``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), env.get("PYTHONPATH", "")) if p)
    env["PD_NETGUARD_LOG"] = str(folder / "net.log")
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env[k] = proxy_url
    # this machine's own names and addresses are not outside: Ray's processes talk gRPC over the node's
    # address, and gRPC honours the proxy variables
    env["NO_PROXY"] = env["no_proxy"] = ",".join(["127.0.0.1", "localhost", "::1", *sorted(local_hosts())])
    return env


def read_log(folder: Path, local_hosts: set[str] = frozenset()) -> tuple[list[str], list[str]]:
    """``(process start lines, attempts)`` from the log; attempts to ``local_hosts`` (this machine's own
    names and addresses, which Ray uses between its processes) are not counted."""
    path = folder / "net.log"
    lines = path.read_text().splitlines() if path.exists() else []
    starts = [ln for ln in lines if ln.startswith("start ")]
    attempts = []
    for ln in lines:
        if ln.startswith(("getaddrinfo ", "connect ")):
            host = ln.split(" ", 3)[2]
            if host not in local_hosts:
                attempts.append(ln)
    return starts, attempts


def local_hosts() -> set[str]:
    """This machine's host names and interface addresses."""
    import socket

    names = {socket.gethostname(), socket.getfqdn()}
    try:
        import psutil

        for addrs in psutil.net_if_addrs().values():
            names.update(a.address.split("%")[0] for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6))
    except ImportError:
        pass
    try:
        names.update(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    return names
