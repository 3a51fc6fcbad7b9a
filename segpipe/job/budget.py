"""The error budget: a run whose images mostly fail ends failed, and stops early.

Failures are data (a bad image is an error row, never a crash), but a run in which most
images fail (workers without the driver's credentials, a manifest with a wrong prefix, a
broken GPU) is a failed run, not a succeeded one. Two checks against
``RunConfig.max_error_rate`` (share of ``images`` rows with status ``error``; 1 turns both
off):

- at the end (:func:`over_budget`, from ``runs.finish``): the whole run, this attempt's
  units and earlier attempts' together. Above the rate the record says failed and
  ``segpipe run`` exits 1;
- while it runs (:class:`ErrorWatch`): a driver thread reads the commit markers of the units
  this attempt commits (each names its error codes and counts, ``WriteCounts.errors``).
  Once they hold ``error_check_after`` images and their share of errors is above the rate,
  it interrupts the driver's main thread, which stops the job (Ray Data cancels its tasks
  and actors) and fails the run. Only this attempt's own units count, so that a
  ``--resume`` after the cause was fixed is not stopped by the errors committed before.

What was committed stays committed either way; ``--resume`` goes on from there.
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType

from segpipe.io import redact
from segpipe.job.commit import WriteCounts, units
from segpipe.job.interrupt import Interruptible, interrupt_main

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 10.0  # between two readings of the commit markers


def over_budget(counts: WriteCounts, max_error_rate: float) -> str | None:
    """Why ``counts`` are over the budget (for a message), or None when within it."""
    if counts.images == 0 or counts.images_error / counts.images <= max_error_rate:
        return None
    return (
        f"{counts.images_error} of {counts.images} images are errors "
        f"({counts.images_error / counts.images:.1%}, above --max-error-rate "
        f"{max_error_rate:g}): {describe_errors(counts)}"
    )


def describe_errors(counts: WriteCounts, top: int = 3) -> str:
    """The most common error codes with their counts and an example URI each."""
    ranked = sorted(counts.errors.items(), key=lambda kv: (-kv[1], kv[0]))
    parts = [f"{code or 'unknown'} {n}{_example(counts, code)}" for code, n in ranked[:top]]
    if len(ranked) > top:
        parts.append(f"{len(ranked) - top} more codes")
    return ", ".join(parts) if parts else "no error codes recorded"


def _example(counts: WriteCounts, code: str) -> str:
    uri = counts.error_examples.get(code)
    return f" (e.g. {redact(uri)})" if uri else ""


class ErrorWatch:
    """While the ``with`` block runs: reads the run's new commit markers every ``interval``
    seconds and, once this attempt's units hold ``after`` images with a share of errors
    above ``max_error_rate``, sets :attr:`stopped` (the reason) and interrupts the main
    thread (a KeyboardInterrupt there, which the caller turns into a failed run)."""

    def __init__(
        self,
        output: str,
        run_id: str,
        max_error_rate: float,
        after: int,
        earlier: set[str],
        interval: float | None = None,
    ) -> None:
        self.output, self.run_id = output, run_id
        self.max_error_rate, self.after = max_error_rate, after
        self.interval = WATCH_INTERVAL_S if interval is None else interval
        self.seen = set(earlier)  # stems of units committed before this attempt
        self.counts = WriteCounts()  # of this attempt's units read so far
        self.stopped: str | None = None
        self._armed = False
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="error-watch", daemon=True)
        self._interruptible = Interruptible()

    def __enter__(self) -> ErrorWatch:
        if self.max_error_rate < 1.0:
            self._interruptible.__enter__()
            self._armed = True
            self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with self._lock:
            self._armed = False
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()
        self._interruptible.__exit__()

    def _watch(self) -> None:
        while not self._done.wait(self.interval):
            try:
                self.read_new()
            except Exception as exc:  # a slow or flaky store must not stop the job
                log.warning("error budget: could not read the commit markers: %s", exc)
                continue
            reason = self.check()
            if reason is None:
                continue
            with self._lock:
                if not self._armed:
                    return
                self.stopped = reason
                self._armed = False
                log.error("run %s: stopping early: %s", self.run_id, reason)
                interrupt_main()
            return

    def read_new(self) -> None:
        """Add the counts of the markers committed since the last reading."""
        for unit in units(self.output, self.run_id, skip=self.seen):
            self.counts = self.counts + unit.counts
            self.seen.add(unit.stem)

    def check(self) -> str | None:
        """The reason to stop, once enough of this attempt's images are committed."""
        if self.counts.images < self.after:
            return None
        reason = over_budget(self.counts, self.max_error_rate)
        if reason is None:
            return None
        return f"{reason}, in the units this attempt committed so far"
