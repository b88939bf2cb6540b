"""A stand-in for the Hugging Face Hub on 127.0.0.1, for tests without network.

``FakeHub`` serves model and dataset repositories through the endpoints huggingface_hub
calls (set ``HF_ENDPOINT`` to :attr:`FakeHub.endpoint`). Downloads:

- ``GET /api/{models,datasets}/<repo>[/revision/<rev>]``: repository info (``sha``, ``siblings``,
  ``private``);
- ``GET /api/{models,datasets}/<repo>/tree/<rev>[/<path>]``: the file listing with sizes, git blob
  ids and LFS sha256 (a file added with :meth:`FakeHub.add_repo` is an LFS file when it is over
  1 KB; an uploaded one is what its commit said);
- ``HEAD|GET /[datasets/]<repo>/resolve/<rev>/<file>``: the file, with ``X-Repo-Commit``,
  ``ETag`` / ``X-Linked-Etag`` / ``X-Linked-Size`` and HTTP Range support;

and answers the failures the way the Hub does, with the ``X-Error-Code`` header that
``huggingface_hub.utils.hf_raise_for_status`` maps to its error classes: an unknown (or, without
the token, private) repository 401 ``RepoNotFound``, an unknown revision 404 ``RevisionNotFound``,
a missing file 404 ``EntryNotFound``, and a gated repository's files 401 ``GatedRepo`` (its info
and listing stay public, as on the Hub). ``/files/<name>`` serves plain files (the aesthetic
head's URL) with Range support and an optional throttle, so a test can kill a download half-way
and see it resume. Every request is logged in :attr:`FakeHub.requests`.

Uploads, the requests of huggingface_hub's ``create_repo`` and ``upload_folder`` /
``create_commit`` over git LFS:

- ``POST /api/repos/create`` (``name``, ``organization``, ``type``, ``visibility``): a model or
  dataset repository whose first commit holds a ``.gitattributes`` (a part of the Hub's default
  one); 409 with the repository's ``url`` when it exists, as the Hub answers;
- ``POST /api/validate-yaml``: the card's YAML header must parse (400 with ``errors`` otherwise);
- ``POST /api/{models,datasets}/<repo>/preupload/<rev>``: each file's ``uploadMode``: ``lfs`` when
  its path matches a ``filter=lfs`` line of the repository's ``.gitattributes``, its sample holds
  a NUL byte or it is 10 MB or more, else ``regular``; and the ``oid`` of the file already there
  (sha256 for LFS, git blob sha1 otherwise), so the client drops unchanged files;
- ``POST /[datasets/]<repo>.git/info/lfs/objects/batch``: the git LFS batch API, ``basic``
  transfer only: each object not yet stored gets an ``upload`` action (a ``PUT`` to
  ``/lfs-storage/...``, which, like the Hub's presigned storage URLs, takes no token and checks
  the bytes against the oid and size) and a ``verify`` action (``POST
  .../info/lfs/objects/verify``);
- ``POST /api/{models,datasets}/<repo>/commit/<rev>``: the NDJSON commit (``header`` with
  ``parentCommit``, ``file`` base64, ``lfsFile`` naming an uploaded object, ``deletedFile``,
  ``deletedFolder``); a new commit on the branch, the files readable through the download
  endpoints above. Each commit is logged in ``_Repo.log``.

The stand-in is a plain git LFS server and never offers Xet: no ``X-Xet-*`` headers on downloads,
the batch answer's ``transfer`` is ``basic``, and there is no Xet token endpoint (404). Xet is not
negotiated on uploads, though: huggingface_hub 2.x uploads every LFS file through Xet whenever
``hf_xet`` is installed, and only ``HF_HUB_DISABLE_XET=1`` (read when huggingface_hub is
imported: ``huggingface_hub.constants.HF_HUB_DISABLE_XET``) makes it use the LFS batch API, so a
test that uploads here sets it.

The write endpoints (create, preupload, batch, verify, commit) need ``Authorization: Bearer
<FakeHub.token>``; without it, or with another token, they answer 401 with the Hub's
``X-Error-Message: Invalid credentials in Authorization header``. With ``token=None`` (the
default) nothing can be written.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import shutil
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

LFS_MIN_BYTES = 1024  # add_repo's files: over this, served as LFS files
LFS_LARGE_BYTES = 10 * 1024 * 1024  # uploads: the Hub stores a file this large in LFS whatever its name
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"

# A part of the Hub's default .gitattributes for a new repository.
GITATTRIBUTES = "".join(
    f"{p} filter=lfs diff=lfs merge=lfs -text\n"
    for p in (
        "*.7z *.arrow *.bin *.bz2 *.ckpt *.gz *.h5 *.lfs.* *.lz4 *.msgpack *.npy *.npz *.onnx *.parquet "
        "*.pickle *.pkl *.pt *.pth *.rar *.safetensors *.tar.* *.tar *.tgz *.xz *.zip *.zst "
        "*.png *.jpg *.jpeg *.webp *.gif *.mp3 *.wav *.mp4"
    ).split()
).encode()


@dataclass
class _File:
    path: Path
    size: int
    sha256: str
    git_sha1: str
    is_lfs: bool | None = None  # None: by size (add_repo)

    @property
    def lfs(self) -> bool:
        return self.size > LFS_MIN_BYTES if self.is_lfs is None else self.is_lfs


@dataclass
class _Repo:
    files: dict[str, _File]  # at the newest commit
    commit: str
    branches: dict[str, str]
    gated: bool = False
    history: dict[str, dict[str, _File]] = field(default_factory=dict)  # every commit -> its files
    private: bool = False
    lfs_objects: set[str] = field(default_factory=set)  # sha256 of the LFS objects uploaded and verified
    log: list[dict] = field(default_factory=list)  # every commit made through the API: summary, paths


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeHub:
    """The server; use as a context manager. ``add_repo`` / ``add_file`` before or while it runs."""

    repos: dict[str, _Repo] = field(default_factory=dict)  # model repositories
    datasets: dict[str, _Repo] = field(default_factory=dict)  # dataset repositories
    plain: dict[str, Path] = field(default_factory=dict)
    requests: list[tuple[str, str, dict]] = field(default_factory=list)
    throttle_bytes_per_s: float | None = None  # /files/ only
    token: str | None = None  # the Bearer token the write endpoints take (None: none)
    user: str = "test-user"  # the token's user: the namespace of a repo created without one
    errors: list[str] = field(default_factory=list)  # tracebacks of requests the stand-in failed on (500)

    def add_repo(self, repo_id: str, folder: str | Path, gated: bool = False, repo_type: str = "model") -> str:
        """Serve ``folder`` as repo ``repo_id`` (branch ``main``); returns its commit sha.

        Adding a repo again with another folder is a new commit: ``main`` moves to it and the
        earlier commits stay downloadable by their sha (keep their folders unchanged).
        """
        files = {}
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                data = p.read_bytes()
                rel = p.relative_to(folder).as_posix()
                files[rel] = _File(p, len(data), hashlib.sha256(data).hexdigest(), _git_sha1(data))
        commit = hashlib.sha1(json.dumps(sorted((k, f.git_sha1) for k, f in files.items())).encode()).hexdigest()
        table = self._table(repo_type)
        history = dict(table[repo_id].history) if repo_id in table else {}
        history[commit] = files
        table[repo_id] = _Repo(files, commit, {"main": commit}, gated, history)
        return commit

    def add_file(self, name: str, path: str | Path) -> str:
        """Serve ``path`` at ``/files/<name>``; returns its URL."""
        self.plain[name] = Path(path)
        return f"{self.endpoint}/files/{name}"

    def files(self, repo_id: str, repo_type: str = "dataset", revision: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``revision`` (a branch or a commit), path -> bytes."""
        repo = self._table(repo_type)[repo_id]
        commit = repo.branches.get(revision, revision)
        return {rel: f.path.read_bytes() for rel, f in repo.history[commit].items()}

    def _table(self, repo_type: str) -> dict[str, _Repo]:
        if repo_type not in ("model", "dataset"):
            raise ValueError(f"repo_type {repo_type!r}: the stand-in serves model and dataset repositories")
        return self.repos if repo_type == "model" else self.datasets

    def _store(self, data: bytes) -> Path:
        """The bytes in the stand-in's blob folder, named by their sha256."""
        p = self._blobs / hashlib.sha256(data).hexdigest()
        if not p.exists():
            tmp = p.with_suffix(f".{threading.get_ident()}")
            tmp.write_bytes(data)
            tmp.replace(p)
        return p

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._blobs = Path(tempfile.mkdtemp(prefix="fake-hub-"))
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        shutil.rmtree(self._blobs, ignore_errors=True)


