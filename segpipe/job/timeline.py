"""When each step of an attempt happened: the run record's ``timeline``.

The driver marks its own steps (checks, lease, listing, Ray start, plan start, end). It
cannot see inside the model actors, so each actor writes its own marks (constructed; model
loaded, with torch imported and the weights read; first batch in and out) once, to one small
file under ``_runs/<run_id>.actors/``, and the driver folds the earliest of each into the
record when the attempt ends. Marks are seconds since the attempt's driver process started,
by the wall clock; marks from other nodes carry those nodes' clock skew (well under a second
where NTP runs, as on managed clusters).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import psutil

from segpipe import layout
from segpipe.io import atomic_write, fs_root

log = logging.getLogger(__name__)

# The actor marks, in the order they happen.
ACTOR_MARKS = (
    "worker_started",
    "actor_started",
    "torch_imported",
    "model_loaded",
    "first_batch_in",
    "first_batch_out",
)


def process_started() -> float:
    """This process's start, by the wall clock (seconds since the epoch)."""
    return float(psutil.Process().create_time())


@dataclass
class Timeline:
    """Marks of one attempt, in seconds since ``origin`` (wall clock, seconds since the
    epoch; by default the driver process's start, so imports count)."""

    origin: float = field(default_factory=process_started)
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str, at: float | None = None) -> None:
        """Record ``name`` now (or at wall time ``at``); the first mark of a name stays."""
        if name not in self.marks:
            self.marks[name] = round((time.time() if at is None else at) - self.origin, 3)

    def fold(self, marks: Iterable[dict[str, float]]) -> int:
        """Add the earliest of each actor mark over ``marks`` (wall-clock times); returns how
        many actors reported."""
        reported = 0
        for one in marks:
            reported += 1
            for name in ACTOR_MARKS:
                if name in one:
                    at = round(one[name] - self.origin, 3)
                    self.marks[name] = min(self.marks.get(name, at), at)
        return reported

    def ordered(self) -> dict[str, float]:
        return dict(sorted(self.marks.items(), key=lambda kv: kv[1]))


class ActorMarks:
    """A model actor's marks, written once to the output after its first batch."""

    def __init__(self, output: str, run_id: str) -> None:
        self.output, self.run_id = output, run_id
        # The worker process may be older than the actor: Ray hands actors pre-started
        # workers when it has them (worker_started is then before the plan started).
        self.marks: dict[str, float] = {
            "worker_started": process_started(),
            "actor_started": time.time(),
        }
        self.written = False

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, time.time())

    def write(self) -> None:
        """Write the marks (once); a failure is logged, never raised: the timeline is for
        people, and must not fail a batch."""
        if self.written:
            return
        self.written = True
        name = f"{socket.gethostname()}-{os.getpid()}.json"
        try:
            fs, root = fs_root(layout.actor_timelines(self.output, self.run_id))
            atomic_write(fs, f"{root}/{name}", json.dumps(self.marks))
        except Exception as exc:
            log.warning("could not write the actor's timeline: %s: %s", type(exc).__name__, exc)


def actor_marks(output: str, run_id: str) -> list[dict[str, float]]:
    """Every actor's marks for the run (one small file per actor)."""
    fs, root = fs_root(layout.actor_timelines(output, run_id))
    fs.invalidate_cache()
    if not fs.exists(root):
        return []
    paths = [p for p in fs.find(root) if p.endswith(".json")]
    found = fs.cat(paths) if paths else {}
    return [json.loads(found[p]) for p in paths]


def forget_actor_marks(output: str, run_id: str) -> None:
    """Remove an earlier attempt's actor marks, so that this attempt's timeline is its own."""
    fs, root = fs_root(layout.actor_timelines(output, run_id))
    if fs.exists(root):
        fs.rm(root, recursive=True)
