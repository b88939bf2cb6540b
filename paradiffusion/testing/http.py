"""A local HTTP server on 127.0.0.1 for download tests and the demo.

Serves a folder, plus special paths that behave like the bad parts of the web:
``/missing/...`` answers 404, ``/slow/<seconds>/...`` waits before answering,
``/html/...`` answers an HTML page with ``Content-Type: text/html``, and
``/error/...`` answers 500.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        path = self.path
        if path.startswith("/missing/"):
            self.send_error(404, "Not Found")
            return
        if path.startswith("/error/"):
            self.send_error(500, "Internal Server Error")
            return
        if path.startswith("/html/"):
            body = b"<!doctype html><html><body>not an image</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if path.startswith("/slow/"):
            _, _, secs, rest = path.split("/", 3)
            time.sleep(float(secs))
            self.path = "/" + rest
        super().do_GET()


class _Server(ThreadingHTTPServer):
    # The default listen backlog (5) drops connections when a downloader opens dozens
    # at once; the client then waits for a SYN retry and reports a spurious timeout.
    request_queue_size = 128
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # A client that gave up (the point of /slow/) leaves a broken pipe: no traceback.
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


@contextlib.contextmanager
def serve_folder(folder: str) -> Iterator[str]:
    """Serve ``folder`` on 127.0.0.1 at a free port; yields the base URL."""
    handler = functools.partial(_Handler, directory=str(folder))
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
