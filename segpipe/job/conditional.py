"""Writes the store makes only if a condition holds, and the store's own clock.

Two drivers (or two tries of one write task) can race on one object. A check followed by a
write lets both pass the check; these functions leave the decision to the store:

- :func:`create_only` writes an object only if none is there. On S3 a PUT with
  ``If-None-Match: *`` (s3fs's ``mode="create"``); on a local disk (or a shared mount), a
  hard link from a temporary file, which the kernel refuses if the name exists.
- :func:`replace_if` replaces an object only if it is still the version the caller read
  (:func:`version_of`). On S3 a PUT with ``If-Match: <ETag>``; on a local disk a rename
  under an exclusive ``flock`` of a lock file beside the object, after comparing its
  inode, size and modification time with the version.
- :func:`store_time`: the store's clock, from the modification time of an object written
  for the purpose, so that the age of an object written by another host is judged by one
  clock (the store's), not by two hosts' clocks.

Other stores get the same functions without the guarantee (a check, then a write), and a
warning once: their conditional requests (GCS generations, Azure ETags) are not wired here.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import posixpath
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import fsspec

from segpipe.io import is_local, redact, retrying

log = logging.getLogger(__name__)

_warned: set[str] = set()


@dataclass(frozen=True)
class Stored:
    """An object's current version (an opaque token for :func:`replace_if`) and its
    modification time by the store's clock (seconds since the epoch)."""

    version: str
    modified: float


def create_only(fs: fsspec.AbstractFileSystem, path: str, text: str) -> bool:
    """Write ``text`` at ``path`` if no object is there; False (nothing written) if one is.

    A retried request whose first try landed finds its own object and answers False: a
    caller that needs to know reads the object and compares."""
    data = text.encode()
    if is_local(fs):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        temporary = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(temporary)
        return True
    if _is_s3(fs):
        try:
            retrying(fs.pipe_file, path, data, mode="create")
        except FileExistsError:
            return False
        except OSError as exc:
            if _precondition_failed(exc):  # a 412 that s3fs did not name
                return False
            raise
        return True
    _warn_unconditional(fs)
    if retrying(fs.exists, path):
        return False
    retrying(fs.pipe_file, path, data)
    return True


def version_of(fs: fsspec.AbstractFileSystem, path: str) -> Stored | None:
    """The object's version and modification time; None if there is no object."""
    if is_local(fs):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return Stored(_local_version(st), st.st_mtime)
    fs.invalidate_cache(path)
    try:
        info = retrying(fs.info, path)
    except FileNotFoundError:
        return None
    tag = info.get("ETag") or info.get("etag") or info.get("generation") or info.get("mtime")
    return Stored(str(tag), _seconds(info))


def replace_if(fs: fsspec.AbstractFileSystem, path: str, text: str, version: str) -> bool:
    """Replace the object at ``path`` with ``text`` if its version is still ``version``;
    False (nothing written) if it changed or is gone."""
    data = text.encode()
    if is_local(fs):
        with _locked(path):
            current = version_of(fs, path)
            if current is None or current.version != version:
                return False
            temporary = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(temporary, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        return True
    if _is_s3(fs):
        try:
            retrying(fs.pipe_file, path, data, IfMatch=version)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if _precondition_failed(exc):
                return False
            raise
        return True
    _warn_unconditional(fs)
    current = version_of(fs, path)
    if current is None or current.version != version:
        return False
    retrying(fs.pipe_file, path, data)
    return True


def store_time(fs: fsspec.AbstractFileSystem, probe: str) -> float:
    """The store's clock now: the modification time of ``probe``, written for the purpose
    (one small object, rewritten on each call)."""
    if is_local(fs):
        fs.makedirs(posixpath.dirname(probe), exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"clock")
        return os.stat(probe).st_mtime
    retrying(fs.pipe_file, probe, b"clock")
    found = version_of(fs, probe)
    if found is None:
        raise FileNotFoundError(f"the clock probe {redact(probe)} vanished after its write")
    return found.modified


def _local_version(st: os.stat_result) -> str:
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _seconds(info: dict[str, Any]) -> float:
    for key in ("LastModified", "last_modified", "mtime", "updated", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    raise ValueError(f"the store gave no modification time: {sorted(info)}")


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    return bool(protocols & {"s3", "s3a"})


def _precondition_failed(exc: BaseException) -> bool:
    """Whether the store refused a conditional write (HTTP 412). s3fs turns the reply into
    an OSError(EINVAL) like many others, so the botocore error it wraps is what tells."""
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            error = response.get("Error", {})
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if error.get("Code") in ("PreconditionFailed", "412") or status == 412:
                return True
        if "PreconditionFailed" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _warn_unconditional(fs: fsspec.AbstractFileSystem) -> None:
    name = type(fs).__name__
    if name not in _warned:
        _warned.add(name)
        log.warning(
            "%s: conditional writes are not wired for this store; two drivers racing on one "
            "run are not excluded (use S3 or a local or shared disk for that guarantee)",
            name,
        )
