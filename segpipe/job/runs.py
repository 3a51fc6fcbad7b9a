"""A run's life cycle around the Ray plan: everything :mod:`segpipe.job.pipeline` does before
and after the cluster work, none of which needs Ray.

1. :func:`prepare` (before the lease): resolve the config (run id, absolute paths), check the
   output (an existing run needs ``resume`` or ``overwrite``; the output must be writable),
   fingerprint the weights, check the manifest and, resuming, that the settings are the same.
2. :func:`begin` (under the lease): list the inputs (or reuse the first attempt's listing),
   delete the old run for ``overwrite``, write the run record, finish or discard what a
   killed attempt left, and gather the committed units that this attempt skips.
3. :func:`finish` or :func:`fail`: the run record's final state and counts. A run whose
   ``images`` rows (with the duplicate input rows dropped) do not add up to what it listed
   ends failed (:class:`IncompleteRunError`); its committed rows stay, for a ``--resume``.

``--resume`` without a run id resumes the output's only unfinished run (:func:`unfinished_run`).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from segpipe import layout
from segpipe.config import SHIPPED_WEIGHTS, RunConfig, TileConfig
from segpipe.core.fingerprints import checked_fingerprint
from segpipe.io import absolute, atomic_write, fs_root, is_local, redact
from segpipe.job.budget import over_budget
from segpipe.job.commit import WriteCounts, delete_run, recover, units
from segpipe.job.inputs import check_manifest, list_images, write_listing
from segpipe.job.record import now, public_config, versions, write_record
from segpipe.job.timeline import Timeline, actor_marks, forget_actor_marks
from segpipe.layout import IMAGES_DIR, TABLES
from segpipe.records import check_schema_versions, read_record, run_records
from segpipe.schema import SCHEMA_VERSION

log = logging.getLogger(__name__)

DELETING = "deleting"  # a run record's status while --overwrite deletes the old run


class OutputError(ValueError):
    """The output location cannot take this run."""


class RunFailedError(RuntimeError):
    """The run ended, or was stopped, as failed: its record says so, what it committed stays
    committed, and ``--resume`` goes on from there. ``summary``: the counts, when it ran to
    its end."""

    def __init__(self, message: str, summary: RunSummary | None = None) -> None:
        super().__init__(message)
        self.summary = summary


class IncompleteRunError(RunFailedError):
    """The run ended without an ``images`` row for every listed image."""


class ErrorRateError(RunFailedError):
    """The run's share of error images was above ``--max-error-rate`` (segpipe/job/budget.py):
    at its end, or (stopped early) in the units the attempt had committed."""


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    output: str
    images: int
    images_ok: int
    images_error: int
    instances: int
    files: int
    duplicates: int
    seconds: float
    tiled_images: int = 0  # images cut into tiles for the model (--tile)
    tiles: int = 0  # their tiles
    resumed: int = 0  # images committed by earlier attempts of the run (--resume)
    skipped: int = 0  # input rows skipped as ok in earlier runs (--skip-done)
    skipped_from: int = 0  # how many earlier runs --skip-done read
    # From the attempt's start (the driver process's) to the first batch out of the model,
    # and the rate from the first batch into the model to the end: the steady state.
    startup_s: float | None = None
    steady_images_per_s: float | None = None
    # Error images by error code, and an example URI of each (WriteCounts').
    errors: dict[str, int] = field(default_factory=dict)
    error_examples: dict[str, str] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        """This attempt's rate: the images it processed over its wall time."""
        done = self.images - self.resumed
        return done / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        earlier = f", {self.resumed} of them from earlier attempts" if self.resumed else ""
        dropped = f", {self.duplicates} duplicate input rows dropped" if self.duplicates else ""
        if self.tiled_images:
            dropped += f", {self.tiled_images} cut into {self.tiles} tiles"
        if self.skipped or self.skipped_from:
            runs_ = f"{self.skipped_from} earlier run{'s' if self.skipped_from != 1 else ''}"
            dropped += f", {self.skipped} skipped as done in {runs_}"
        ranked = sorted(self.errors.items(), key=lambda kv: (-kv[1], kv[0]))
        codes = f"; errors by code: {', '.join(f'{c} {n}' for c, n in ranked)}" if ranked else ""
        return (
            f"run {self.run_id}: {self.images} images ({self.images_ok} ok, "
            f"{self.images_error} error{earlier}){dropped}, {self.instances} instances, "
            f"{self.files} files in {self.seconds:.1f} s ({self.images_per_s:.2f} images/s"
            f"{self._steady()}) -> {redact(self.output)}{codes}"
        )

    def _steady(self) -> str:
        if self.startup_s is None or self.steady_images_per_s is None:
            return ""
        return (
            f"; start-up {self.startup_s:.1f} s to the first batch out of the model, then "
            f"{self.steady_images_per_s:.2f} images/s"
        )


