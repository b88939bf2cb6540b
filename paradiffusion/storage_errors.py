"""Storage failures as one line: the URL, the operation, the cause, and whether a rerun helps.

A store that refuses or stops answering mid-run surfaces deep inside s3fs / botocore /
aiohttp (or gcsfs, adlfs) as a 30-150 line traceback. :func:`describe_failure` reads the
exception chain and its traceback frames and says what happened in one line:

* the cause, by kind: *forbidden* (access denied, a wrong key or signature, an expired
  token), *no such bucket*, *unreachable* (connection refused, DNS, timeouts, the server
  gone), *throttled or unavailable* (SlowDown, 503, 500 beyond the client's retries);
* the operation and URL: the S3 API call and its bucket/key when botocore's frames are
  there (``put_object s3://b/k``), else the outermost fsspec call and its path;
* the exit code: 2 for what configuration must fix (forbidden, no such bucket, and an
  unreachable endpoint when the run had not written anything yet), 1 for what may pass
  (throttling, an endpoint that stopped answering mid-run): a rerun resumes from the
  committed shards either way.

The CLI prints the line and writes the full traceback to the run's log file only
(:func:`paradiffusion.cli.run_command`).
"""

from __future__ import annotations

import errno
import types
from collections.abc import Iterator

# botocore / S3 error codes by kind
_FORBIDDEN = {
    "AccessDenied",
    "Forbidden",
    "403",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AuthorizationHeaderMalformed",
    "AllAccessDisabled",
    "AccountProblem",
}
_NO_BUCKET = {"NoSuchBucket"}
_TRANSIENT = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "ServiceUnavailable",
    "503",
    "InternalError",
    "500",
    "RequestTimeout",
    "RequestTimeTooSkewed",
}
# modules whose frames mean the failure came from a storage client
_STORAGE_MODULES = ("s3fs", "fsspec", "botocore", "aiobotocore", "gcsfs", "adlfs", "aiohttp", "pyarrow.fs")
# connection-level failures, by class name (no import of optional packages needed)
_UNREACHABLE_NAMES = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ClientConnectorError",
    "ClientConnectionError",
    "ServerDisconnectedError",
    "ServerTimeoutError",
    "ClientOSError",
    "ProxyConnectionError",
}


class StorageError(Exception):
    """A storage failure described in one line; ``exit_code`` 2 (configuration) or 1 (transient)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]  # Ray's RayTaskError keeps .cause


def _frames(exc: BaseException) -> Iterator[types.FrameType]:
    for e in _chain(exc):
        tb = e.__traceback__
        while tb is not None:
            yield tb.tb_frame
            tb = tb.tb_next


def _error_code(e: BaseException) -> str | None:
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        err = resp.get("Error") or {}
        code = err.get("Code")
        if code:
            return str(code)
        status = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        if status:
            return str(status)
    return None


def _where(exc: BaseException) -> tuple[str | None, str | None]:
    """(operation, URL) from the traceback: botocore's call and bucket/key, else the outermost fsspec call."""
    api: tuple[str | None, str | None] = (None, None)
    outer: tuple[str | None, str | None] = (None, None)
    for frame in _frames(exc):
        loc = frame.f_locals
        mod = frame.f_globals.get("__name__", "")
        if mod.startswith("s3fs") and frame.f_code.co_name == "_call_s3" and api[0] is None:
            kwargs = loc.get("kwargs") or {}
            method = loc.get("method")
            bucket, key = kwargs.get("Bucket"), kwargs.get("Key") or kwargs.get("Prefix")
            url = f"s3://{bucket}/{key}" if bucket and key else (f"s3://{bucket}" if bucket else None)
            api = (getattr(method, "__name__", method) if method else None, url)
        if outer[0] is None and mod.startswith(("fsspec", "s3fs", "gcsfs", "adlfs")):
            fs = loc.get("self")
            path = next((loc[k] for k in ("path", "rpath", "path1", "url") if isinstance(loc.get(k), str)), None)
            if path is None and frame.f_code.co_name == "wrapper":  # fsspec's sync wrapper: func(*args)
                func, args = loc.get("func"), loc.get("args") or ()
                strs = [a for a in args if isinstance(a, str)]
                if func is not None and strs:
                    outer = (func.__name__.lstrip("_"), strs[0])
                    continue
            if fs is not None and path is not None:
                protos = getattr(fs, "protocol", ())
                proto = protos[0] if isinstance(protos, (tuple, list)) else protos
                shown = path if "://" in path or not proto or proto == "file" else f"{proto}://{path}"
                outer = (frame.f_code.co_name.lstrip("_"), shown)
    if outer[1] and "://" not in outer[1] and api[1]:
        outer = (outer[0], None)
    return (api[0] or outer[0], api[1] or outer[1])


def _from_storage(exc: BaseException) -> bool:
    for frame in _frames(exc):
        if frame.f_globals.get("__name__", "").startswith(_STORAGE_MODULES):
            fs = frame.f_locals.get("self")
            if type(fs).__name__ in ("LocalFileSystem", "MemoryFileSystem"):
                return False
            return True
    return any(type(e).__module__.startswith(_STORAGE_MODULES) for e in _chain(exc))


def describe_failure(
    exc: BaseException, url: str | None = None, operation: str | None = None, at_start: bool = False
) -> StorageError | None:
    """One-line :class:`StorageError` for a failure of object storage, or None when ``exc`` is not one.

    ``url`` / ``operation`` override what the traceback says; ``at_start``: nothing was written
    yet (the bucket check), so an unreachable endpoint is a configuration problem (exit 2).
    """
    if not _from_storage(exc):
        return None
    kind = None
    detail = ""
    for e in _chain(exc):
        code = _error_code(e)
        name = type(e).__name__
        if code in _FORBIDDEN or isinstance(e, PermissionError) or getattr(e, "errno", None) == errno.EACCES:
            kind, detail = "forbidden", code or str(e)
        elif code in _NO_BUCKET or "bucket does not exist" in str(e).lower():
            kind, detail = "no_bucket", code or str(e)
        elif code in _TRANSIENT:
            kind, detail = "throttled", code
        elif name in _UNREACHABLE_NAMES or isinstance(e, (ConnectionError, TimeoutError)):
            kind, detail = "unreachable", str(e)
        if kind:
            break
    if kind is None:
        return None
    where_op, where_url = _where(exc)
    op = operation or where_op or "request"
    target = url or where_url or "object storage"
    if where_url and url and where_url != url and operation is None:
        target = where_url
    detail = " ".join(str(detail).split())[:200]
    if kind == "forbidden":
        cause = f"access denied ({detail}): check the credentials (storage.key/secret/token, AWS_* variables, profile) and the bucket's policy"
        code = 2
    elif kind == "no_bucket":
        bucket = target.split("://", 1)[-1].split("/", 1)[0] if "://" in target else target
        cause = f"bucket {bucket!r} does not exist (buckets are never created: create it, or fix the URL)"
        code = 2
    elif kind == "throttled":
        cause = f"the store is throttling or unavailable ({detail}) beyond the client's retries"
        code = 1
    else:
        cause = f"endpoint unreachable ({detail})"
        cause += ": check storage.endpoint_url / AWS_ENDPOINT_URL" if at_start else ""
        code = 2 if at_start else 1
    return StorageError(f"storage: {op} {target} failed: {cause}", code)
