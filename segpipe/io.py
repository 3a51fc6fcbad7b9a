"""One thin layer over fsspec: every read of a URI goes through here.

Credentials come from each filesystem's standard provider chain (for S3: environment,
profile, instance role; ``AWS_ENDPOINT_URL`` for S3-compatible servers), never from URIs
that segpipe logs or records: :func:`redact` strips anything secret-looking from a URI
before it is shown.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

import fsspec

_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@")


def redact(uri: str) -> str:
    """The URI without userinfo (``scheme://user:secret@host``) or query string."""
    return _USERINFO.sub(r"\1***@", uri).split("?", 1)[0]


def absolute(uri: str) -> str:
    """``uri`` unchanged if it has a scheme, else the absolute form of the local path: Ray
    workers need not share the driver's working directory."""
    return uri if "://" in uri else os.path.abspath(uri)


def read_bytes(uri: str, **storage_options: Any) -> bytes:
    """The whole content of the file at ``uri`` (a local path or any fsspec URI)."""
    with fsspec.open(uri, "rb", **storage_options) as f:
        data: bytes = f.read()
    return data


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