@dataclass
class Attempt:
    """One attempt at a run: its resolved config, what the checks found, and (from
    :func:`begin` on) its record and the work earlier attempts committed."""

    cfg: RunConfig
    previous: dict[str, Any] | None  # the record of an existing run of this id
    weights: dict[str, Any]
    extras: list[str]  # manifest columns carried to the images table
    started: float = field(default_factory=time.monotonic)
    record: dict[str, Any] = field(default_factory=dict)
    prior: WriteCounts = field(default_factory=WriteCounts)
    prior_units: set[str] = field(default_factory=set)  # stems committed by earlier attempts
    done_files: list[str] = field(default_factory=list)  # committed images files to skip
    earlier: EarlierRuns | None = None  # --skip-done: the earlier runs whose ok rows count
    skipped: int = 0  # --skip-done: input rows skipped as done in an earlier run
    listed: int | None = None
    timeline: Timeline = field(default_factory=Timeline)

    @property
    def run_id(self) -> str:
        assert self.cfg.run_id is not None
        return self.cfg.run_id

    def save(self) -> None:
        write_record(self.cfg.output, self.run_id, self.record)


def default_run_id() -> str:
    return "run-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def prepare(cfg: RunConfig, output_checked: Callable[[], None] | None = None) -> Attempt:
    """Every check that can fail before the lease is taken and any cluster work starts.

    ``output_checked`` is called once the quick checks of the output have passed, before the
    slow one (the weights: importing torch takes seconds); the pipeline starts Ray there, so
    that Ray's start overlaps the rest of the checks, the lease and the listing.
    """
    started = time.monotonic()
    timeline = Timeline()
    timeline.mark("prepare")  # from the process's start to here: Python and imports
    if cfg.resume and cfg.run_id is None:
        cfg = replace(cfg, run_id=unfinished_run(cfg.output))
    named = cfg.run_id is not None
    cfg = resolved(cfg)
    previous = check_output(cfg, named)
    if output_checked is not None:
        output_checked()
    # Checking the weights imports torch and torchvision (seconds of CPU, while Ray starts)
    # unless this machine has checked the same weights before.
    weights = checked_fingerprint(cfg.model)
    extras = check_manifest(cfg.manifest, cfg.uri_column) if cfg.manifest else []
    if previous is not None and cfg.resume:
        check_same_settings(cfg, weights, previous)
    timeline.mark("checked")  # the output, the weights' fingerprint, the manifest
    return Attempt(cfg, previous, weights, extras, started, timeline=timeline)


