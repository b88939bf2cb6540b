"""A local Label Studio server: installed in a virtual environment of its own, run offline on
127.0.0.1 with SQLite (``make labelstudio``, ``paradiffusion annotations serve``, the tests).

Label Studio pins libraries that conflict with ours (``pyarrow<25`` among them), so it lives in
its own venv (``annotations.label_studio.venv``, default ``.venv-labelstudio/``), created and
filled with ``pip install label-studio==<version>`` on first use (about 2 minutes) or by
``make setup``. Our code talks to it only over HTTP.

The server keeps everything in ``data_dir``: its SQLite database, uploaded media, a ``.env``
with a fixed ``SECRET_KEY`` (tokens stay valid across restarts), the admin password (when
``LABEL_STUDIO_PASSWORD`` is not set) and, after the first start, ``api_token``: a personal
access token of the admin that ``annotations push`` / ``pull`` use. It is started with
``label-studio start --no-browser --internal-host 127.0.0.1 --port P --data-dir D`` plus
environment that turns off the version check against PyPI and analytics (it runs offline) and
turns on serving of local files under ``files_root`` (the tasks' images).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from paradiffusion.deps import require
from paradiffusion.log import get_logger

log = get_logger("captioning.small.labelstudio")


#: Environment for running Label Studio offline: no version check against PyPI, no analytics.
_OFFLINE = {"LABEL_STUDIO_LATEST_VERSION_CHECK": "false", "LABEL_STUDIO_COLLECT_ANALYTICS": "false"}


class ServerError(RuntimeError):
    """Label Studio could not be installed, started or logged into; the message says what to do."""


# --------------------------------------------------------------------------- install
def installed_version(venv: Path) -> str | None:
    py = venv / "bin" / "python"
    if not (venv / "bin" / "label-studio").exists() or not py.exists():
        return None
    r = subprocess.run(
        [str(py), "-c", "import importlib.metadata as m; print(m.version('label-studio'))"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return r.stdout.strip() or None if r.returncode == 0 else None


def empty_database(venv: str | Path) -> Path:
    """Where the venv keeps an empty, migrated database (see :func:`ensure_installed`)."""
    return Path(venv).absolute() / "paradiffusion" / "empty-db" / "label_studio.sqlite3"


#: The lock of Label Studio's venv (every package, exact versions and hashes; `make lock` writes it).
LOCK = Path(__file__).resolve().parents[2] / "requirements" / "labelstudio-lock.txt"
_ENVLOCK = LOCK.parent.parent / "scripts" / "envlock.py"


def locked_version(lock: Path = LOCK) -> str | None:
    """The label-studio version the lock pins (None without a lock file, e.g. outside a clone)."""
    if not lock.exists():
        return None
    for line in lock.read_text().splitlines():
        if line.startswith("label-studio=="):
            return line.split("==", 1)[1].split()[0]
    return None


def _venv_matches_lock(venv: Path) -> bool:
    r = subprocess.run(
        [sys.executable, str(_ENVLOCK), "check", "--venv", str(venv), "--lock", str(LOCK)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return r.returncode == 0


def ensure_installed(venv: str | Path, version: str, python: str | None = None) -> Path:
    """The ``label-studio`` executable of ``venv``, installing ``label-studio==version`` there
    first when it is missing, another version, or (for the locked version) differs from the lock.

    The locked version is installed from ``requirements/labelstudio-lock.txt``: every package of
    the venv at the version and hash it was tested with (label-studio's own metadata lets its
    dependencies float, and a new major release of one of them has broken its start-up before).
    Another version is installed unpinned, with a warning.

    It also keeps an empty database with every migration applied (:func:`empty_database`):
    a first start spends minutes migrating a new SQLite file (over 3 minutes on a busy 2-core
    machine), and a server whose data dir starts from this copy answers in under a minute. The
    copy is made once per install, by ``label-studio version --data-dir``, which applies the
    migrations and exits.
    """
    venv = Path(venv).absolute()
    have = installed_version(venv)
    locked = locked_version() == version and _ENVLOCK.exists()
    if have == version and (not locked or _venv_matches_lock(venv)):
        exe = venv / "bin" / "label-studio"
        _ensure_empty_database(exe, empty_database(venv))
        return exe
    log.info(
        "installing label-studio==%s into %s (a venv of its own: its pins conflict with ours)%s; about 2 minutes%s",
        version,
        venv,
        " from its lock" if locked else "",
        f" (found {have}{', not as locked' if have == version else ''})" if have else "",
    )
    t0 = time.monotonic()
    base = python or _base_python()
    if locked:
        cmd = [sys.executable, str(_ENVLOCK), "install", "--venv", str(venv), "--lock", str(LOCK), "--python", base]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            raise ServerError(
                (r.stderr.strip().splitlines() or [f"{' '.join(cmd)} failed"])[-1].removeprefix("error: ")
            )
    else:
        log.warning(
            "label-studio %s is not the locked version (%s): its dependencies are installed unpinned",
            version,
            locked_version() or "no lock file",
        )
        try:
            if not (venv / "bin" / "python").exists():
                subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=600)
            pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
            subprocess.run([*pip, f"label-studio=={version}"], check=True, timeout=1800)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            raise ServerError(
                f"installing label-studio=={version} into {venv} failed ({exc}); run by hand: "
                f"python3 -m venv {venv} && {venv}/bin/pip install label-studio=={version}"
            ) from exc
    if installed_version(venv) != version:
        raise ServerError(f"{venv}: label-studio {version} is still not importable after pip install")
    exe = venv / "bin" / "label-studio"
    db = empty_database(venv)
    if db.exists():
        db.unlink()  # migrations of another version
    _ensure_empty_database(exe, db)
    log.info("label-studio %s installed in %.0f s", version, time.monotonic() - t0)
    return exe


def _ensure_empty_database(exe: Path, db: Path) -> None:
    if db.exists():
        return
    log.info("preparing an empty Label Studio database (migrations, once per install; a few minutes)")
    work = db.parent.with_name(f".tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, **_OFFLINE, "LABEL_STUDIO_BASE_DATA_DIR": str(work)}
    r = subprocess.run(
        [str(exe), "version", "--data-dir", str(work)], env=env, capture_output=True, text=True, timeout=1800
    )
    if r.returncode != 0 or not (work / "label_studio.sqlite3").exists():
        shutil.rmtree(work, ignore_errors=True)
        raise ServerError(f"{exe} version (database migrations) failed:\n{(r.stdout + r.stderr)[-2000:]}")
    db.parent.mkdir(parents=True, exist_ok=True)
    os.replace(work / "label_studio.sqlite3", db)
    shutil.rmtree(work, ignore_errors=True)


def _base_python() -> str:
    """A Python to create the venv with: the interpreter that owns ours (not a venv's copy)."""
    return getattr(sys, "_base_executable", None) or sys.executable


# --------------------------------------------------------------------------- run
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listener(port: int):
    """The process listening on ``port`` (a ``psutil.Process``), or None when unknown. psutil is
    optional here (a dev dependency): without it the owner is described by what answers."""
    try:
        import psutil
    except ImportError:
        return None
    try:
        for c in psutil.net_connections("tcp"):
            if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid:
                return psutil.Process(c.pid)
    except (psutil.Error, OSError):
        return None
    return None


def port_owner(port: int) -> str | None:
    """None when ``127.0.0.1:port`` is free; else who has it: the process (pid, command line)
    where it can be seen, and whether a Label Studio answers ``/health`` there."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closing socket (TIME_WAIT) is no owner
        try:
            s.bind(("127.0.0.1", port))
            return None
        except OSError:
            pass
    proc = _listener(port)
    who = "another process"
    if proc is not None:
        try:
            who = f"pid {proc.pid} ({' '.join(proc.cmdline())[:300]})"
        except Exception:  # noqa: BLE001 - it may have exited or belong to another user
            who = f"pid {proc.pid}"
    httpx = require("httpx", extra="annotations")
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=3)
        if r.status_code == 200 and "UP" in r.text:
            who += ", a Label Studio answers /health there"
    except httpx.HTTPError:
        pass
    return who


def _secret(path: Path, nbytes: int = 24) -> str:
    """A secret kept in ``path`` (created 0600 on first use)."""
    if path.exists():
        return path.read_text().strip()
    value = secrets.token_urlsafe(nbytes)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


class LabelStudioServer:
    """One ``label-studio start`` process on 127.0.0.1.

    ``files_root`` is the folder local-file URLs (``/data/local-files/?d=<path under it>``)
    may point into; ``None`` turns local file serving off. ``empty_db`` (from
    :func:`empty_database`) seeds a new data dir with an already migrated database.
    """

    def __init__(
        self,
        executable: str | Path,
        data_dir: str | Path,
        port: int,
        admin_email: str = "admin@example.org",
        password: str | None = None,
        files_root: str | Path | None = None,
        empty_db: str | Path | None = None,
    ):
        self.executable = str(executable)
        self.empty_db = Path(empty_db) if empty_db else None
        self.data_dir = Path(data_dir).absolute()
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.admin_email = admin_email
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.password = password or _secret(self.data_dir / "admin_password")
        self.files_root = Path(files_root).absolute() if files_root else None
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir / "server.log"
        self.started_in: float | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            LABEL_STUDIO_USERNAME=self.admin_email,
            LABEL_STUDIO_PASSWORD=self.password,
            LABEL_STUDIO_BASE_DATA_DIR=str(self.data_dir),
            **_OFFLINE,  # no call to pypi.org at start
            LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="true" if self.files_root else "false",
            SECRET_KEY=_secret(self.data_dir / "secret_key", 48),  # stable: tokens survive restarts
        )
        if self.files_root:
            env["LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"] = str(self.files_root)
        env.pop("DJANGO_DB", None)  # SQLite in data_dir (the default)
        return env

    def start(self, timeout: float = 600.0) -> LabelStudioServer:
        """Start the process and wait until ``GET /health`` answers; raises :class:`ServerError`
        with the end of the server's log when it does not."""
        cmd = [
            self.executable,
            "start",
            "--no-browser",
            "--internal-host",
            "127.0.0.1",
            "--host",
            self.url,
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
        ]
        owner = port_owner(self.port)
        if owner is not None:  # else /health would answer from that server, not from ours
            raise ServerError(
                f"port {self.port} on 127.0.0.1 is taken by {owner}: stop it, or start ours on a free port "
                f"(--set annotations.label_studio.port={free_port()})"
            )
        db = self.data_dir / "label_studio.sqlite3"
        if not db.exists() and self.empty_db is not None and self.empty_db.exists():
            shutil.copyfile(self.empty_db, db)  # already migrated: the first start takes seconds, not minutes
        log.info("starting Label Studio: %s (log: %s)", " ".join(cmd), self.log_path)
        t0 = time.monotonic()
        logf = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        self.proc = subprocess.Popen(
            cmd, env=self.env(), stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.data_dir
        )
        logf.close()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - t0
        log.info("Label Studio is up at %s after %.0f s", self.url, self.started_in)
        return self

    def wait_ready(self, timeout: float) -> None:
        httpx = require("httpx", extra="annotations")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerError(f"Label Studio exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                r = httpx.get(f"{self.url}/health", timeout=5)
                if r.status_code == 200 and "UP" in r.text:
                    self._check_ours()
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise ServerError(f"Label Studio did not answer {self.url}/health within {timeout:.0f} s:\n{self.log_tail()}")

    def _check_ours(self) -> None:
        """The server answering is the one started here: the listening process descends from it
        (same POSIX sid: it was started with ``start_new_session``). Unknown without psutil: then only the port check
        before the start vouches for it."""
        proc = _listener(self.port)
        if proc is None or self.proc is None:
            return
        try:
            ours = os.getsid(proc.pid) == self.proc.pid
        except OSError:
            return
        if not ours:
            raise ServerError(
                f"{self.url} answers, but from pid {proc.pid}, not from the Label Studio started here "
                f"(pid {self.proc.pid}); stop that one or use another port"
            )

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server's process group (the process we started and its children)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=timeout)
        except ProcessLookupError:
            pass

    def __enter__(self) -> LabelStudioServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------- accounts
def login(url: str, email: str, password: str):
    """An ``httpx.Client`` logged in through the web form, as a person in a browser is."""
    httpx = require("httpx", extra="annotations")
    c = httpx.Client(base_url=url, follow_redirects=False, timeout=60)
    c.get("/user/login/")
    r = c.post(
        "/user/login/",
        data={"email": email, "password": password, "csrfmiddlewaretoken": c.cookies.get("csrftoken", "")},
        headers={"Referer": f"{url}/user/login/"},
    )
    if r.status_code != 302:
        c.close()
        raise ServerError(f"{url}: cannot log in as {email} (status {r.status_code}); wrong password?")
    return c


def personal_access_token(url: str, email: str, password: str) -> str:
    """Create the user's personal access token (Account & Settings -> Personal Access Token in the
    UI). Label Studio allows one per user: when one exists, this raises :class:`ServerError`."""
    c = login(url, email, password)
    try:
        r = c.post("/api/token/", headers={"X-CSRFToken": c.cookies.get("csrftoken", ""), "Referer": f"{url}/"})
    finally:
        c.close()
    if r.status_code == 409:
        raise ServerError(
            f"{email} already has a personal access token on {url} and its copy is lost: revoke it in "
            "Account & Settings and rerun, or put a token in the LABEL_STUDIO_API_KEY variable"
        )
    if r.status_code != 201:
        raise ServerError(f"{url}: creating a personal access token for {email} failed: {r.status_code} {r.text[:300]}")
    return r.json()["token"]


def admin_token(server: LabelStudioServer) -> str:
    """The admin's personal access token, created on the first call and kept in ``data_dir/api_token``."""
    path = server.data_dir / "api_token"
    if path.exists():
        return path.read_text().strip()
    token = personal_access_token(server.url, server.admin_email, server.password)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def invite_url(url: str, token: str) -> str:
    """The organisation's sign-up link (Organization -> Add People in the UI)."""
    from captioning.small.lsclient import LabelStudioClient

    with LabelStudioClient(url, token) as c:
        return url + c.request("GET", "/api/invite").json()["invite_url"]


def sign_up(invite: str, email: str, password: str) -> None:
    """Sign a person up through the invite link's form, as they would in a browser."""
    httpx = require("httpx", extra="annotations")
    base, _, query = invite.partition("/user/signup/")
    with httpx.Client(base_url=base, follow_redirects=False, timeout=60) as c:
        c.get(f"/user/signup/{query}")
        r = c.post(
            f"/user/signup/{query}",
            data={"email": email, "password": password, "csrfmiddlewaretoken": c.cookies.get("csrftoken", "")},
            headers={"Referer": f"{base}/user/signup/"},
        )
    if r.status_code != 302:
        raise ServerError(f"signing up {email} at {base} failed: {r.status_code} {r.text[:300]}")
