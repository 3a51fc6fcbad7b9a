"""One driver per run at a time: a lease object beside the run record.

``<output>/_runs/<run_id>.lease.json`` names the attempt that writes the run (a random id,
host, pid). Every write of it is conditional (:mod:`segpipe.job.conditional`), so the store
decides every race:

- taking it: create-only when there is none; when there is one, it must be stale, and is
  replaced only if it is still the version that was judged stale. Of two drivers starting
  together, or taking over the same stale lease together, exactly one wins; the other is
  refused.
- stale: its last write is more than ``TTL_S`` old by the store's clock (a probe object's
  modification time against the lease's), or it names a process on this host that no longer
  exists (a killed driver).
- the heartbeat rewrites it every ``HEARTBEAT_S``, only if it is still the version this
  driver wrote last. If it is not (another driver took it over), or no renewal has
  succeeded for ``TTL_S - HEARTBEAT_S`` seconds of this process's monotonic clock (the store
  unreachable, or the whole process paused: a SIGSTOP, a frozen VM), the lease is *lost*:
  :attr:`RunLease.lost` says why and the main thread is interrupted, so the job stops.
- each write task checks the lease (:func:`check_holder`) before it writes a commit marker,
  so the tasks of a driver that lost its lease commit nothing more.
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

import fsspec
import psutil

from segpipe import layout
from segpipe.io import fs_root, redact, retrying
from segpipe.job.conditional import Stored, create_only, replace_if, store_time, version_of
from segpipe.job.interrupt import Interruptible, interrupt_main

log = logging.getLogger(__name__)

HEARTBEAT_S = 20.0
TTL_S = 90.0


class LeaseError(ValueError):
    """Another attempt holds the run."""


class LeaseLostError(RuntimeError):
    """This attempt no longer holds the run: it must stop and commit nothing more."""


class RunLease:
    """Hold the lease of ``run_id`` under ``output`` while inside ``with``; ``ttl_s`` and
    ``heartbeat_s`` are for tests."""

    def __init__(
        self, output: str, run_id: str, ttl_s: float = TTL_S, heartbeat_s: float = HEARTBEAT_S
    ) -> None:
        self.fs, root = fs_root(output)
        self.output, self.run_id = output, run_id
        self.path = layout.lease(root, run_id)
        self.clock = layout.lease_clock(root, run_id)
        self.ttl_s, self.heartbeat_s = ttl_s, heartbeat_s
        self.attempt = uuid.uuid4().hex
        self.me = {"attempt": self.attempt, "host": socket.gethostname(), "pid": os.getpid()}
        self.lost: str | None = None
        self._version: str | None = None
        self._renewed = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="segpipe-lease", daemon=True)
        self._interruptible = Interruptible()

    def __enter__(self) -> RunLease:
        self._acquire()
        self._renewed = time.monotonic()
        self._interruptible.__enter__()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.heartbeat_s)
        self._interruptible.__exit__()
        if self.lost is None and self._version is not None:
            # Release: only the version this driver wrote (a taker-over's stays).
            try:
                current = version_of(self.fs, self.path)
                if current is not None and current.version == self._version:
                    retrying(self.fs.rm, self.path)
            except Exception as exc:  # it expires by itself; don't hide why the run ended
                log.warning("could not release the lease of run %s: %s", self.run_id, exc)

    def check(self) -> None:
        """Raise :class:`LeaseLostError` if the lease is lost: found so by the heartbeat, or
        now (overdue, or another attempt's), before the driver writes the run's record."""
        if self.lost is None and self._version is not None:
            silent = time.monotonic() - self._renewed
            if silent > self.ttl_s - self.heartbeat_s:
                self.lost = f"the lease of run {self.run_id} was not renewed for {silent:.0f} s"
            elif self._read().get("attempt") != self.attempt:
                self.lost = f"another driver took over the lease of run {self.run_id}"
        if self.lost is not None:
            raise LeaseLostError(self.lost)

    # -- taking it

    def _acquire(self) -> None:
        for _ in range(3):
            current = version_of(self.fs, self.path)
            if current is None:
                if self._write_new(create=True):
                    return
                continue  # another driver created it in between: judge that one
            held = self._read()
            if self._live(current, held):
                raise LeaseError(self._refusal(held, current))
            log.warning(
                "run %s: taking over a stale lease (attempt %s, pid %s on %s)",
                self.run_id,
                held.get("attempt"),
                held.get("pid"),
                held.get("host"),
            )
            if self._write_new(create=False, over=current.version):
                return
        raise LeaseError(
            f"run {self.run_id} in {redact(self.output)}: another driver took the lease at "
            "the same moment; try again, or let that one run"
        )

    def _write_new(self, create: bool, over: str | None = None) -> bool:
        text, beat = self._text()
        if create:
            won = create_only(self.fs, self.path, text)
        else:
            assert over is not None
            won = replace_if(self.fs, self.path, text, over)
        # A retried request whose first try landed is refused by its own write: ours then.
        if not won and self._read().get("beat") != beat:
            return False
        written = version_of(self.fs, self.path)
        if written is None:
            return False
        self._version = written.version
        return True

    def _text(self) -> tuple[str, str]:
        beat = uuid.uuid4().hex  # tells this write from any other, ours or not
        return json.dumps({**self.me, "beat": beat, "heartbeat": time.time()}), beat

    def _live(self, current: Stored, held: dict[str, Any]) -> bool:
        if held.get("host") == socket.gethostname() and not psutil.pid_exists(
            int(held.get("pid", -1))
        ):
            return False
        return store_time(self.fs, self.clock) - current.modified <= self.ttl_s

    # -- keeping it

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if self._overdue():
                return
            try:
                if self._renew():
                    self._renewed = time.monotonic()
                else:
                    self._lose(f"another driver took over the lease of run {self.run_id}")
                    return
            except Exception as exc:  # a missed beat is not fatal until the TTL is near
                log.warning("could not renew the lease of run %s: %s", self.run_id, exc)
                if self._overdue():
                    return

    def _overdue(self) -> bool:
        """Lost once no renewal has landed for ``ttl_s - heartbeat_s``: by then another
        driver may judge the lease stale."""
        silent = time.monotonic() - self._renewed
        if silent <= self.ttl_s - self.heartbeat_s:
            return False
        self._lose(
            f"the lease of run {self.run_id} was not renewed for {silent:.0f} s (the store "
            f"unreachable, or this process paused); another driver may have taken it over"
        )
        return True

    def _renew(self) -> bool:
        assert self._version is not None
        text, beat = self._text()
        replaced = replace_if(self.fs, self.path, text, self._version)
        if not replaced and self._read().get("beat") != beat:
            return False  # not ours any more
        written = version_of(self.fs, self.path)
        if written is None:
            return False
        self._version = written.version
        return True

    def _lose(self, why: str) -> None:
        self.lost = why
        log.error("%s: stopping this driver; it commits nothing more", why)
        interrupt_main()

    # -- reading it

    def _read(self) -> dict[str, Any]:
        return read_lease(self.fs, self.path)

    def _refusal(self, held: dict[str, Any], current: Stored) -> str:
        age = store_time(self.fs, self.clock) - current.modified
        return (
            f"run {self.run_id} in {redact(self.output)} is being written by another driver "
            f"(pid {held.get('pid')} on {held.get('host')}, lease renewed {age:.0f} s ago); "
            f"stop it, or wait for it to end (its lease expires {self.ttl_s:.0f} s after its "
            "last renewal)"
        )


def read_lease(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any]:
    """The lease's content; {} when there is none or it is unreadable."""
    fs.invalidate_cache(path)
    try:
        data = json.loads(retrying(fs.cat_file, path))
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_holder(output: str, run_id: str, attempt: str) -> None:
    """Raise :class:`LeaseLostError` unless attempt ``attempt`` holds the run's lease: a
    write task's last check before its commit marker."""
    fs, root = fs_root(output)
    held = read_lease(fs, layout.lease(root, run_id))
    if held.get("attempt") != attempt:
        raise LeaseLostError(
            f"run {run_id}: this attempt ({attempt[:8]}) no longer holds the lease "
            f"(held by {str(held.get('attempt', 'nobody'))[:8]}); not committing"
        )