def begin(attempt: Attempt) -> None:
    """Under the run's lease: list, overwrite, write the record, recover, find what to skip."""
    cfg, previous = attempt.cfg, attempt.previous
    _check_unchanged(cfg, previous)
    # Listed before anything of an old run is deleted: a wrong input fails here, harmlessly.
    attempt.listed = _listing(cfg, previous if cfg.resume else None)
    attempt.timeline.mark("listed")
    if previous is not None and cfg.overwrite:
        log.info("--overwrite: deleting run %s from %s", cfg.run_id, redact(cfg.output))
        # A tombstone first: a --resume of a half-deleted run would take it for committed.
        write_record(cfg.output, attempt.run_id, {**previous, "status": DELETING})
        delete_run(
            cfg.output,
            attempt.run_id,
            [layout.metrics("", attempt.run_id), layout.actor_timelines("", attempt.run_id)],
        )
        previous = attempt.previous = None
    attempt.record = {
        "run_id": cfg.run_id,
        "status": "running",
        "started_at": now(),
        "first_started_at": now()
        if previous is None
        else previous.get("first_started_at", previous.get("started_at")),
        "attempts": 1 if previous is None else 1 + int(previous.get("attempts", 1)),
        "schema_version": SCHEMA_VERSION,
        "config": public_config(cfg),
        "versions": versions(),
        "weights": attempt.weights,
        "manifest_columns": attempt.extras,
        "listed_images": attempt.listed,
    }
    attempt.save()
    forget_actor_marks(cfg.output, attempt.run_id)  # an earlier attempt's actors
    recover(cfg.output, attempt.run_id)
    committed = list(units(cfg.output, attempt.run_id))  # one small marker per unit
    attempt.prior = sum((u.counts for u in committed), WriteCounts())
    attempt.prior_units = {u.stem for u in committed}
    if committed:
        log.info(
            "resuming run %s: %d images in %d committed units are skipped",
            cfg.run_id,
            attempt.prior.images,
            len(committed),
        )
    attempt.done_files = [rel for u in committed for rel in u.files[IMAGES_DIR]]
    if cfg.skip_done:
        attempt.earlier = done_in_earlier_runs(
            cfg, attempt.weights, str(attempt.record["first_started_at"])
        )


def _check_unchanged(cfg: RunConfig, previous: dict[str, Any] | None) -> None:
    """:func:`check_output` read the run's state before the lease was taken: under the
    lease, make sure no other driver changed it in between (started, finished or replaced
    the run), so that nothing is decided on a state that is gone."""
    assert cfg.run_id is not None
    fs, root = fs_root(cfg.output)
    fs.invalidate_cache()
    if previous is None:
        changed = fs.exists(layout.record(root, cfg.run_id)) or fs.exists(
            layout.commits(root, cfg.run_id)
        )
    else:
        try:
            current: dict[str, Any] = read_record(cfg.output, cfg.run_id)
        except (FileNotFoundError, ValueError):
            current = {}
        changed = current != previous
    if changed:
        raise OutputError(
            f"run {cfg.run_id} in {redact(cfg.output)} changed while this driver started "
            "(another driver wrote it before this one took its lease); run the command again"
        )


def fail(attempt: Attempt, exc: BaseException) -> None:
    _close_timeline(attempt)
    attempt.record.update(status="failed", finished_at=now(), error=f"{type(exc).__name__}: {exc}")
    attempt.save()


def _close_timeline(attempt: Attempt) -> tuple[float | None, float | None]:
    """Fold the actors' marks into the attempt's timeline and put it in the record; returns
    (start-up seconds, steady-state images/s) where the actors reported."""
    timeline = attempt.timeline
    try:
        actors = timeline.fold(actor_marks(attempt.cfg.output, attempt.run_id))
    except Exception as exc:  # the timeline is for people: never fail a run over it
        log.warning("could not read the actors' timelines: %s: %s", type(exc).__name__, exc)
        actors = 0
    timeline.mark("finished")
    attempt.record["timeline"] = timeline.ordered()
    attempt.record["timeline_actors"] = actors
    marks = timeline.marks
    if "first_batch_out" not in marks or "first_batch_in" not in marks:
        return None, None
    done = attempt.record.get("counts", {}).get("images", 0) - attempt.prior.images
    window = marks["finished"] - marks["first_batch_in"]
    return marks["first_batch_out"], (done / window if window > 0 else None)


