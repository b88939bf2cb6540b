"""An HTTP proxy on 127.0.0.1 that can be told to fail, for tests of storage failures mid-run.

It stands between a client (s3fs) and a real server (moto's S3 server) and, per request,
either forwards it or fails it the way a store does:

* ``forward``: the request goes to the server and its answer back, unchanged;
* ``refuse``:  the proxy stops listening (new connections are refused by the kernel) and
  drops the connections it holds, as an endpoint that went away;
* ``403`` / ``503``: every request is answered ``403 AccessDenied`` / ``503 SlowDown``
  (S3's XML error body), as a revoked key or a store throttling beyond the client's retries.

:meth:`FaultyProxy.fail_after` switches to a failing mode by itself once a given number of
requests matching a pattern (e.g. commit markers: ``/_done/``) have been answered, so a
stage fails at a known point mid-run; :meth:`FaultyProxy.set_mode` switches by hand (back
to ``forward`` for the rerun). Hand-written rather than a proxy package: it needs to fail
on a count of committed shards, which none of them does, and it is ~150 lines of the
standard library.
"""

from __future__ import annotations

import http.client
import http.server
import re
import socket
import threading

MODES = ("forward", "refuse", "403", "503")

_ERRORS = {
    "403": (403, "AccessDenied", "Access Denied"),
    "503": (503, "SlowDown", "Please reduce your request rate."),
}
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


class FaultyProxy:
    """``FaultyProxy(upstream_url)``: ``.endpoint_url`` to point a client at; ``.mode``; ``.requests``
    (``(method, path, status)`` answered or failed so far). Stop it with :meth:`stop` or ``with``."""

    def __init__(self, upstream_url: str):
        m = re.fullmatch(r"http://([^:/]+):(\d+)/?", upstream_url)
        if not m:
            raise ValueError(f"upstream must be http://host:port, got {upstream_url!r}")
        self.upstream = (m.group(1), int(m.group(2)))
        self.mode = "forward"
        self.requests: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()
        self._trigger: tuple[re.Pattern, int, str] | None = None
        self._matched = 0
        self._server: http.server.ThreadingHTTPServer | None = None
        self._conns: set[socket.socket] = set()
        self._closing: threading.Thread | None = None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._listen()

    # -- control
    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        with self._lock:
            self._trigger = None
            self._switch(mode)

    def fail_after(self, n: int, pattern: str, mode: str) -> None:
        """Forward until ``n`` requests whose ``METHOD path`` matches ``pattern`` have been answered
        by the server, then switch to ``mode`` (for good, until :meth:`set_mode`)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        with self._lock:
            self._switch("forward")
            self._trigger, self._matched = (re.compile(pattern), n, mode), 0

    def count(self, pattern: str, status: int | None = None) -> int:
        rx = re.compile(pattern)
        with self._lock:
            return sum(1 for m, p, s in self.requests if rx.search(f"{m} {p}") and (status is None or s == status))

    def _switch(self, mode: str) -> None:  # under the lock
        if mode == self.mode:
            return
        if mode == "refuse":
            self._close_listener()
            for c in list(self._conns):  # the held keep-alive connections go too
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        elif self.mode == "refuse":
            self._listen()
        self.mode = mode

    # -- serving
    def _listen(self) -> None:
        if self._closing is not None:  # the previous listener must be gone before the port is bound again
            self._closing.join(30)
            self._closing = None
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                with proxy._lock:
                    proxy._conns.add(self.connection)

            def finish(self):
                with proxy._lock:
                    proxy._conns.discard(self.connection)
                super().finish()

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _handle(self):
                body = self._body()
                with proxy._lock:
                    mode = proxy.mode
                if mode == "refuse":  # a connection accepted just before the switch: drop it unanswered
                    self.close_connection = True
                    with proxy._lock:
                        proxy.requests.append((self.command, self.path, 0))
                    return
                if mode in _ERRORS:
                    self._fail(*_ERRORS[mode])
                    return
                status = self._forward(body)
                with proxy._lock:
                    proxy.requests.append((self.command, self.path, status))
                    trig = proxy._trigger
                    if trig and status < 300 and trig[0].search(f"{self.command} {self.path}"):
                        proxy._matched += 1
                        if proxy._matched >= trig[1]:
                            proxy._trigger = None
                            proxy._switch(trig[2])

            def _forward(self, body: bytes) -> int:
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                    if body or self.command in ("PUT", "POST"):
                        headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response_only(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in _HOP and not (k.lower() == "content-length" and self.command != "HEAD"):
                            self.send_header(k, v)
                    if self.command != "HEAD":
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                    return resp.status
                finally:
                    conn.close()

            def _fail(self, status: int, code: str, message: str) -> None:
                xml = (
                    f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                    f"<Message>{message}</Message><Resource>{self.path}</Resource></Error>"
                ).encode()
                self.send_response_only(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(xml)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(xml)
                with proxy._lock:
                    proxy.requests.append((self.command, self.path, status))

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

            def log_message(self, *a):
                pass

        class Server(http.server.ThreadingHTTPServer):
            allow_reuse_address = True
            daemon_threads = True

        self._server = Server(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _close_listener(self) -> None:
        srv, self._server = self._server, None
        if srv is not None:
            # shutdown() waits for serve_forever's loop; run it off the handler thread that may call this
            self._closing = threading.Thread(target=lambda: (srv.shutdown(), srv.server_close()), daemon=True)
            self._closing.start()

    def stop(self) -> None:
        with self._lock:
            self._trigger = None
            srv, self._server = self._server, None
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if srv is not None:
            srv.shutdown()
            srv.server_close()

    def __enter__(self) -> FaultyProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