_KIND = {"models": "model", "datasets": "dataset"}
_API = re.compile(r"^/api/(models|datasets)/([^/]+/[^/]+)(?:/revision/([^/]+))?/?$")
_TREE = re.compile(r"^/api/(models|datasets)/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?$")
_RESOLVE = re.compile(r"^/(?:(datasets)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_PREUPLOAD = re.compile(r"^/api/(models|datasets)/([^/]+/[^/]+)/preupload/([^/]+)$")
_COMMIT = re.compile(r"^/api/(models|datasets)/([^/]+/[^/]+)/commit/([^/]+)$")
_LFS = re.compile(r"^/(?:(datasets)/)?([^/]+/[^/]+)\.git/info/lfs/objects/(batch|verify)$")
_STORAGE = re.compile(r"^/lfs-storage/(models|datasets)/([^/]+/[^/]+)/([0-9a-f]{64})$")


class _Handler(BaseHTTPRequestHandler):
    server_hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:  # noqa: N802
        self._guarded(self._dispatch, body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._guarded(self._dispatch, body=True)

    def do_POST(self) -> None:  # noqa: N802
        self._guarded(self._write)

    def do_PUT(self) -> None:  # noqa: N802
        self._guarded(self._write)

    def _guarded(self, fn, **kw) -> None:
        try:
            fn(**kw)
        except Exception:  # a stand-in bug: a 500 the test sees, with the traceback in hub.errors
            self.server_hub.errors.append(traceback.format_exc())
            self._error(500, None, "Internal error of the stand-in")

    # ------------------------------------------------------------------ downloads
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
            repo, commit = self._repo_at(_KIND[m.group(1)], m.group(2), m.group(3))
            if repo is None:
                return
            prefix = (m.group(4) or "").strip("/")
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
            repo, commit = self._repo_at(_KIND[m.group(1)], m.group(2), m.group(3) or "main")
            if repo is None:
                return
            info = {
                "id": m.group(2),
                "sha": commit,
                "private": repo.private,
                "gated": "manual" if repo.gated else False,
                "siblings": [{"rfilename": rel} for rel in repo.history.get(commit, repo.files)],
            }
            return self._json(info, body)
        if m := _RESOLVE.match(path):
            repo_id = m.group(2)
            repo, commit = self._repo_at("dataset" if m.group(1) else "model", repo_id, m.group(3))
            if repo is None:
                return
            if repo.gated:
                return self._error(
                    401,
                    "GatedRepo",
                    f"Access to model {repo_id} is restricted. You must have access to it and be authenticated.",
                )
            f = repo.history.get(commit, repo.files).get(m.group(4))
            if f is None:
                return self._error(404, "EntryNotFound", f"{m.group(4)} does not exist", {"X-Repo-Commit": commit})
            headers = {"X-Repo-Commit": commit}
            if f.lfs:
                headers.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)})
            headers["ETag"] = f'"{f.sha256 if f.lfs else f.git_sha1}"'
            return self._send_file(f.path, headers, body)
        return self._error(404, None, "Not Found")

    def _repo_at(self, kind: str, repo_id: str, revision: str) -> tuple[_Repo | None, str]:
        repo = self.server_hub._table(kind).get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            # the Hub answers 401 for a repo it does not show you (missing or private)
            self._error(401, "RepoNotFound", "Repository not found")
            return None, ""
        commit = repo.branches.get(revision) or (revision if revision in (repo.commit, *repo.history) else None)
        if commit is None:
            self._error(404, "RevisionNotFound", "Invalid rev id: " + revision)
            return None, ""
        return repo, commit

    # ------------------------------------------------------------------ uploads
    def _write(self) -> None:
        hub = self.server_hub
        url = urlparse(self.path)
        path = unquote(url.path)
        hub.requests.append((self.command, path, dict(self.headers)))
        data = self._read_body()  # always, so the connection stays in step whatever the answer
        if self.command == "PUT":
            if m := _STORAGE.match(path):  # a presigned storage URL: no token
                return self._lfs_put(_KIND[m.group(1)], m.group(2), m.group(3), data)
            return self._error(404, None, "Not Found")
        if path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(data))
        routes = [
            (re.compile(r"^/api/repos/create$"), self._create),
            (_PREUPLOAD, self._preupload),
            (_COMMIT, self._commit),
            (_LFS, self._lfs),
        ]
        for pattern, handler in routes:
            if m := pattern.match(path):
                if not self._authorized():
                    return self._error(401, None, INVALID_CREDENTIALS)
                return handler(m, data, parse_qs(url.query))
        return self._error(404, None, "Not Found")

    def _authorized(self) -> bool:
        token = self.server_hub.token
        return token is not None and self.headers.get("Authorization") == f"Bearer {token}"

    def _create(self, m, data: bytes, query: dict) -> None:
        hub = self.server_hub
        req = json.loads(data)
        kind = req.get("type") or "model"
        if kind not in ("model", "dataset"):
            return self._error(400, None, f"The stand-in creates model and dataset repositories, not {kind}")
        repo_id = f"{req.get('organization') or hub.user}/{req['name']}"
        url = f"{hub.endpoint}/{'datasets/' if kind == 'dataset' else ''}{repo_id}"
        with hub._lock:
            table = hub._table(kind)
            if repo_id in table:
                return self._error(409, None, f"You already created this {kind} repo", body={"url": url})
            repo = _Repo({}, "", {}, private=req.get("visibility", "public") == "private")
            table[repo_id] = repo
            self._new_commit(repo, {".gitattributes": (GITATTRIBUTES, False)}, [], "initial commit", "")
        self._json({"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]}, True)

    def _validate_yaml(self, req: dict) -> None:
        import yaml

        text = req.get("content", "")
        head = re.match(r"^---\n(.*?)\n---\n", text, re.S)
        try:
            meta = yaml.safe_load(head.group(1)) if head else {}
        except yaml.YAMLError as exc:
            return self._error(400, None, "Invalid metadata", body={"errors": [{"message": str(exc)}]})
        if meta is not None and not isinstance(meta, dict):
            return self._error(400, None, "Invalid metadata", body={"errors": [{"message": "not a mapping"}]})
        self._json({"errors": [], "warnings": []}, True)

    def _preupload(self, m, data: bytes, query: dict) -> None:
        if query.get("create_pr"):
            return self._error(400, None, "The stand-in does not open pull requests")
        repo, commit = self._repo_at(_KIND[m.group(1)], m.group(2), m.group(3))
        if repo is None:
            return
        files = repo.history[commit]
        attributes = files[".gitattributes"].path.read_text() if ".gitattributes" in files else ""
        answer = []
        for f in json.loads(data)["files"]:
            lfs = _lfs_path(attributes, f["path"]) or b"\0" in base64.b64decode(f["sample"])
            lfs = lfs or f["size"] >= LFS_LARGE_BYTES
            there = files.get(f["path"])
            oid = None if there is None else (there.sha256 if there.lfs else there.git_sha1)
            answer.append(
                {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        self._json({"files": answer, "commitOid": commit}, True)

    def _lfs(self, m, data: bytes, query: dict) -> None:
        hub = self.server_hub
        kind, repo_id = "dataset" if m.group(1) else "model", m.group(2)
        repo = hub._table(kind).get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        req = json.loads(data)
        if m.group(3) == "verify":
            if req.get("oid") not in repo.lfs_objects or (hub._blobs / req["oid"]).stat().st_size != req.get("size"):
                return self._error(404, None, f"Object {req['oid']} not found")
            return self._json({}, True)
        if req.get("operation") != "upload" or "basic" not in req.get("transfers", ["basic"]):
            return self._error(400, None, "The stand-in takes uploads over the basic transfer only")
        prefix = "datasets/" if kind == "dataset" else ""
        objects = []
        for o in req["objects"]:
            entry = {"oid": o["oid"], "size": o["size"], "authenticated": True}
            if o["oid"] not in repo.lfs_objects:
                entry["actions"] = {
                    "upload": {"href": f"{hub.endpoint}/lfs-storage/{kind}s/{repo_id}/{o['oid']}"},
                    "verify": {"href": f"{hub.endpoint}/{prefix}{repo_id}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        self._json({"transfer": "basic", "objects": objects}, True, "application/vnd.git-lfs+json")

    def _lfs_put(self, kind: str, repo_id: str, oid: str, data: bytes) -> None:
        hub = self.server_hub
        repo = hub._table(kind).get(repo_id)
        if repo is None:
            return self._error(404, None, "Not Found")
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, None, "The uploaded bytes do not match the object's sha256")
        hub._store(data)
        with hub._lock:
            repo.lfs_objects.add(oid)
        self._json({}, True)

    def _commit(self, m, data: bytes, query: dict) -> None:
        hub = self.server_hub
        if query.get("create_pr"):
            return self._error(400, None, "The stand-in does not open pull requests")
        kind, repo_id, revision = _KIND[m.group(1)], m.group(2), m.group(3)
        lines = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header" or not lines[0]["value"].get("summary"):
            return self._error(400, None, "The commit must start with a header line holding a summary")
        header = lines[0]["value"]
        with hub._lock:
            repo, head = self._repo_at(kind, repo_id, revision)
            if repo is None:
                return
            if revision not in repo.branches:
                return self._error(400, None, f"{revision} is not a branch")
            if header.get("parentCommit") not in (None, head):
                return self._error(412, None, "A commit has happened since. Please refresh and try again.")
            added: dict[str, tuple[bytes | str, bool]] = {}
            deleted: list[str] = []
            for line in lines[1:]:
                key, v = line["key"], line["value"]
                if key == "file":
                    if v.get("encoding") != "base64":
                        return self._error(400, None, "file content must be base64")
                    added[v["path"]] = (base64.b64decode(v["content"]), False)
                elif key == "lfsFile":
                    if v["oid"] not in repo.lfs_objects:
                        return self._error(
                            422,
                            None,
                            "Your push was rejected because an LFS pointer pointed to a file that does not exist",
                        )
                    added[v["path"]] = (v["oid"], True)
                elif key in ("deletedFile", "deletedFolder"):
                    gone = [
                        p
                        for p in repo.history[head]
                        if p == v["path"] or key == "deletedFolder" and p.startswith(v["path"].rstrip("/") + "/")
                    ]
                    if not gone:
                        return self._error(404, "EntryNotFound", "A file with this name doesn't exist")
                    deleted += gone
                else:
                    return self._error(400, None, f"Unknown commit line {key!r}")
            commit = self._new_commit(repo, added, deleted, header["summary"], head, revision)
        prefix = "datasets/" if kind == "dataset" else ""
        self._json(
            {
                "success": True,
                "commitOid": commit,
                "commitUrl": f"{hub.endpoint}/{prefix}{repo_id}/commit/{commit}",
                "hookOutput": "",
                "pullRequestUrl": None,
            },
            True,
        )

    def _new_commit(
        self,
        repo: _Repo,
        added: dict[str, tuple[bytes | str, bool]],
        deleted: list[str],
        summary: str,
        parent: str,
        branch: str = "main",
    ) -> str:
        """``added``: path -> (bytes, False) for a regular file, (sha256, True) for an uploaded LFS object."""
        hub = self.server_hub
        files = {p: f for p, f in (repo.history[parent].items() if parent else ()) if p not in deleted}
        for p, (content, lfs) in added.items():
            blob = hub._blobs / content if lfs else hub._store(content)
            data = blob.read_bytes()
            files[p] = _File(blob, len(data), hashlib.sha256(data).hexdigest(), _git_sha1(data), is_lfs=lfs)
        state = [(p, f.git_sha1) for p, f in sorted(files.items())]
        commit = hashlib.sha1(json.dumps([parent, summary, time.time_ns(), state]).encode()).hexdigest()
        repo.history[commit] = files
        repo.files, repo.commit = files, commit
        repo.branches[branch] = commit
        repo.log.append(
            {
                "commit": commit,
                "summary": summary,
                "regular": sorted(p for p, (_, lfs) in added.items() if not lfs),
                "lfs": sorted(p for p, (_, lfs) in added.items() if lfs),
                "deleted": sorted(deleted),
            }
        )
        return commit

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()  # the CRLF after the chunk
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    # ------------------------------------------------------------------ answers
    def _error(
        self, status: int, code: str | None, message: str, extra: dict | None = None, body: dict | None = None
    ) -> None:
        payload = json.dumps({"error": message, **(body or {})}).encode()
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

    def _json(self, obj, body: bool, content_type: str = "application/json") -> None:
        payload = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", content_type)
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


def _lfs_path(gitattributes: str, path: str) -> bool:
    """Whether ``path`` matches a ``filter=lfs`` line (a pattern without ``/`` matches the file name)."""
    name = path.rsplit("/", 1)[-1]
    for line in gitattributes.splitlines():
        parts = line.split()
        if len(parts) > 1 and "filter=lfs" in parts[1:]:
            pattern = parts[0]
            if fnmatch.fnmatchcase(path if "/" in pattern else name, pattern):
                return True
    return False