def finish(attempt: Attempt, written: WriteCounts) -> RunSummary:
    """The run record's final state, given what this attempt's write tasks committed.

    Every listed image must have its ``images`` row, or have been dropped as a duplicate of
    another listed row: when ``images + duplicates != listed`` the record says failed (with
    the counts) and :class:`IncompleteRunError` is raised. The committed units stay, so a
    ``--resume`` can finish the run once the cause (a listing shard that could not be read,
    say) is gone. A manifest run has no listing count and is not checked here.
    """
    counts = attempt.prior + written
    attempt.record["counts"] = asdict(counts)
    startup, steady = _close_timeline(attempt)
    summary = RunSummary(
        attempt.run_id,
        attempt.cfg.output,
        **asdict(counts),
        seconds=time.monotonic() - attempt.started,
        resumed=attempt.prior.images,
        skipped=attempt.skipped,
        skipped_from=len(attempt.earlier.runs) if attempt.earlier else 0,
        startup_s=startup,
        steady_images_per_s=steady,
    )
    attempt.record.update(
        status="succeeded",
        finished_at=now(),
        counts=asdict(counts),
        resumed_from=asdict(attempt.prior) if attempt.prior.images else None,
        seconds=round(summary.seconds, 3),
        images_per_s=round(summary.images_per_s, 3),
        startup_s=startup,
        steady_images_per_s=None if steady is None else round(steady, 3),
    )
    accounted = counts.images + counts.duplicates + attempt.skipped
    if attempt.listed is not None and accounted != attempt.listed:
        gap = attempt.listed - accounted
        skipped = f", skipped {attempt.skipped} done earlier" if attempt.skipped else ""
        error = (
            f"listed {attempt.listed} images, wrote {counts.images} images rows and dropped "
            f"{counts.duplicates} duplicates{skipped}: {abs(gap)} "
            f"{'missing' if gap > 0 else 'too many'}"
        )
        attempt.record.update(status="failed", error=f"{IncompleteRunError.__name__}: {error}")
        attempt.save()
        raise IncompleteRunError(
            f"run {attempt.run_id} failed: {error}; its committed rows stay, and "
            f"`--resume --run-id {attempt.run_id}` finishes it once the cause is fixed",
            summary,
        )
    over = over_budget(counts, attempt.cfg.max_error_rate)
    if over is not None:
        attempt.record.update(status="failed", error=f"{ErrorRateError.__name__}: {over}")
        attempt.save()
        raise ErrorRateError(
            f"run {attempt.run_id} failed: {over}. Its rows stay committed (the error rows "
            "say what went wrong with each image); to redo them once the cause is fixed, run "
            "again with --overwrite",
            summary,
        )
    attempt.save()
    return summary


UNFINISHED = ("running", "failed")  # the statuses of a run that --resume can finish


def unfinished_run(output: str) -> str:
    """The id of the output's only unfinished run (its record's status running or failed),
    for ``--resume`` without a run id. Reads only the run records under ``_runs/``, never the
    tables. None or several: an OutputError that lists the candidates."""
    output = absolute(output).rstrip("/")
    found = run_records(output)
    unfinished = [r for r in found if r.get("status") in UNFINISHED]
    if len(unfinished) == 1:
        run_id = str(unfinished[0].get("run_id"))
        log.info("--resume: the only unfinished run in %s is %s", redact(output), run_id)
        return run_id
    listed = "; ".join(
        f"{r.get('run_id')} ({r.get('status')}, started {r.get('started_at', '?')})"
        for r in unfinished
    )
    if unfinished:
        problem = f"{len(unfinished)} unfinished runs: {listed}"
    else:
        problem = f"no unfinished run (status running or failed) among its {len(found)} run records"
    raise OutputError(
        f"--resume without --run-id resumes the only unfinished run of {redact(output)}, and "
        f"it has {problem}; pass --run-id NAME to say which run to resume"
    )


@dataclass(frozen=True)
class EarlierRuns:
    """For ``--skip-done``: the earlier runs whose ``ok`` rows this run skips, and their
    committed ``images`` files (relative to the output; one small marker read per unit)."""

    runs: list[str]
    files: list[str]


