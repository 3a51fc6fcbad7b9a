"""The distributed job: the only module that imports ray.

Plan (Ray Data, streaming end to end; no step holds the whole dataset)::

    URIs (listing shards or manifest)                       read_parquet / read_csv / read_text
      -> prepare_manifest_batch                             tasks: rename, strip, drop blanks
      -> repartition(target_num_rows_per_block=load_batch)  small blocks, so decoding spreads
      -> load_batch                                         CPU tasks: read bytes + decode
      -> Segment                                            actor pool: Mask R-CNN, GPU if any
      -> encode_rows                                        CPU tasks: mask windows -> COCO RLE
      -> _TablesSink                                        write tasks: Parquet, both tables

Each write task gets at least ``images_per_file`` images, which bounds the number of files
to about ``images / images_per_file`` per table and partition.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from functools import partial
from typing import Any

import fsspec
import pyarrow as pa

# Under `uv run`, Ray by default re-creates the driver's uv environment for every worker
# (running `uv run` again in a copy of the working directory); with a locked, already
# synced environment that fails and workers never start. segpipe's workers use the
# environment they are installed in, so turn that off before ray reads its settings.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import ray
from ray.data import ActorPoolStrategy, Dataset
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import Datasink, WriteResult

from segpipe.config import RunConfig
from segpipe.io import absolute, is_local, redact
from segpipe.job.commit import COMMITS_DIR, WriteCounts, atomic_write, delete_run, recover, units
from segpipe.job.inputs import check_manifest, list_images, manifest_format, prepare_manifest_batch
from segpipe.job.inputs import write_listing as write_listing_shards
from segpipe.job.lease import RunLease
from segpipe.job.record import (
    RUNS_DIR,
    metrics_rel,
    now,
    public_config,
    read_record,
    record_uri,
    versions,
    write_record,
)
from segpipe.job.stages import Segment, encode_rows, load_batch, with_image_ids
from segpipe.job.writer import arrow_filesystem, write_rows
from segpipe.schema import IMAGES_DIR, INSTANCES_DIR

log = logging.getLogger(__name__)

LISTING_DIR = "_listing"
LISTING_DONE = "_COMPLETE.json"  # written once every listing shard is
DELETING = "deleting"  # a run record's status while --overwrite deletes the old run
DECODE_TASK_MEMORY = 256 * 1024**2
ENCODE_TASK_MEMORY = 256 * 1024**2


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


def default_run_id() -> str:
    return "run-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def run(cfg: RunConfig) -> RunSummary:
    """Run the whole job; checks everything it can before any cluster work starts.

    A new run id starts a run; an existing one is refused unless ``cfg.resume`` (finish it:
    images already committed are skipped) or ``cfg.overwrite`` (delete it, then run anew).
    """
    started = time.monotonic()
    named = cfg.run_id is not None
    cfg = _resolved(cfg)
    assert cfg.run_id is not None
    previous = _check_output(cfg, named)
    # The model module (torch, torchvision: ~450 MB and seconds to import) is imported here,
    # on the driver, not at the top: write tasks unpickle _TablesSink from this module, and
    # every CPU worker would otherwise load torch.
    from segpipe.core.model import fingerprint_weights

    weights = fingerprint_weights(cfg.model)
    extras = check_manifest(cfg.manifest, cfg.uri_column) if cfg.manifest else []
    if previous is not None and cfg.resume:
        _check_same_settings(cfg, weights, previous)
    with RunLease(cfg.output, cfg.run_id):
        return _execute(cfg, previous, weights, extras, started)


def _execute(
    cfg: RunConfig,
    previous: dict[str, Any] | None,
    weights: dict[str, Any],
    extras: list[str],
    started: float,
) -> RunSummary:
    """Everything after the checks, under the run's lease."""
    assert cfg.run_id is not None
    # Listed before anything of an old run is deleted: a wrong input fails here, harmlessly.
    listed = _listing(cfg, previous if cfg.resume else None)
    if previous is not None and cfg.overwrite:
        log.info("--overwrite: deleting run %s from %s", cfg.run_id, redact(cfg.output))
        # A tombstone first: a --resume of a half-deleted run would take it for committed.
        write_record(cfg.output, cfg.run_id, {**previous, "status": DELETING})
        delete_run(cfg.output, cfg.run_id, [metrics_rel(cfg.run_id)])
        previous = None
    record: dict[str, Any] = {
        "run_id": cfg.run_id,
        "status": "running",
        "started_at": now(),
        "first_started_at": now()
        if previous is None
        else previous.get("first_started_at", previous.get("started_at")),
        "attempts": 1 if previous is None else 1 + int(previous.get("attempts", 1)),
        "config": public_config(cfg),
        "versions": versions(),
        "weights": weights,
        "manifest_columns": extras,
        "listed_images": listed,
    }
    write_record(cfg.output, cfg.run_id, record)
    recover(cfg.output, cfg.run_id)
    committed = list(units(cfg.output, cfg.run_id))  # one small marker per unit, not per image
    prior = sum((u.counts for u in committed), WriteCounts())
    if committed:
        log.info(
            "resuming run %s: %d images in %d committed units are skipped",
            cfg.run_id,
            prior.images,
            len(committed),
        )
    done_files = [rel for u in committed for rel in u.files[IMAGES_DIR]]
    del committed

    started_ray = _init_ray()
    try:
        plan = _actor_plan(cfg)
        record["actors"] = asdict(plan)
        write_record(cfg.output, cfg.run_id, record)
        sink = _TablesSink(cfg.output, cfg.partition_by, cfg.images_per_file)
        _build(cfg, plan, done_files).write_datasink(sink)
    except BaseException as exc:
        record.update(status="failed", finished_at=now(), error=f"{type(exc).__name__}: {exc}")
        write_record(cfg.output, cfg.run_id, record)
        raise
    finally:
        if started_ray:
            ray.shutdown()
    counts = prior + sink.totals
    summary = RunSummary(
        cfg.run_id,
        cfg.output,
        **asdict(counts),
        seconds=time.monotonic() - started,
        resumed=prior.images,
    )
    if listed is not None and counts.images != listed:
        log.error("listed %d images but the run holds %d images rows", listed, counts.images)
    record.update(
        status="succeeded",
        finished_at=now(),
        counts=asdict(counts),
        resumed_from=asdict(prior) if prior.images else None,
        seconds=round(summary.seconds, 3),
        images_per_s=round(summary.images_per_s, 3),
    )
    write_record(cfg.output, cfg.run_id, record)
    return summary


