"""Stopping the driver's main thread from a watcher thread (the error budget, the lease).

``_thread.interrupt_main`` raises KeyboardInterrupt in the main thread by simulating SIGINT,
and does nothing when SIGINT is ignored, as it is in a process that a non-interactive shell
started in the background (``segpipe run ... &``, CI runners, some schedulers).
:class:`Interruptible` installs Python's own SIGINT handler for as long as a watcher may
need it, and puts back the one it found.
"""

from __future__ import annotations

import _thread
import signal
import threading
from typing import Any


class Interruptible:
    """While entered (from the main thread), :func:`interrupt_main` reaches the main thread
    as KeyboardInterrupt even if the process ignores SIGINT. Entered from another thread it
    changes nothing (only the main thread may set signal handlers)."""

    def __init__(self) -> None:
        self._previous: Any = None
        self._replaced = False

    def __enter__(self) -> Interruptible:
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous in (signal.SIG_IGN, signal.SIG_DFL, None):
                self._previous, self._replaced = previous, True
                signal.signal(signal.SIGINT, signal.default_int_handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._replaced:
            self._replaced = False
            signal.signal(signal.SIGINT, self._previous)


def interrupt_main() -> None:
    """Raise KeyboardInterrupt in the main thread (see :class:`Interruptible`)."""
    _thread.interrupt_main()
