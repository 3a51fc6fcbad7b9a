"""One thin layer over fsspec: every read of a URI goes through here.

Credentials come from each filesystem's standard provider chain (for S3: environment,
profile, instance role; ``AWS_ENDPOINT_URL`` for S3-compatible servers), never from URIs
that segpipe logs or records: :func:`redact` strips anything secret-looking from a URI
before it is shown.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import random
import re
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from pyarrow.fs import FSSpecHandler, PyFileSystem

log = logging.getLogger(__name__)

_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@")
T = TypeVar("T")

# Signs of a fault that passes: throttling, server errors, dropped or timed-out connections.
# Object stores report them as HTTP statuses or error codes inside the message.
_TRANSIENT_WORDS = (
    "SlowDown",
    "Throttl",
    "TooManyRequests",
    "Too Many Requests",
    "OperationAborted",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "Service Unavailable",
    "Bad Gateway",
    "Gateway Timeout",
    "Internal Server Error",
    "RequestLimitExceeded",
    "Connection reset",
    "Server disconnected",
    "ServerDisconnected",
    "IncompleteRead",
    "Connection aborted",
)
# Error messages are only read from these libraries' exceptions (and OSErrors).
_STORAGE_MODULES = (
    "botocore",
    "aiobotocore",
    "aiohttp",
    "urllib3",
    "requests",
    "http",
    "s3fs",
    "gcsfs",
    "adlfs",
    "fsspec",
    "pyarrow",
)
_TRANSIENT_TYPES = ("Timeout", "Connection", "Disconnected", "PayloadError", "IncompleteRead")
RETRY_ATTEMPTS = 6


def redact(uri: str) -> str:
    """The URI without userinfo (``scheme://user:secret@host``) or query string, in each
    part of a chained fsspec URL (``simplecache::s3://...``)."""
    return "::".join(_USERINFO.sub(r"\1***@", part).split("?", 1)[0] for part in uri.split("::"))


def absolute(uri: str) -> str:
    """``uri`` unchanged if it has a scheme, else the absolute form of the local path: Ray
    workers need not share the driver's working directory."""
    return uri if "://" in uri else os.path.abspath(uri)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is a local disk (folders exist, renames are atomic), not an object store."""
    return bool(_protocols(fs) & {"file", "local"})


def fs_root(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of ``uri`` and the path on it, without a trailing slash."""
    fs, root = fsspec.core.url_to_fs(uri)
    return fs, root.rstrip("/")


def arrow_filesystem(uri: str) -> tuple[PyFileSystem, str]:
    """A pyarrow view of the fsspec filesystem of ``uri`` (for pyarrow's and Ray's readers
    and writers), and the path on it, without a trailing slash."""
    fs, root = fs_root(uri)
    return PyFileSystem(FSSpecHandler(fs)), root


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, text: str) -> None:
    """Write ``text`` so that ``path`` holds either nothing or all of it. On an object store
    one PUT already is (an object appears only when complete); on a local disk: a temporary
    name in the same folder, then a rename."""
    if not is_local(fs):
        retrying(fs.pipe_file, path, text.encode())
        return
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    fs.pipe_file(temporary, text.encode())
    fs.mv(temporary, path)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it was raised from) is a fault worth retrying. A missing
    object or a denied access is an answer, not a fault: never retried."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            break
        if isinstance(seen, FileNotFoundError | PermissionError | IsADirectoryError):
            return False
        if isinstance(seen, ConnectionError | TimeoutError):
            return True
        if any(word in type(seen).__name__ for word in _TRANSIENT_TYPES):
            return True
        from_storage = isinstance(seen, OSError) or type(seen).__module__.split(".")[0] in (
            _STORAGE_MODULES
        )
        if from_storage and any(word in str(seen) for word in _TRANSIENT_WORDS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def retrying(
    fn: Callable[..., T],
    *args: Any,
    attempts: int = RETRY_ATTEMPTS,
    base_delay: float = 0.2,
    max_delay: float = 10.0,
    **kwargs: Any,
) -> T:
    """``fn(*args, **kwargs)``, retried on transient faults with exponential back-off and full
    jitter (0.2 s, 0.4 s, ... capped at ``max_delay``). Other errors are raised at once; a
    transient one is raised after ``attempts`` tries. The storage clients retry too (botocore,
    s3fs); this is the outer layer, so that a burst of faults costs time, not images."""
    for attempt in range(1, attempts + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if attempt == attempts or not is_transient(exc):
                raise
            delay = random.uniform(0, min(max_delay, base_delay * 2 ** (attempt - 1)))
            log.warning(
                "transient storage error (attempt %d of %d), retrying in %.2f s: %s: %s",
                attempt,
                attempts,
                delay,
                type(exc).__name__,
                str(exc)[:200],
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def read_bytes(uri: str, **storage_options: Any) -> bytes:
    """The whole content of the file at ``uri`` (a local path or any fsspec URI) in one read
    request, with transient faults retried (:func:`retrying`)."""
    return retrying(_read_once, uri, **storage_options)


def _read_once(uri: str, **storage_options: Any) -> bytes:
    # One GET on an object store: opening a file object first asks for its size, and so
    # does s3fs's cat_file when it may download in parallel parts (not for one image).
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    one_part = {"max_concurrency": 1} if _protocols(fs) & {"s3", "s3a"} else {}
    data: bytes = fs.cat_file(path, **one_part)
    return data


def _protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    return {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
