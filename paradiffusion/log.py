"""One logger per package, with a clear prefix; other libraries' output to a log file."""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from typing import TextIO

_HANDLER: logging.StreamHandler | None = None
_RUN_LOG: str | None = None  # the log file of the stage running now (or last), for a failure's traceback
_SECRETS: set[str] = set()  # values never to print: storage credentials (paradiffusion.storage registers them)


def add_secret(value: str | None) -> None:
    """Register a value (a credential) that :func:`redact` and every log line of this package hide."""
    if value and len(value) >= 4:  # shorter values would blank out ordinary words
        _SECRETS.add(str(value))


def has_secrets() -> bool:
    """Whether any secret is registered (so output must go through :func:`redact`)."""
    return bool(_SECRETS)


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``***`` (for messages that may quote settings)."""
    for s in sorted(_SECRETS, key=len, reverse=True):
        if s in text:
            text = text.replace(s, "***")
    return text


# a --set of a credential: any secret-looking name in the storage section (storage.secret_key,
# storage.options.s3.token), elsewhere a setting named exactly key / secret / token / password
_SECRET_SETTING = re.compile(
    r"^((?:--set=)?(?:storage\.[\w.-]*(?:key|secret|token|password|credential)[\w-]*"
    r"|(?:[\w-]+\.)*(?:key|secret|token|password)))=(.+)$",
    re.IGNORECASE,
)
#: environment variables that hold storage credentials (registered before anything runs)
SECRET_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_CLIENT_SECRET",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
)


def redact_argv(argv: list[str]) -> list[str]:
    """A command line with credentials hidden: the value of a ``--set`` of a secret setting
    (``storage.secret=...``) and every registered secret."""
    out = []
    for a in argv:
        m = _SECRET_SETTING.match(a)
        out.append(f"{m.group(1)}=***" if m else redact(a))
    return out


def register_cli_secrets(argv: list[str], environ: dict[str, str] | None = None) -> None:
    """Register the credentials a command line and the environment hold, before anything is
    parsed: the values of ``--set`` items of secret settings (as typed and as YAML reads them)
    and :data:`SECRET_ENV`. Called first thing by the CLI, so even an argparse or config error
    cannot print one."""
    import yaml

    env = os.environ if environ is None else environ
    for name in SECRET_ENV:
        add_secret(env.get(name))
    for a in argv:
        m = _SECRET_SETTING.match(a)
        if not m:
            continue
        raw = m.group(2)
        add_secret(raw)
        with contextlib.suppress(Exception):
            parsed = yaml.safe_load(raw)
            for v in parsed if isinstance(parsed, list) else [parsed]:
                if isinstance(v, (str, int, float)):
                    add_secret(str(v))


class _Redact(logging.Filter):
    """Hide registered secrets in this package's log lines (a library's error may quote a setting)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _SECRETS:
            msg = record.getMessage()
            clean = redact(msg)
            if record.exc_info and record.exc_info[1] is not None:
                clean_exc = redact(logging.Formatter().formatException(record.exc_info))
                clean = f"{clean}\n{clean_exc}"
                record.exc_info = None
                record.exc_text = None
            record.msg, record.args = clean, None
        return True


class _Forward(io.TextIOBase):
    """A stand-in for sys.stdout / sys.stderr that writes to a target which can be switched:
    a library that keeps a reference to it (Ray's log handler does) writes to the real
    stream again once the block that installed it has ended, never to a closed file."""

    def __init__(self, target: TextIO):
        self.target = target

    def write(self, s: str) -> int:
        return self.target.write(s)

    def flush(self) -> None:
        self.target.flush()

    def fileno(self) -> int:
        return self.target.fileno()

    def isatty(self) -> bool:
        try:
            return self.target.isatty()
        except ValueError:  # the stream is closed (at interpreter exit, e.g. Ray's colorama hook after pytest)
            return False

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.target, "encoding", "utf-8")

    def __getattr__(self, name: str):
        return getattr(self.target, name)


