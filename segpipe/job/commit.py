"""The commit protocol: how a unit of rows becomes visible in the tables, exactly once.

A *unit* is what one write task holds: the per-image rows of some images, written as one
``images`` file and one ``instances`` file per partition. Its name (``stem``) is a hash of the
run id and its image ids, so a retried write task finds the marker of its earlier try and
keeps that first commit instead of writing again.

Steps, for unit ``S`` of run ``R`` under ``<output>``::

    1. stage    <output>/_staging/R/S/{images,instances}/<partition dirs>/S-<k>-0.parquet
    2. commit   <output>/_commits/R/S.json       (the files and counts; one atomic PUT)
    3. publish  move each staged images file to <output>/images/..., then the instances files
    4. clean    delete <output>/_staging/R/S/

The marker is written create-only (:mod:`segpipe.job.conditional`), after the write task has
checked that its attempt still holds the run's lease (:func:`segpipe.job.lease.check_holder`):
of two writers of one unit the store lets exactly one commit, and a driver that lost its
lease commits nothing more. Recovery claims an uncommitted unit the same way, by writing a
*discard* marker create-only before it deletes the staging: a writer that had passed its
checks then finds the marker taken and fails, instead of committing files that are gone.

Readers (DuckDB, Spark, Athena, Trino) read only ``images/`` and ``instances/``, so they never
see a staged file, however partial. A file appears in a table in one step: a rename on a local
disk, a server-side copy on S3 (an object becomes visible only once whole; S3 has no rename,
but it never shows a partial object). Images files are published before instances files, so
an instance row is never visible before its image's row. The commit marker (step 2) is the
point of no return: a unit with a marker is finished by :func:`recover` (steps 3-4, which are
idempotent); a unit without one is deleted by it, and its images are processed again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass, field, fields

import fsspec

from segpipe import layout
from segpipe.io import fs_root, is_local, redact, retrying
from segpipe.job.conditional import create_only
from segpipe.job.lease import LeaseLostError, check_holder
from segpipe.layout import TABLES

log = logging.getLogger(__name__)


@dataclass
class WriteCounts:
    """What one unit (or, summed, a whole run) put in the tables."""

    images: int = 0
    images_ok: int = 0
    images_error: int = 0
    instances: int = 0
    files: int = 0
    # Input rows dropped because another row named the same image (same image_id): a
    # manifest that repeats a URI, or overlapping --input prefixes. Not images rows.
    duplicates: int = 0
    # Images cut into tiles for the model (--tile), and their tiles all together.
    tiled_images: int = 0
    tiles: int = 0
    # Error images by error code, and for each code its smallest URI (an example that does
    # not depend on which task wrote what). Markers written before these existed lack them.
    errors: dict[str, int] = field(default_factory=dict)
    error_examples: dict[str, str] = field(default_factory=dict)

    def __add__(self, other: WriteCounts) -> WriteCounts:
        numbers = {
            f.name: getattr(self, f.name) + getattr(other, f.name)
            for f in fields(self)
            if f.type in (int, "int")
        }
        errors = dict(self.errors)
        for code, n in other.errors.items():
            errors[code] = errors.get(code, 0) + n
        examples = dict(self.error_examples)
        for code, uri in other.error_examples.items():
            examples[code] = min(uri, examples.get(code, uri))
        return WriteCounts(**numbers, errors=errors, error_examples=examples)


@dataclass
class Unit:
    """One committed unit: its files (relative to the output) per table, and its counts."""

    run_id: str
    stem: str
    files: dict[str, list[str]] = field(default_factory=dict)
    counts: WriteCounts = field(default_factory=WriteCounts)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Unit:
        data = json.loads(text)
        return cls(data["run_id"], data["stem"], data["files"], WriteCounts(**data["counts"]))


DISCARDED = "discarded"  # the key of a discard marker


def discarded(text: str) -> bool:
    """Whether a marker's text is a discard marker (recovery's claim on an uncommitted unit)."""
    return bool(json.loads(text).get(DISCARDED))


def commit_unit(output: str, unit: Unit, attempt: str | None = None) -> Unit:
    """Steps 2-4 for a unit whose files are staged under :func:`staging_root`; returns the
    unit that is committed (another try's, if one committed this unit first). ``attempt``:
    the attempt that must still hold the run's lease (None: no lease, as in unit tests)."""
    fs, root = fs_root(output)
    staged = _staged_files(fs, root, unit)
    for rel in (r for table in TABLES for r in unit.files.get(table, [])):
        if rel not in staged:  # a recovery discarded this staging
            raise RuntimeError(f"unit {unit.stem} of run {unit.run_id}: staged {rel} is gone")
    if attempt is not None:
        check_holder(output, unit.run_id, attempt)
    path = layout.marker(root, unit.run_id, unit.stem)
    if not create_only(fs, path, unit.to_json()):
        text = retrying(fs.cat_file, path).decode()
        if discarded(text):
            raise LeaseLostError(
                f"unit {unit.stem} of run {unit.run_id} was discarded by a newer attempt's "
                "recovery; not committing it"
            )
        first = Unit.from_json(text)  # ours, if a retried request landed twice
        publish(fs, root, first)
        return first
    publish(fs, root, unit, staged)
    return unit


def committed_unit(output: str, run_id: str, stem: str) -> Unit | None:
    """The unit's marker, if it was committed already (by an earlier try of the same task)."""
    fs, root = fs_root(output)
    path = layout.marker(root, run_id, stem)
    try:
        text = retrying(fs.cat_file, path).decode()
    except FileNotFoundError:
        return None
    return None if discarded(text) else Unit.from_json(text)


def publish_committed(output: str, unit: Unit) -> None:
    publish(*fs_root(output), unit)


def _staged_files(fs: fsspec.AbstractFileSystem, root: str, unit: Unit) -> set[str]:
    """The unit's staged files still there, relative to its staging folder (one listing)."""
    staged = layout.staged_unit(root, unit.run_id, unit.stem)
    return {path[len(staged) + 1 :] for path in retrying(fs.find, staged)}


def publish(
    fs: fsspec.AbstractFileSystem, root: str, unit: Unit, present: set[str] | None = None
) -> None:
    """Move a committed unit's staged files into the tables (images first); idempotent.
    ``present``: the staged files, when the caller has just listed them."""
    staged = layout.staged_unit(root, unit.run_id, unit.stem)
    if present is None:
        present = _staged_files(fs, root, unit)
    for table in TABLES:
        for rel in unit.files.get(table, []):
            source, target = f"{staged}/{rel}", f"{root}/{rel}"
            if rel in present:
                move(fs, source, target)
            elif not retrying(fs.exists, target):
                raise RuntimeError(
                    f"unit {unit.stem} of run {unit.run_id}: {rel} is neither staged nor published"
                )
    with contextlib.suppress(FileNotFoundError):  # on S3 the moves may have emptied it
        retrying(fs.rm, staged, recursive=True)


def move(fs: fsspec.AbstractFileSystem, source: str, target: str) -> None:
    """Make ``target`` appear whole, then remove ``source``. A rename on a local disk; on an
    object store a server-side copy (the object appears only when complete) and a delete,
    retried separately, so that a delete whose answer was lost is not taken for a failure."""
    if is_local(fs):
        fs.makedirs(posixpath.dirname(target), exist_ok=True)
        retrying(fs.mv, source, target)
        return
    retrying(fs.copy, source, target)
    with contextlib.suppress(FileNotFoundError):
        retrying(fs.rm, source)


def units(
    output: str, run_id: str, chunk: int = 1000, skip: Collection[str] = ()
) -> Iterator[Unit]:
    """The committed units of a run, read from their markers (one small object each; read
    ``chunk`` at a time, concurrently where the filesystem can), but for the units whose
    stems are in ``skip`` (not read at all)."""
    fs, root = fs_root(output)
    folder = layout.commits(root, run_id)
    fs.invalidate_cache()  # listings cached earlier in this process may be stale
    if not fs.exists(folder):
        return
    paths = sorted(
        p
        for p in fs.find(folder)
        if p.endswith(".json") and posixpath.basename(p)[: -len(".json")] not in skip
    )
    for start in range(0, len(paths), chunk):
        found = retrying(fs.cat, paths[start : start + chunk])
        for path in paths[start : start + chunk]:
            text = found[path].decode()
            if not discarded(text):
                yield Unit.from_json(text)


def recover(output: str, run_id: str) -> tuple[int, int]:
    """Finish what a killed attempt left: publish committed units still staged, delete
    uncommitted ones. Returns (units finished, units discarded)."""
    fs, root = fs_root(output)
    folder = layout.staging(root, run_id)
    finished = dropped = 0
    fs.invalidate_cache()
    if not fs.exists(folder):
        return 0, 0
    for staged in sorted(fs.ls(folder, detail=False)):
        stem = posixpath.basename(staged.rstrip("/"))
        marker = layout.marker(root, run_id, stem)
        claim = json.dumps({DISCARDED: True, "run_id": run_id, "stem": stem})
        # A writer may be between its checks and its marker: whichever marker the store
        # takes first decides. Ours (discard) makes its commit fail; its own gets published.
        if not create_only(fs, marker, claim):
            text = retrying(fs.cat_file, marker).decode()
            if not discarded(text):
                publish(fs, root, Unit.from_json(text))
                finished += 1
                continue
        with contextlib.suppress(FileNotFoundError):
            retrying(fs.rm, staged, recursive=True)
        dropped += 1
    if finished or dropped:
        log.info(
            "recovered run %s in %s: %d committed units published, %d uncommitted discarded",
            run_id,
            redact(output),
            finished,
            dropped,
        )
    return finished, dropped


def delete_run(output: str, run_id: str, extra: list[str]) -> None:
    """Remove a run's rows and bookkeeping: its instances files, then its images files (so
    that no instance is ever left without its image), then its markers and staging, then
    ``extra`` (paths relative to the output: the run record, the listing, ...)."""
    fs, root = fs_root(output)
    listed = list(units(output, run_id))
    for table in reversed(TABLES):
        paths = [f"{root}/{rel}" for unit in listed for rel in unit.files.get(table, [])]
        for start in range(0, len(paths), 1000):  # bulk deletes (S3: 1000 keys a request)
            with contextlib.suppress(FileNotFoundError):
                retrying(fs.rm, paths[start : start + 1000])
        # Files of a run partitioned by run_id that no marker names (older layouts).
        folder = f"{layout.table(root, table)}/run_id={run_id}"
        if fs.exists(folder):
            fs.rm(folder, recursive=True)
    for rel in (layout.staging("", run_id), layout.commits("", run_id), *extra):
        if fs.exists(f"{root}/{rel}"):
            fs.rm(f"{root}/{rel}", recursive=True)
