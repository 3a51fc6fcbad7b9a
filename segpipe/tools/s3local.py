"""An S3-compatible server on loopback (moto's), for the demo and the tests.

It needs the ``demo`` extra (``moto[server]``). Nothing here is used by ``segpipe run``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping

# Credentials for a throwaway loopback server only; real runs use the provider chain.
LOOPBACK_ENV = {
    "AWS_ACCESS_KEY_ID": "segpipe-loopback",
    "AWS_SECRET_ACCESS_KEY": "segpipe-loopback",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextlib.contextmanager
def loopback_s3_env(credentials: Mapping[str, str] = LOOPBACK_ENV) -> Iterator[str]:
    """A moto server, with this process's AWS settings (``credentials``, the endpoint, no
    profile) pointing at it while inside and restored afterwards. Ray workers started inside
    inherit them."""
    keys = [*credentials, "AWS_ENDPOINT_URL", "AWS_PROFILE"]
    saved = {k: os.environ.get(k) for k in keys}
    with moto_server() as endpoint:
        os.environ.update(credentials, AWS_ENDPOINT_URL=endpoint)
        os.environ.pop("AWS_PROFILE", None)
        try:
            yield endpoint
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """Start moto's S3-compatible server on 127.0.0.1; yield its endpoint URL; stop it."""
    try:
        import moto.server  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            "the local S3 server needs moto: install segpipe with the 'demo' extra"
        ) from exc
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        stop_process(proc, timeout=10)


def stop_process(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