class _ConsoleHandler(logging.StreamHandler):
    """The package's console handler. The stream it was given can be closed under it (a console of a
    finished :func:`third_party_output_to` block kept by a thread, a test runner's capture file): then
    it writes to the current ``sys.stderr`` (or the interpreter's own) instead of failing each record."""

    def _live(self):
        if getattr(self.stream, "closed", False):
            for cand in (sys.stderr, sys.__stderr__):
                if cand is not None and not getattr(cand, "closed", False):
                    self.stream = cand
                    break
        return self.stream

    def emit(self, record: logging.LogRecord) -> None:
        self._live()
        super().emit(record)

    def flush(self) -> None:
        if not getattr(self._live(), "closed", False):
            super().flush()


def get_logger(name: str) -> logging.Logger:
    """Return the logger for a package or module (e.g. ``curation.filter``).

    Messages read ``[curation.filter] message``; the level comes from
    ``PARADIFFUSION_LOG_LEVEL`` (default INFO).
    """
    global _HANDLER
    if _HANDLER is None:
        _HANDLER = _ConsoleHandler(sys.stderr)
        _HANDLER.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        _HANDLER.addFilter(_Redact())
        root = logging.getLogger("pd")
        root.addHandler(_HANDLER)
        root.setLevel(os.environ.get("PARADIFFUSION_LOG_LEVEL", "INFO").upper())
        root.propagate = False
    return logging.getLogger(f"pd.{name}")


def stage_log_path(table_url: str, stage: str) -> str:
    """Where a stage run's third-party output goes: ``<table>/_logs/<stage>-<UTC time>.log``
    for a local table, a file in the temp folder for a remote one (it is written as it runs)."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    if "://" in table_url and not table_url.startswith("file://"):
        folder = tempfile.mkdtemp(prefix=f"paradiffusion-{stage}-logs-")
    else:
        folder = os.path.join(table_url.removeprefix("file://"), "_logs")
        os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"{stage}-{stamp}.log")


@contextlib.contextmanager
def third_party_output_to(log_path: str) -> Iterator[TextIO]:
    """Send what libraries print to ``log_path``; yield a stream to the real terminal.

    Inside the block, file descriptors 1 and 2 point at the log file, so the output of
    this process's threads, of C code and of any process started here (img2dataset's
    workers and bars, Ray's start-up lines and forwarded worker logs, warnings) lands
    there. This package's loggers, and the progress bar drawn on the yielded stream,
    stay on the terminal. Restored on exit, also on an exception.
    """
    global _RUN_LOG
    _RUN_LOG = log_path
    get_logger("log")  # make sure our handler exists before it is pointed at the console
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = os.dup(1), os.dup(2)
    # the terminal: where sys.stderr wrote (it may be a wrapper, e.g. under pytest), else fd 2
    console = os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding="utf-8", errors="replace")
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # Python-level writes too, in case sys.stdout/sys.stderr are not fds 1 and 2
    log_stream = open(log_path, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
    old_std = sys.stdout, sys.stderr
    forwards = _Forward(log_stream), _Forward(log_stream)
    sys.stdout, sys.stderr = forwards
    old_stream = _HANDLER.stream if _HANDLER is not None else None
    if _HANDLER is not None:
        _HANDLER.stream = console  # not setStream(): it flushes the old stream, which may be gone
    try:
        yield console
    finally:
        sys.stdout, sys.stderr = old_std
        forwards[0].target, forwards[1].target = old_std  # for whoever kept a reference
        log_stream.close()
        if _HANDLER is not None:
            _HANDLER.stream = old_stream
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in saved:
            os.close(f)
        console.close()


def set_run_log(path: str | None) -> str | None:
    """Set the run's log file (None: none yet); returns the previous one."""
    global _RUN_LOG
    previous, _RUN_LOG = _RUN_LOG, path
    return previous


def write_traceback_to_run_log(text: str, command: str) -> str:
    """Append ``text`` (a traceback), redacted, to the run's log file: the stage's own
    (:func:`third_party_output_to`) when one was opened, else a new file in the temp folder.
    Returns its path."""
    path = _RUN_LOG
    if path is None:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        folder = os.path.join(tempfile.gettempdir(), "paradiffusion-logs")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{command}-{stamp}-{os.getpid()}.log")
    with open(path, "a", encoding="utf-8") as f:
        f.write(redact(text))
    return path