def done_in_earlier_runs(cfg: RunConfig, weights: dict[str, Any], started: str) -> EarlierRuns:
    """The runs of ``cfg.output`` that began before ``started`` (this run's first start, so
    that a resumed attempt reads the same runs) with the same weights and settings that shape
    an image's rows (:data:`_SAME_ROWS`): their ``ok`` images need not be segmented again.
    Runs that differ are passed over, and the log says why."""
    chosen: list[str] = []
    files: list[str] = []
    for record in run_records(cfg.output):
        run_id = str(record.get("run_id"))
        began = str(record.get("first_started_at") or record.get("started_at") or "")
        if run_id == cfg.run_id or record.get("status") == DELETING or not began < started:
            continue
        changed = settings_changes(cfg, weights, record, _SAME_ROWS)
        if changed:
            log.info(
                "--skip-done: run %s differs (%s); its rows are not reused", run_id, changed[0]
            )
            continue
        chosen.append(run_id)
        files += [rel for u in units(cfg.output, run_id) for rel in u.files[IMAGES_DIR]]
    log.info(
        "--skip-done: images ok in %d earlier runs (%s; %d files) are skipped",
        len(chosen),
        ", ".join(chosen) or "none",
        len(files),
    )
    return EarlierRuns(chosen, files)


def listing_folder(cfg: RunConfig) -> str:
    assert cfg.run_id is not None
    return layout.listing(cfg.output, cfg.run_id)


def _listing(cfg: RunConfig, previous: dict[str, Any] | None) -> int | None:
    """List the inputs into shards (or, resuming, reuse the shards of the first attempt, so
    that files added or removed since do not change what the run covers)."""
    if not cfg.inputs:
        return None
    assert cfg.run_id is not None
    fs, root = fs_root(cfg.output)
    done = layout.listing_done(root, cfg.run_id)
    if previous is not None and fs.exists(done):
        listed = int(json.loads(fs.cat_file(done))["images"])
        log.info("resuming with the listing of the first attempt: %d images", listed)
        return listed
    listed = write_listing(list_images(cfg.inputs, cfg.extensions), listing_folder(cfg))
    atomic_write(fs, done, json.dumps({"images": listed}))
    log.info("listed %d images from %d inputs", listed, len(cfg.inputs))
    return listed


# What shapes an image's rows (keys of the run record's config), beside the weights: two
# runs that agree on these give an image the same rows (--skip-done reuses them).
_SAME_ROWS: tuple[str | tuple[str, ...], ...] = (
    "decode",
    "tiles",
    ("model", "arch"),
    ("model", "min_size"),
    ("model", "max_size"),
    ("model", "score_threshold"),
    ("model", "mask_threshold"),
    ("model", "max_detections"),
    ("model", "categories"),
)
# Settings added after records were first written, as a record without them ran: tiling off.
_ADDED_LATER: dict[tuple[str, ...], Any] = {("tiles",): asdict(TileConfig())}
# What must not change between the attempts of one run.
_SAME_ON_RESUME = ("inputs", "manifest", "uri_column", "extensions", "partition_by", *_SAME_ROWS)


def check_same_settings(cfg: RunConfig, weights: dict[str, Any], previous: dict[str, Any]) -> None:
    """A resumed run must go on as it began: same inputs, layout, model and weights."""
    changed = settings_changes(cfg, weights, previous, _SAME_ON_RESUME)
    if changed:
        raise OutputError(
            f"run {cfg.run_id} began with other settings ({'; '.join(changed)}); resume it "
            "with the same ones, or pass --overwrite to replace it"
        )


