"""A stand-in for the Hugging Face Hub on 127.0.0.1, for tests without network.

``FakeHub`` serves model repositories from local folders through the endpoints
huggingface_hub calls (set ``HF_ENDPOINT`` to :attr:`FakeHub.endpoint`):

- ``GET /api/models/<repo>[/revision/<rev>]``: repository info (``sha``, ``siblings``);
- ``GET /api/models/<repo>/tree/<rev>[/<path>]``: the file listing with sizes, git blob
  ids and LFS sha256 (every file over 1 KB is served as an LFS file);
- ``HEAD|GET /<repo>/resolve/<rev>/<file>``: the file, with ``X-Repo-Commit``,
  ``ETag`` / ``X-Linked-Etag`` / ``X-Linked-Size`` and HTTP Range support;

and answers the failures the way the Hub does, with the ``X-Error-Code`` header that
``huggingface_hub.utils.hf_raise_for_status`` maps to its error classes: an unknown
repository 401 ``RepoNotFound``, an unknown revision 404 ``RevisionNotFound``, a missing
file 404 ``EntryNotFound``, and a gated repository's files 401 ``GatedRepo`` (its info
and listing stay public, as on the Hub). ``/files/<name>`` serves plain files (the
aesthetic head's URL) with Range support and an optional throttle, so a test can kill a
download half-way and see it resume. Every request is logged in :attr:`FakeHub.requests`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

LFS_MIN_BYTES = 1024


@dataclass
class _File:
    path: Path
    size: int
    sha256: str
    git_sha1: str

    @property
    def lfs(self) -> bool:
        return self.size > LFS_MIN_BYTES


@dataclass
class _Repo:
    files: dict[str, _File]  # at the newest commit
    commit: str
    branches: dict[str, str]
    gated: bool = False
    history: dict[str, dict[str, _File]] = field(default_factory=dict)  # every commit -> its files


@dataclass
class FakeHub:
    """The server; use as a context manager. ``add_repo`` / ``add_file`` before or while it runs."""

    repos: dict[str, _Repo] = field(default_factory=dict)
    plain: dict[str, Path] = field(default_factory=dict)
    requests: list[tuple[str, str, dict]] = field(default_factory=list)
    throttle_bytes_per_s: float | None = None  # /files/ only

    def add_repo(self, repo_id: str, folder: str | Path, gated: bool = False) -> str:
        """Serve ``folder`` as model repo ``repo_id`` (branch ``main``); returns its commit sha.

        Adding a repo again with another folder is a new commit: ``main`` moves to it and the
        earlier commits stay downloadable by their sha (keep their folders unchanged).
        """
        files = {}
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                data = p.read_bytes()
                rel = p.relative_to(folder).as_posix()
                git = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
                files[rel] = _File(p, len(data), hashlib.sha256(data).hexdigest(), git)
        commit = hashlib.sha1(json.dumps(sorted((k, f.git_sha1) for k, f in files.items())).encode()).hexdigest()
        history = dict(self.repos[repo_id].history) if repo_id in self.repos else {}
        history[commit] = files
        self.repos[repo_id] = _Repo(files, commit, {"main": commit}, gated, history)
        return commit

    def add_file(self, name: str, path: str | Path) -> str:
        """Serve ``path`` at ``/files/<name>``; returns its URL."""
        self.plain[name] = Path(path)
        return f"{self.endpoint}/files/{name}"

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


_API = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?/?$")
_TREE = re.compile(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


class _Handler(BaseHTTPRequestHandler):
    server_hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch(body=True)

    # ------------------------------------------------------------------ routing
    def _dispatch(self, body: bool) -> None:
        hub = self.server_hub
        path = unquote(urlparse(self.path).path)
        hub.requests.append((self.command, path, dict(self.headers)))
        if path.startswith("/files/"):
            f = hub.plain.get(path.removeprefix("/files/"))
            if f is None:
                return self._error(404, None, "Not Found")
            return self._send_file(f, {}, body, throttle=hub.throttle_bytes_per_s)
        if m := _TREE.match(path):
            repo, commit = self._repo_at(m.group(1), m.group(2))
            if repo is None:
                return
            prefix = (m.group(3) or "").strip("/")
            entries = [
                {
                    "type": "file",
                    "path": rel,
                    "size": f.size,
                    "oid": f.git_sha1,
                    **({"lfs": {"oid": f.sha256, "size": f.size, "pointerSize": 134}} if f.lfs else {}),
                }
                for rel, f in repo.history.get(commit, repo.files).items()
                if not prefix or rel.startswith(prefix + "/")
            ]
            return self._json(entries, body)
        if m := _API.match(path):
            repo, commit = self._repo_at(m.group(1), m.group(2) or "main")
            if repo is None:
                return
            info = {
                "id": m.group(1),
                "sha": commit,
                "private": False,
                "gated": "manual" if repo.gated else False,
                "siblings": [{"rfilename": rel} for rel in repo.history.get(commit, repo.files)],
            }
            return self._json(info, body)
        if m := _RESOLVE.match(path):
            repo, commit = self._repo_at(m.group(1), m.group(2))
            if repo is None:
                return
            if repo.gated:
                return self._error(
                    401,
                    "GatedRepo",
                    f"Access to model {m.group(1)} is restricted. You must have access to it and be authenticated.",
                )
            f = repo.history.get(commit, repo.files).get(m.group(3))
            if f is None:
                return self._error(404, "EntryNotFound", f"{m.group(3)} does not exist", {"X-Repo-Commit": commit})
            headers = {"X-Repo-Commit": commit}
            if f.lfs:
                headers.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)})
            headers["ETag"] = f'"{f.sha256 if f.lfs else f.git_sha1}"'
            return self._send_file(f.path, headers, body)
        return self._error(404, None, "Not Found")

    def _repo_at(self, repo_id: str, revision: str) -> tuple[_Repo | None, str]:
        repo = self.server_hub.repos.get(repo_id)
        if repo is None:  # the Hub answers 401 for a repo it does not show you (missing or private)
            self._error(401, "RepoNotFound", "Repository not found")
            return None, ""
        commit = repo.branches.get(revision) or (revision if revision in (repo.commit, *repo.history) else None)
        if commit is None:
            self._error(404, "RevisionNotFound", "Invalid rev id: " + revision)
            return None, ""
        return repo, commit

    # ------------------------------------------------------------------ answers
    def _error(self, status: int, code: str | None, message: str, extra: dict | None = None) -> None:
        payload = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _json(self, obj, body: bool) -> None:
        payload = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def _send_file(self, path: Path, headers: dict, body: bool, throttle: float | None = None) -> None:
        data = path.read_bytes()
        etag = headers.get("ETag") or f'"{hashlib.sha256(data).hexdigest()}"'
        start, status = 0, 200
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if rng and (not if_range or if_range == etag):
            m = re.match(r"bytes=(\d+)-", rng)
            start = int(m.group(1)) if m else 0
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        chunk = data[start:]
        self.send_response(status)
        for k, v in {**headers, "ETag": etag}.items():
            self.send_header(k, v)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(chunk)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if not body:
            return
        try:
            step = 64 * 1024
            for i in range(0, len(chunk), step):
                self.wfile.write(chunk[i : i + step])
                if throttle:
                    time.sleep(step / throttle)
        except (BrokenPipeError, ConnectionResetError):  # the client was killed mid-download: the point of a test
            pass
