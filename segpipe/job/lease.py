"""One driver per run at a time: a lease object beside the run record.

``<output>/_runs/<run_id>.lease.json`` names the attempt that writes the run (a random id,
host, pid) and a heartbeat time, rewritten every ``HEARTBEAT_S`` seconds while it runs. A
second driver for the same run id is refused while the lease is live; it takes the lease
over when the heartbeat is older than ``TTL_S``, or at once when the holder was a process on
this host that no longer exists (a killed driver). Two drivers starting in the same instant
both write the lease; each reads it back after a pause and the one whose id is not there
gives up. Without a lease, a resumed attempt could race a still-running one, and both would
process (and commit) the images neither had committed when they started.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import psutil

from segpipe import layout
from segpipe.io import atomic_write, fs_root, redact, retrying

log = logging.getLogger(__name__)

HEARTBEAT_S = 20.0
TTL_S = 90.0
SETTLE_S = 1.0  # pause between writing the lease and reading it back


class LeaseError(ValueError):
    """Another attempt holds the run."""


class RunLease:
    """Hold the lease of ``run_id`` under ``output`` while inside ``with``."""

    def __init__(self, output: str, run_id: str) -> None:
        self.fs, root = fs_root(output)
        self.output, self.run_id = output, run_id
        self.path = layout.lease(root, run_id)
        self.me = {"attempt": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="segpipe-lease", daemon=True)

    def __enter__(self) -> RunLease:
        held = self._read()
        if held is not None and self._live(held):
            raise LeaseError(self._refusal(held))
        self._write()
        time.sleep(SETTLE_S)
        held = self._read()
        if held is None or held.get("attempt") != self.me["attempt"]:
            raise LeaseError(self._refusal(held or {}))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=HEARTBEAT_S)
        held = self._read()
        if held is not None and held.get("attempt") == self.me["attempt"]:
            self.fs.rm(self.path)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except Exception as exc:  # a missed beat is not fatal; the next one may land
                log.warning("could not renew the lease of run %s: %s", self.run_id, exc)

    def _write(self) -> None:
        atomic_write(self.fs, self.path, json.dumps({**self.me, "heartbeat": time.time()}))

    def _read(self) -> dict[str, Any] | None:
        self.fs.invalidate_cache()
        try:
            data: dict[str, Any] = json.loads(retrying(self.fs.cat_file, self.path))
        except FileNotFoundError:
            return None
        except ValueError:  # unreadable: treat as stale
            return {}
        return data

    def _live(self, held: dict[str, Any]) -> bool:
        if time.time() - float(held.get("heartbeat", 0)) > TTL_S:
            return False
        if held.get("host") == socket.gethostname():
            return psutil.pid_exists(int(held.get("pid", -1)))
        return True

    def _refusal(self, held: dict[str, Any]) -> str:
        age = time.time() - float(held.get("heartbeat", 0))
        return (
            f"run {self.run_id} in {redact(self.output)} is being written by another driver "
            f"(pid {held.get('pid')} on {held.get('host')}, last heartbeat {age:.0f} s ago); "
            f"stop it, or wait for it to end (its lease expires {TTL_S:.0f} s after its last "
            "heartbeat)"
        )