def settings_changes(
    cfg: RunConfig,
    weights: dict[str, Any],
    previous: dict[str, Any],
    keys: tuple[str | tuple[str, ...], ...],
) -> list[str]:
    """How ``cfg`` (with ``weights``, its fingerprint) differs from the run of record
    ``previous`` in ``keys`` of the config and in the weights: "key: old -> new" each."""
    before, now_ = previous.get("config") or {}, public_config(cfg)
    changed = []
    for key in keys:
        path = key if isinstance(key, tuple) else (key,)
        old, new = _dig(before, path), _dig(now_, path)
        if old is None and path in _ADDED_LATER:
            old = _ADDED_LATER[path]  # a record from before the setting: its default then
        if isinstance(old, list | tuple) and isinstance(new, list | tuple):
            old, new = list(old), list(new)
        if old != new:
            changed.append(f"{'.'.join(path)}: {old!r} -> {new!r}")
    old_weights = previous.get("weights") or {}
    for key in ("kind", "sha256", "name", "arch", "min_size", "max_size"):
        if key == "name" and weights.get("sha256"):
            continue  # the same bytes under another path are the same weights
        if old_weights.get(key) != weights.get(key):
            changed.append(f"weights.{key}: {old_weights.get(key)!r} -> {weights.get(key)!r}")
    return changed


def _dig(data: dict[str, Any], path: tuple[str, ...]) -> Any:
    for part in path:
        data = data.get(part) if isinstance(data, dict) else None  # type: ignore[assignment]
    return data


def resolved(cfg: RunConfig) -> RunConfig:
    """Fill in the run id and make local paths absolute (workers may run elsewhere)."""
    model = cfg.model
    if model.weights not in SHIPPED_WEIGHTS and os.path.exists(model.weights):
        model = replace(model, weights=absolute(model.weights))
    if model.categories is not None:
        model = replace(model, categories=absolute(model.categories))
    return replace(
        cfg,
        output=absolute(cfg.output).rstrip("/"),
        manifest=absolute(cfg.manifest) if cfg.manifest else None,
        run_id=cfg.run_id or default_run_id(),
        model=model,
    )


def check_output(cfg: RunConfig, named: bool) -> dict[str, Any] | None:
    """Refuse to mix runs, and fail now if the output cannot be written. Returns the record
    of an existing run of this id (which ``resume`` or ``overwrite`` then acts on)."""
    assert cfg.run_id is not None
    fs, root = fs_root(cfg.output)
    previous: dict[str, Any] | None = None
    exists = fs.exists(layout.record(root, cfg.run_id)) or fs.exists(
        layout.commits(root, cfg.run_id)
    )
    if exists:
        if not (cfg.resume or cfg.overwrite):
            raise OutputError(
                f"run {cfg.run_id} already exists in {redact(cfg.output)}; pass --resume to "
                "finish it, --overwrite to replace it, or choose another --run-id"
            )
        try:
            previous = read_record(cfg.output, cfg.run_id)
        except (FileNotFoundError, ValueError):
            previous = {}
        if previous.get("status") == DELETING and cfg.resume:
            raise OutputError(
                f"run {cfg.run_id} was being replaced by --overwrite when that stopped; "
                "pass --overwrite again to finish replacing it"
            )
    used = [d for d in TABLES if fs.exists(layout.table(root, d))]
    if used:  # one schema major per output: its views read every run's files together
        check_schema_versions(cfg.output)
    if used and not named:
        raise OutputError(
            f"{redact(cfg.output)} already holds results; pass --run-id NAME to add a run "
            "beside them, or choose an empty output"
        )
    _probe_write(fs, root, cfg.output)
    return previous


def _probe_write(fs: Any, root: str, output: str) -> None:
    runs = f"{root}/{layout.RUNS_DIR}"
    probe = f"{runs}/.write-probe-{uuid.uuid4().hex}"
    try:
        if is_local(fs):  # object stores have no folders (and no bucket is made here)
            fs.makedirs(runs, exist_ok=True)
        fs.pipe_file(probe, b"")
        fs.rm(probe)
    except Exception as exc:
        raise OutputError(
            f"cannot write to output {redact(output)}: {type(exc).__name__}: {exc}"
        ) from exc
