"""A fault-injecting HTTP proxy on loopback, in front of the S3-compatible test server.

Clients point their S3 endpoint at the proxy; it forwards each request to the real server
and answers some of them itself, on a fixed schedule (request number ``n``):

- ``reset_every``: the connection is dropped without an answer (TCP reset),
- ``slowdown_every``: ``503 SlowDown`` (S3's throttling answer),
- ``internal_every``: ``500 InternalError``,
- ``lose_answer_every``: the request reaches the server, and then the connection is dropped
  without its answer (the client retries a request that already took effect).

Per-key rules play the parts a plain server can't: keys containing ``forbidden_marker`` answer
``403 AccessDenied`` (a bucket policy that denies reading them), and keys containing
``vanish_marker`` are deleted from the server on the first read (a file that vanishes between
listing and reading). ``counts`` says how many of each were injected; ``requests`` lists
every request as ``(method, path)``.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
}


@dataclass
class FaultPlan:
    reset_every: int = 0
    slowdown_every: int = 0
    internal_every: int = 0
    lose_answer_every: int = 0
    forbidden_marker: str = "forbidden"
    vanish_marker: str = "vanishing"
    enabled: bool = True


def _error_xml(code: str, message: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        f"<Message>{message}</Message><RequestId>faultproxy</RequestId></Error>"
    ).encode()


class FaultProxy:
    def __init__(self, upstream: str, plan: FaultPlan) -> None:
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.plan = plan
        self.counts: Counter[str] = Counter()
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._requests = 0
        self._vanished: set[str] = set()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # quiet
                return

            def do_GET(self) -> None:
                proxy.handle(self)

            do_PUT = do_POST = do_HEAD = do_DELETE = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)

    def _next(self) -> int:
        with self._lock:
            self._requests += 1
            return self._requests

    def _scheduled(self, n: int) -> str | None:
        plan = self.plan
        if not plan.enabled:
            return None
        for kind, every in (
            ("reset", plan.reset_every),
            ("slowdown", plan.slowdown_every),
            ("internal", plan.internal_every),
            ("lose_answer", plan.lose_answer_every),
        ):
            if every and n % every == 0:
                return kind
        return None

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        body = _read_body(h)
        path = urlsplit(h.path).path
        reading = h.command in ("GET", "HEAD")
        with self._lock:
            self.requests.append((h.command, path))
        fault = self._scheduled(self._next())
        if fault == "reset":
            self._count("reset")
            self._reset(h)
            return
        if fault == "slowdown":
            self._count("slowdown")
            _answer(h, 503, _error_xml("SlowDown", "Please reduce your request rate."))
            return
        if fault == "internal":
            self._count("internal")
            _answer(h, 500, _error_xml("InternalError", "We encountered an internal error."))
            return
        if reading and self.plan.forbidden_marker in path:
            self._count("forbidden")
            _answer(h, 403, _error_xml("AccessDenied", "Access Denied"))
            return
        if reading and self.plan.vanish_marker in path:
            with self._lock:
                first = path not in self._vanished
                self._vanished.add(path)
            if first:
                self._count("vanished")
                # The reader's own (unverified) credentials headers: the server wants some.
                self._forward("DELETE", path, b"", dict(h.headers))
        status, headers, payload = self._forward(h.command, h.path, body, dict(h.headers))
        if fault == "lose_answer":
            self._count("lose_answer")
            self._reset(h)
            return
        h.send_response(status)
        for key, value in headers:
            if key.lower() not in _HOP_BY_HOP:
                h.send_header(key, value)
        length = next((v for k, v in headers if k.lower() == "content-length"), None)
        h.send_header(
            "Content-Length", length if h.command == "HEAD" and length else str(len(payload))
        )
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(payload)

    @staticmethod
    def _reset(h: BaseHTTPRequestHandler) -> None:
        h.close_connection = True
        # SO_LINGER with a zero timeout: close() sends a TCP reset, not a FIN.
        h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        h.connection.close()

    def _count(self, kind: str) -> None:
        with self._lock:
            self.counts[kind] += 1

    def _forward(
        self, method: str, target: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=60)
        try:
            sent = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}
            if body or method in ("PUT", "POST"):
                sent["Content-Length"] = str(len(body))
            conn.request(method, target, body=body or None, headers=sent)
            response = conn.getresponse()
            payload = response.read()
            return response.status, response.getheaders(), payload
        finally:
            conn.close()


def _read_body(h: BaseHTTPRequestHandler) -> bytes:
    if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            chunks.append(h.rfile.read(size))
            h.rfile.readline()
    length = int(h.headers.get("Content-Length") or 0)
    return h.rfile.read(length) if length else b""


def _answer(h: BaseHTTPRequestHandler, status: int, payload: bytes) -> None:
    h.send_response(status)
    h.send_header("Content-Type", "application/xml")
    h.send_header("Content-Length", "0" if h.command == "HEAD" else str(len(payload)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(payload)


@contextmanager
def fault_proxy(upstream: str, plan: FaultPlan) -> Iterator[FaultProxy]:
    """Start a :class:`FaultProxy` in front of ``upstream``; stop it on exit."""
    proxy = FaultProxy(upstream, plan)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
