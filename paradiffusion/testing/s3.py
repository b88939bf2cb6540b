"""A real S3 API server on 127.0.0.1 for tests, benchmarks and `paradiffusion demo --s3`.

moto's standalone server (``moto[server]``, the one s3fs's own test suite runs) in a
process of its own: buckets live in its memory and vanish when it stops. Its access
log (one line per request) is kept, so a test or benchmark can count the requests a
run made (:meth:`S3Server.request_counts`).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator

# moto accepts any credentials; these are obviously fake ones
TEST_KEY = "paradiffusion-test-key"
TEST_SECRET = "paradiffusion-test-secret"
_ACCESS = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP/[0-9.]+" (\d{3})')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's S3 server in a subprocess on 127.0.0.1 (a free port); stop it with :meth:`stop` or ``with``."""

    def __init__(self, port: int | None = None, log_path: str | None = None, start_timeout_s: float = 60.0):
        self.port = port or _free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or os.path.join(tempfile.mkdtemp(prefix="pd-moto-"), "access.log")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_"))}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        deadline = time.monotonic() + start_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not answer within {start_timeout_s:.0f}s") from None
                time.sleep(0.2)

    def env(self, key: str = TEST_KEY, secret: str = TEST_SECRET) -> dict[str, str]:
        """The AWS variables a client needs for this server (endpoint, region, credentials)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def storage_options(self, key: str = TEST_KEY, secret: str = TEST_SECRET) -> dict:
        """s3fs storage options for this server."""
        return {"endpoint_url": self.endpoint_url, "key": key, "secret": secret, "use_listings_cache": False}

    def make_bucket(self, name: str) -> str:
        """Create a bucket; returns ``s3://<name>``."""
        import s3fs

        fs = s3fs.S3FileSystem(**self.storage_options(), skip_instance_cache=True)
        fs.mkdir(name)
        return f"s3://{name}"

    def request_counts(self) -> Counter:
        """Requests served so far, by method (``GET``, ``PUT``, ...), from the access log."""
        self._log.flush()
        counts: Counter = Counter()
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                m = _ACCESS.search(line)
                if m and not m.group(2).startswith("/moto-api"):
                    counts[m.group(1)] += 1
        return counts

    def stop(self) -> None:
        """Stop the server process this object started."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        with contextlib.suppress(Exception):
            self._log.close()

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def s3_server(**kwargs) -> Iterator[S3Server]:
    """``with s3_server() as srv:`` a moto S3 server for the block."""
    srv = S3Server(**kwargs)
    try:
        yield srv
    finally:
        srv.stop()