def _listing(cfg: RunConfig, previous: dict[str, Any] | None) -> int | None:
    """List the inputs into shards (or, resuming, reuse the shards of the first attempt, so
    that files added or removed since do not change what the run covers)."""
    if not cfg.inputs:
        return None
    assert cfg.run_id is not None
    folder = _listing_folder(cfg)
    fs, path = fsspec.core.url_to_fs(folder)
    done = f"{path}/{LISTING_DONE}"
    if previous is not None and fs.exists(done):
        listed = int(json.loads(fs.cat_file(done))["images"])
        log.info("resuming with the listing of the first attempt: %d images", listed)
        return listed
    listed = write_listing_shards(list_images(cfg.inputs, cfg.extensions), folder)
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


def _check_same_settings(cfg: RunConfig, weights: dict[str, Any], previous: dict[str, Any]) -> None:
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


@dataclass(frozen=True)
class ActorPlan:
    """The model actors' resources, resolved against the cluster."""

    min_actors: int
    max_actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    batch_size: int


def _actor_plan(cfg: RunConfig) -> ActorPlan:
    """Defaults: one GPU per actor and one actor per GPU when the cluster has GPUs; else CPU
    actors, ``min_actors`` of them. An autoscaling cluster whose GPU nodes are not up yet
    shows no GPUs: pass ``gpus_per_actor`` (and ``max_actors``) explicitly there."""
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    gpus = cfg.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if cluster_gpus > 0 else 0.0
    max_actors = cfg.max_actors
    if max_actors is None:
        max_actors = max(cfg.min_actors, int(cluster_gpus // gpus) if gpus > 0 else 0)
    plan = ActorPlan(cfg.min_actors, max_actors, gpus, cfg.cpus_per_actor, cfg.batch_size)
    log.info("model actors: %s", plan)
    return plan


def _build(cfg: RunConfig, plan: ActorPlan, done_files: list[str] | None = None) -> Dataset:
    ds = _read_uris(cfg)
    if done_files:
        ds = _without_committed(ds, cfg, done_files)
    ds = ds.repartition(target_num_rows_per_block=cfg.load_batch_size)
    ds = ds.map_batches(
        partial(load_batch, decode=cfg.decode),
        batch_size=cfg.load_batch_size,
        batch_format="numpy",
        num_cpus=1,
        # A reservation for the decoded pixels a task holds. Because it differs from the
        # actors' resources it also keeps Ray from fusing decoding into the model actors,
        # which should spend their time on inference only.
        memory=DECODE_TASK_MEMORY,
    )
    ds = ds.map_batches(
        Segment,
        fn_constructor_kwargs={
            "model": cfg.model,
            "run_id": cfg.run_id,
            "torch_threads": cfg.torch_threads,
        },
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(min_size=plan.min_actors, max_size=plan.max_actors),
        num_gpus=plan.gpus_per_actor,
        num_cpus=plan.cpus_per_actor,
    )
    # Run-length encoding in CPU tasks, off the model actors, load_batch_size images a task
    # (one task per actor batch of 1 cost more in task overhead than the encoding). The
    # reservation (differing from the write tasks') keeps Ray from fusing it into the write,
    # whose input bundles hold images_per_file images of unencoded mask windows.
    return ds.map_batches(
        encode_rows,
        batch_format="pyarrow",
        batch_size=max(cfg.batch_size, cfg.load_batch_size),
        num_cpus=1,
        memory=ENCODE_TASK_MEMORY,
    )


def _read_uris(cfg: RunConfig) -> Dataset:
    source = cfg.manifest or _listing_folder(cfg)
    filesystem, path = arrow_filesystem(source)
    kind = "parquet" if cfg.manifest is None else manifest_format(cfg.manifest)
    if kind == "parquet":
        ds = ray.data.read_parquet(path, filesystem=filesystem, file_extensions=["parquet"])
    elif kind == "csv":
        ds = ray.data.read_csv(path, filesystem=filesystem)
    else:
        ds = ray.data.read_text(path, filesystem=filesystem)
    column = cfg.uri_column if cfg.manifest is not None else "uri"
    return ds.map_batches(partial(prepare_manifest_batch, uri_column=column), batch_format="numpy")


def _without_committed(ds: Dataset, cfg: RunConfig, done_files: list[str]) -> Dataset:
    """The input rows whose images have no committed ``images`` row in this run yet: an
    anti-join on ``image_id`` against the run's committed images files (``done_files``,
    relative to the output), hash-partitioned across the cluster (nothing gathers either
    side's rows on the driver)."""
    filesystem, root = arrow_filesystem(cfg.output)
    files = [f"{root}/{rel}" for rel in done_files]
    done = ray.data.read_parquet(files, filesystem=filesystem, columns=["image_id"])
    partitions = int(min(64, max(4, ray.cluster_resources().get("CPU", 4))))
    return ds.map_batches(with_image_ids, batch_format="numpy").join(
        done, join_type="left_anti", num_partitions=partitions, on=("image_id",)
    )


def _resolved(cfg: RunConfig) -> RunConfig:
    """Fill in the run id and make local paths absolute (workers may run elsewhere)."""
    from segpipe.core.model import SHIPPED_WEIGHTS

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


def _listing_folder(cfg: RunConfig) -> str:
    return f"{cfg.output}/{LISTING_DIR}/{cfg.run_id}"


def _check_output(cfg: RunConfig, named: bool) -> dict[str, Any] | None:
    """Refuse to mix runs, and fail now if the output cannot be written. Returns the record
    of an existing run of this id (which ``resume`` or ``overwrite`` then acts on)."""
    assert cfg.run_id is not None
    fs, root = fsspec.core.url_to_fs(cfg.output)
    root = root.rstrip("/")
    previous: dict[str, Any] | None = None
    exists = fs.exists(record_uri(root, cfg.run_id)) or fs.exists(
        f"{root}/{COMMITS_DIR}/{cfg.run_id}"
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
    used = [d for d in (IMAGES_DIR, INSTANCES_DIR) if fs.exists(f"{root}/{d}")]
    if used and not named:
        raise OutputError(
            f"{redact(cfg.output)} already holds results; pass --run-id NAME to add a run "
            "beside them, or choose an empty output"
        )
    probe = f"{root}/{RUNS_DIR}/.write-probe-{uuid.uuid4().hex}"
    try:
        if is_local(fs):  # object stores have no folders (and no bucket is made here)
            fs.makedirs(f"{root}/{RUNS_DIR}", exist_ok=True)
        fs.pipe_file(probe, b"")
        fs.rm(probe)
    except Exception as exc:
        raise OutputError(
            f"cannot write to output {redact(cfg.output)}: {type(exc).__name__}: {exc}"
        ) from exc
    return previous


@contextlib.contextmanager
def ray_runtime() -> Iterator[None]:
    """Keep one Ray runtime (joined or embedded, as :func:`run` would) across several runs,
    so that they don't each pay for starting and stopping it (the benchmark uses this)."""
    started = _init_ray()
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _init_ray() -> bool:
    """Join the cluster named by RAY_ADDRESS, or start an embedded local Ray. True if started."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining the Ray cluster at %s", redact(address))
        ray.init(address=address)
    else:
        log.info("RAY_ADDRESS is not set: starting an embedded local Ray")
        ray.init(include_dashboard=False)
    return True


class _TablesSink(Datasink[WriteCounts]):
    """Writes each bundle of per-image rows as an ``images`` and an ``instances`` file."""

    def __init__(self, output: str, partition_by: Iterable[str], images_per_file: int) -> None:
        self.output = output
        self.partition_by = tuple(partition_by)
        self.images_per_file = images_per_file
        self.totals = WriteCounts()

    @property
    def min_rows_per_write(self) -> int:
        return self.images_per_file

    def write(self, blocks: Iterable[Block], ctx: Any) -> WriteCounts:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return WriteCounts()
        rows = pa.concat_tables(tables, promote_options="default")
        return write_rows(rows, self.output, partition_by=self.partition_by)

    def on_write_complete(self, write_result: WriteResult[WriteCounts]) -> None:
        for counts in write_result.write_returns:
            self.totals = self.totals + counts
