"""A run's life cycle around the Ray plan: everything :mod:`segpipe.job.pipeline` does before
and after the cluster work, none of which needs Ray.

1. :func:`prepare` (before the lease): resolve the config (run id, absolute paths), check the
   output (an existing run needs ``resume`` or ``overwrite``; the output must be writable),
   fingerprint the weights, check the manifest and, resuming, that the settings are the same.
2. :func:`begin` (under the lease): list the inputs (or reuse the first attempt's listing),
   delete the old run for ``overwrite``, write the run record, finish or discard what a
   killed attempt left, and gather the committed units that this attempt skips.
3. :func:`finish` or :func:`fail`: the run record's final state and counts.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from segpipe import layout
from segpipe.config import RunConfig
from segpipe.io import absolute, atomic_write, fs_root, is_local, redact
from segpipe.job.commit import WriteCounts, delete_run, recover, units
from segpipe.job.inputs import check_manifest, list_images, write_listing
from segpipe.job.record import now, public_config, read_record, versions, write_record
from segpipe.layout import IMAGES_DIR, TABLES

log = logging.getLogger(__name__)

DELETING = "deleting"  # a run record's status while --overwrite deletes the old run


class OutputError(ValueError):
    """The output location cannot take this run."""


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    output: str
    images: int
    images_ok: int
    images_error: int
    instances: int
    files: int
    seconds: float
    resumed: int = 0  # images committed by earlier attempts of the run (--resume)

    @property
    def images_per_s(self) -> float:
        """This attempt's rate: the images it processed over its wall time."""
        done = self.images - self.resumed
        return done / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        earlier = f", {self.resumed} of them from earlier attempts" if self.resumed else ""
        return (
            f"run {self.run_id}: {self.images} images ({self.images_ok} ok, "
            f"{self.images_error} error{earlier}), {self.instances} instances, {self.files} "
            f"files in {self.seconds:.1f} s ({self.images_per_s:.2f} images/s) -> "
            f"{redact(self.output)}"
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
    done_files: list[str] = field(default_factory=list)  # committed images files to skip
    listed: int | None = None

    @property
    def run_id(self) -> str:
        assert self.cfg.run_id is not None
        return self.cfg.run_id

    def save(self) -> None:
        write_record(self.cfg.output, self.run_id, self.record)


def default_run_id() -> str:
    return "run-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def prepare(cfg: RunConfig) -> Attempt:
    """Every check that can fail before the lease is taken and any cluster work starts."""
    started = time.monotonic()
    named = cfg.run_id is not None
    cfg = resolved(cfg)
    previous = check_output(cfg, named)
    # The model module (torch, torchvision: ~450 MB and seconds to import) is imported here,
    # on the driver only: CPU workers unpickle the job's steps and must not load torch.
    from segpipe.core.weights import fingerprint_weights

    weights = fingerprint_weights(cfg.model)
    extras = check_manifest(cfg.manifest, cfg.uri_column) if cfg.manifest else []
    if previous is not None and cfg.resume:
        check_same_settings(cfg, weights, previous)
    return Attempt(cfg, previous, weights, extras, started)


def begin(attempt: Attempt) -> None:
    """Under the run's lease: list, overwrite, write the record, recover, find what to skip."""
    cfg, previous = attempt.cfg, attempt.previous
    # Listed before anything of an old run is deleted: a wrong input fails here, harmlessly.
    attempt.listed = _listing(cfg, previous if cfg.resume else None)
    if previous is not None and cfg.overwrite:
        log.info("--overwrite: deleting run %s from %s", cfg.run_id, redact(cfg.output))
        # A tombstone first: a --resume of a half-deleted run would take it for committed.
        write_record(cfg.output, attempt.run_id, {**previous, "status": DELETING})
        delete_run(cfg.output, attempt.run_id, [layout.metrics("", attempt.run_id)])
        previous = attempt.previous = None
    attempt.record = {
        "run_id": cfg.run_id,
        "status": "running",
        "started_at": now(),
        "first_started_at": now()
        if previous is None
        else previous.get("first_started_at", previous.get("started_at")),
        "attempts": 1 if previous is None else 1 + int(previous.get("attempts", 1)),
        "config": public_config(cfg),
        "versions": versions(),
        "weights": attempt.weights,
        "manifest_columns": attempt.extras,
        "listed_images": attempt.listed,
    }
    attempt.save()
    recover(cfg.output, attempt.run_id)
    committed = list(units(cfg.output, attempt.run_id))  # one small marker per unit
    attempt.prior = sum((u.counts for u in committed), WriteCounts())
    if committed:
        log.info(
            "resuming run %s: %d images in %d committed units are skipped",
            cfg.run_id,
            attempt.prior.images,
            len(committed),
        )
    attempt.done_files = [rel for u in committed for rel in u.files[IMAGES_DIR]]


def fail(attempt: Attempt, exc: BaseException) -> None:
    attempt.record.update(status="failed", finished_at=now(), error=f"{type(exc).__name__}: {exc}")
    attempt.save()


def finish(attempt: Attempt, written: WriteCounts) -> RunSummary:
    """The run record's final state, given what this attempt's write tasks committed."""
    counts = attempt.prior + written
    summary = RunSummary(
        attempt.run_id,
        attempt.cfg.output,
        **asdict(counts),
        seconds=time.monotonic() - attempt.started,
        resumed=attempt.prior.images,
    )
    if attempt.listed is not None and counts.images != attempt.listed:
        log.error(
            "listed %d images but the run holds %d images rows", attempt.listed, counts.images
        )
    attempt.record.update(
        status="succeeded",
        finished_at=now(),
        counts=asdict(counts),
        resumed_from=asdict(attempt.prior) if attempt.prior.images else None,
        seconds=round(summary.seconds, 3),
        images_per_s=round(summary.images_per_s, 3),
    )
    attempt.save()
    return summary


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


# What must not change between the attempts of one run (keys of the run record's config).
_SAME_ON_RESUME = (
    "inputs",
    "manifest",
    "uri_column",
    "extensions",
    "partition_by",
    "decode",
    ("model", "arch"),
    ("model", "min_size"),
    ("model", "max_size"),
    ("model", "score_threshold"),
    ("model", "mask_threshold"),
    ("model", "max_detections"),
    ("model", "categories"),
)


def check_same_settings(cfg: RunConfig, weights: dict[str, Any], previous: dict[str, Any]) -> None:
    """A resumed run must go on as it began: same inputs, layout, model and weights."""
    before, now_ = previous.get("config") or {}, public_config(cfg)
    changed = []
    for key in _SAME_ON_RESUME:
        path = key if isinstance(key, tuple) else (key,)
        old, new = _dig(before, path), _dig(now_, path)
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
    if changed:
        raise OutputError(
            f"run {cfg.run_id} began with other settings ({'; '.join(changed)}); resume it "
            "with the same ones, or pass --overwrite to replace it"
        )


def _dig(data: dict[str, Any], path: tuple[str, ...]) -> Any:
    for part in path:
        data = data.get(part) if isinstance(data, dict) else None  # type: ignore[assignment]
    return data


def resolved(cfg: RunConfig) -> RunConfig:
    """Fill in the run id and make local paths absolute (workers may run elsewhere)."""
    from segpipe.core.weights import SHIPPED_WEIGHTS

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
