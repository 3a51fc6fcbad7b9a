"""The distributed job: the only module that imports ray.

Plan (Ray Data, streaming end to end; no step holds the whole dataset)::

    URIs (listing shards or manifest)                       read_parquet / read_csv / read_text
      -> prepare_manifest_batch, with_image_ids             tasks: rename, strip, drop blanks,
                                                            pack extra columns, image ids
      -> join(done image ids, left_anti)                    --resume: this run's committed;
                                                            --skip-done: earlier runs' ok
      -> repartition(keys=image_id) -> distinct_images      one row per image, copies counted
                                                            (a manifest, or several --input)
      -> repartition(target_num_rows_per_block=load_batch)  small blocks, so decoding spreads
      -> load_batch                                         CPU tasks: read, decode to model size
      -> Segment                                            actor pool: Mask R-CNN, GPU if any
      -> encode_rows                                        CPU tasks: mask windows -> COCO RLE
      -> _TablesSink                                        write tasks: Parquet, both tables

With ``--skip-done``, a semi-join of the input's ids with the earlier runs' ok ids is
counted first (:func:`_count_skipped`), so that the run accounts for every listed image.

Each write task gets at least ``images_per_file`` images, which bounds the number of files
to about ``images / images_per_file`` per table and partition.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import pyarrow as pa

# Under `uv run`, Ray by default re-creates the driver's uv environment for every worker
# (running `uv run` again in a copy of the working directory); with a locked, already
# synced environment that fails and workers never start. segpipe's workers use the
# environment they are installed in, so turn that off before ray reads its settings.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import ray
from ray.data import ActorPoolStrategy, Dataset
from ray.data.block import Block, BlockAccessor
from ray.data.context import DataContext, ShuffleStrategy
from ray.data.datasource import Datasink, WriteResult

from segpipe.config import MAX_FILE_BYTES, RunConfig
from segpipe.core.fingerprints import checked_fingerprint
from segpipe.io import arrow_filesystem, fs_root, is_local, redact
from segpipe.job import runs
from segpipe.job.budget import ErrorWatch
from segpipe.job.commit import WriteCounts
from segpipe.job.inputs import (
    csv_convert_options,
    extras_schema,
    manifest_format,
    manifest_schema,
    prepare_manifest_batch,
)
from segpipe.job.lease import LeaseLostError, RunLease
from segpipe.job.runs import RunSummary
from segpipe.job.stages import (
    Segment,
    distinct_images,
    encode_rows,
    load_batch,
    load_batch_memory,
    load_rows,
    ok_image_ids,
    one_table,
    segment_input,
    with_image_ids,
)
from segpipe.job.writer import write_rows
from segpipe.layout import INSTANCES_DIR, TABLE_SCHEMAS

log = logging.getLogger(__name__)

# An encode task holds its images' packed mask windows, at full resolution, and their RLE:
# Ray measured up to 292 MiB for 16 photos of 10-18 MP with ~11 detections each.
ENCODE_TASK_MEMORY = 512 * 1024**2
# The CPU that encode and write tasks ask for. They are light (BENCHMARKS.md: well under a
# millisecond an image each for small images), and a whole CPU does not fit in the share
# that Ray Data reserves for each step on a small node (half the CPUs, split over the six
# steps: 0.33 of 4): at 1 CPU they wait for the CPUs that decoding and the read hold, and on
# a 4-slot machine nothing was committed in the first 14,000 images of a 100,000-image run.
LIGHT_TASK_CPUS = 0.25


def run(cfg: RunConfig) -> RunSummary:
    """Run the whole job; checks everything it can before any cluster work starts.

    A new run id starts a run; an existing one is refused unless ``cfg.resume`` (finish it:
    images already committed are skipped) or ``cfg.overwrite`` (delete it, then run anew).
    Ray starts (or is joined) in the background once the output's checks pass, while the
    driver checks the weights, takes the lease and lists the inputs.
    """
    with _RayStart() as ray_start:
        attempt = runs.prepare(cfg, output_checked=ray_start.begin)
        ttl = attempt.cfg.lease_ttl
        with RunLease(attempt.cfg.output, attempt.run_id, ttl, ttl / 4.5) as lease:
            attempt.timeline.mark("leased")
            if ray_start.joins_cluster:
                # A cluster may have several nodes: see them before writing anything.
                ray_start.wait()
                attempt.timeline.mark("ray_started")
                _refuse_unshared_local_paths(attempt.cfg)
            runs.begin(attempt)
            try:
                ray_start.wait()
                attempt.timeline.mark("ray_started")
                plan = _actor_plan(attempt.cfg)
                attempt.record["actors"] = asdict(plan)
                attempt.save()
                sink = _TablesSink(
                    attempt.cfg.output,
                    attempt.cfg.partition_by,
                    attempt.cfg.images_per_file,
                    attempt.cfg.max_file_bytes,
                    lease.attempt,
                )
                fit = (int(attempt.weights["min_size"]), int(attempt.weights["max_size"]))
                earlier = attempt.earlier.files if attempt.earlier else []
                if attempt.earlier is not None:
                    attempt.skipped = _count_skipped(attempt.cfg, earlier, attempt.done_files)
                    attempt.record["skipped"] = {
                        "images": attempt.skipped,
                        "runs": attempt.earlier.runs,
                    }
                    attempt.save()
                attempt.timeline.mark("plan_started")
                dataset = _build(attempt.cfg, plan, fit, attempt.done_files, earlier)
                _write_within_budget(dataset, sink, attempt, lease)
                lease.check()
            except BaseException as exc:
                lost = _lost_lease(lease, exc)
                if lost is not None:
                    # The run is another driver's now: its record is not ours to write.
                    raise LeaseLostError(lost) from None
                runs.fail(attempt, exc)
                raise
            return runs.finish(attempt, sink.totals)


def _lost_lease(lease: RunLease, exc: BaseException) -> str | None:
    """Why this driver no longer holds its run, if it does not, ``exc`` having stopped it:
    the heartbeat found the lease lost; or ``exc`` is, or was raised from, a write task's
    :class:`LeaseLostError` (Ray re-raises it on the driver); or the lease, checked now, is
    overdue or another attempt's."""
    if lease.lost is not None:
        return lease.lost
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, LeaseLostError):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    try:
        lease.check()
    except LeaseLostError as gone:
        return str(gone)
    except Exception:  # the store unreachable: the error that stopped the run tells more
        log.warning("could not read the lease of run %s", lease.run_id)
    return None


def _write_within_budget(
    dataset: Dataset, sink: _TablesSink, attempt: runs.Attempt, lease: RunLease
) -> None:
    """Run the plan into the sink while an :class:`ErrorWatch` reads the commit markers; if
    it finds this attempt over the error budget it interrupts this (main) thread, which
    stops Ray Data's execution, and the run fails with :class:`runs.ErrorRateError`. The
    lease's heartbeat interrupts it the same way when the lease is lost
    (:class:`LeaseLostError`)."""
    cfg = attempt.cfg
    watch = ErrorWatch(
        cfg.output, attempt.run_id, cfg.max_error_rate, cfg.error_check_after, attempt.prior_units
    )
    try:
        with watch:
            dataset.write_datasink(sink, ray_remote_args={"num_cpus": LIGHT_TASK_CPUS})
    except KeyboardInterrupt:
        lease.check()
        if watch.stopped is None:
            raise  # the user's Ctrl-C
        raise runs.ErrorRateError(
            f"run {attempt.run_id} stopped early: {watch.stopped}. What was committed stays; "
            f"fix the cause, then `--resume --run-id {attempt.run_id}` goes on (or raise "
            "--max-error-rate)"
        ) from None


class _RayStart:
    """Starts Ray (:func:`_init_ray`) in a background thread, so that its seconds overlap
    the driver's own start-up work; on leaving, waits for it and shuts down a runtime it
    started (also when the checks failed while Ray was starting)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ray-start")
        self._started: Future[bool] | None = None
        self.joins_cluster = False

    def begin(self) -> None:
        if self._started is None:
            # Joining a cluster (or using a runtime already up) rather than starting one of
            # our own, which has one node.
            self.joins_cluster = bool(os.environ.get("RAY_ADDRESS")) or ray.is_initialized()
            self._started = self._pool.submit(_init_ray)

    def wait(self) -> None:
        self.begin()
        assert self._started is not None
        self._started.result()

    def __enter__(self) -> _RayStart:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            if self._started is None:
                return
            try:
                started = self._started.result()
            except Exception:
                if exc_type is None:
                    raise
                started = ray.is_initialized()  # keep the error already on its way
            if started:
                ray.shutdown()
        finally:
            self._pool.shutdown()


def _refuse_unshared_local_paths(cfg: RunConfig) -> None:
    """On a cluster of more than one node, refuse local paths (the other nodes would not see
    them: every image would be ``not_found``, and output files would land on whichever node
    wrote them), unless ``cfg.local_paths_shared`` says they are on a shared mount."""
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    if nodes <= 1 or cfg.local_paths_shared:
        return
    named: list[tuple[str, str | None]] = [("--input", uri) for uri in cfg.inputs]
    named += [("--manifest", cfg.manifest), ("--output", cfg.output)]
    named += [("--weights", cfg.model.weights), ("--categories", cfg.model.categories)]
    for what, uri in named:
        # Torchvision weight names and the shipped `shapes` are not paths.
        if uri is None or (what == "--weights" and "/" not in uri):
            continue
        fs, path = fs_root(uri)
        if is_local(fs):
            raise runs.OutputError(
                f"{what} {path} is a local path, and this Ray cluster has {nodes} nodes: the "
                "others do not see it. Use storage every node reaches (s3://, gs://, ...), or, "
                "if it is on a disk every node mounts at the same place (NFS, a FUSE mount), "
                "pass --local-paths-shared"
            )


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


def _build(
    cfg: RunConfig,
    plan: ActorPlan,
    fit: tuple[int, int],
    done_files: list[str] | None = None,
    earlier_files: list[str] | None = None,
) -> Dataset:
    """The plan; ``fit`` is the model transform's ``(min_size, max_size)``, which the decode
    tasks decode large images to (unless ``cfg.decode.full_resolution``). ``done_files``:
    this run's committed images files (``--resume``); ``earlier_files``: earlier runs'
    (``--skip-done``, their ok images only); both relative to the output."""
    # The manifest's column types, read once here (a Parquet footer, a CSV's first block).
    schema = manifest_schema(cfg.manifest) if cfg.manifest else None
    extras = extras_schema(schema, cfg.uri_column)
    _use_parquet_v1()
    ds = _read_uris(cfg, schema)
    done = _done_ids(cfg, done_files or [], earlier_files or [])
    if done is not None:
        ds = ds.join(
            done, join_type="left_anti", num_partitions=_shuffle_partitions(), on=("image_id",)
        )
    if cfg.manifest is not None or len(cfg.inputs) > 1:
        # A listing of one input names each file once: only several inputs can overlap.
        ds = _distinct(ds)
    ds = ds.repartition(target_num_rows_per_block=load_rows(cfg.load_batch_size, cfg.tiles))
    assert cfg.run_id is not None  # resolved by runs.prepare
    return _segment_steps(ds, cfg, plan, fit, (cfg.output, cfg.run_id), extras)


def _segment_steps(
    ds: Dataset,
    cfg: RunConfig,
    plan: ActorPlan,
    fit: tuple[int, int],
    timeline_to: tuple[str, str] | None,
    extras: pa.Schema,
) -> Dataset:
    """Input rows (``uri``, ``image_id``, carried columns) -> per-image rows with their
    instances nested and encoded: decode tasks, the model actors, encode tasks. Of ``cfg``
    only the model, decode, batch and thread settings and the run id are used."""
    rows = load_rows(cfg.load_batch_size, cfg.tiles)
    ds = ds.map_batches(
        partial(load_batch, decode=cfg.decode, fit=fit, tiling=cfg.tiles),
        batch_size=rows,
        batch_format="numpy",
        num_cpus=1,
        # A reservation for the pixels a task holds. Because it differs from the actors'
        # resources it also keeps Ray from fusing decoding into the model actors, which
        # should spend their time on inference only.
        memory=load_batch_memory(rows, cfg.decode, fit, cfg.tiles),
    )
    ds = ds.map_batches(
        Segment,
        fn_constructor_kwargs={
            "model": cfg.model,
            "run_id": cfg.run_id,
            "torch_threads": cfg.torch_threads,
            "timeline_to": timeline_to,
            "extras": extras if len(extras) else None,
            "tiling": cfg.tiles,
            "batch_size": cfg.batch_size,
        },
        # A tiled run gives an actor one decode block (at most two images) a call, so that
        # huge images spread over the actors instead of queuing behind one.
        batch_size=load_rows(cfg.batch_size, cfg.tiles),
        batch_format="numpy",
        compute=ActorPoolStrategy(min_size=plan.min_actors, max_size=plan.max_actors),
        num_gpus=plan.gpus_per_actor,
        num_cpus=plan.cpus_per_actor,
    )
    # No task waits for its outputs to be taken (Ray Data lets one hold 2 blocks unread):
    # the read is the one step whose task yields many blocks (the listing in blocks of
    # load_batch_size rows), and, made to wait, it held its CPU for the whole run.
    ds.context._max_num_blocks_in_streaming_gen_buffer = None
    # Run-length encoding in CPU tasks, off the model actors, load_batch_size images a task
    # (one task per actor batch of 1 cost more in task overhead than the encoding). The
    # reservation (differing from the write tasks') keeps Ray from fusing it into the write,
    # whose input bundles hold images_per_file images of unencoded mask windows.
    return ds.map_batches(
        encode_rows,
        batch_format="pyarrow",
        batch_size=max(cfg.batch_size, cfg.load_batch_size),
        num_cpus=LIGHT_TASK_CPUS,
        memory=ENCODE_TASK_MEMORY,
    )


def segment(
    ds: Dataset,
    cfg: RunConfig,
    *,
    uri_column: str = "uri",
    bytes_column: str | None = None,
    table: str = INSTANCES_DIR,
) -> Dataset:
    """``ds`` (a column of image URIs, and optionally one of their encoded bytes) -> a lazy
    Dataset of ``table``'s rows (``instances``: one a detected object; ``images``: one an
    input row, failures included), as ``segpipe run`` writes them, through the same decode
    tasks, model actors and encode tasks. Nothing runs until the Dataset is consumed.

    Of ``cfg`` only the model, decode, batch, actor and thread settings and ``run_id`` are
    used; nothing is written, no run is recorded, rows are not de-duplicated. The other
    columns of ``ds`` are not carried: join the result back on ``uri`` or ``image_id``
    (the same :func:`segpipe.schema.image_id` of the canonical URI as a run gives)."""
    if table not in TABLE_SCHEMAS:
        raise ValueError(f"table must be one of {sorted(TABLE_SCHEMAS)}, got {table!r}")
    if cfg.run_id is None:
        raise ValueError("segment needs a run id for its rows")
    names = ds.columns(fetch_if_missing=False)  # None: unknown until it runs
    wanted = [uri_column] + ([bytes_column] if bytes_column else [])
    missing = [c for c in wanted if names is not None and c not in names]
    if missing:
        raise ValueError(f"the Dataset has no column {missing[0]!r} (it has {names})")
    _init_ray()
    weights = checked_fingerprint(cfg.model)
    fit = (int(weights["min_size"]), int(weights["max_size"]))
    ds = ds.map_batches(
        partial(segment_input, uri_column=uri_column, bytes_column=bytes_column),
        batch_format="pyarrow",
    )
    rows = _segment_steps(ds, cfg, _actor_plan(cfg), fit, None, pa.schema([]))
    return rows.map_batches(partial(one_table, table=table), batch_format="pyarrow")


def _read_uris(cfg: RunConfig, schema: pa.Schema | None) -> Dataset:
    """The input rows (``uri``, ``image_id``, packed extra columns): the listing's shards or
    the manifest (``schema``: its columns' types, from :func:`manifest_schema`), read by
    the cluster. A CSV manifest is read with ``schema``'s types in every block."""
    source = cfg.manifest or runs.listing_folder(cfg)
    filesystem, path = arrow_filesystem(source)
    kind = "parquet" if cfg.manifest is None else manifest_format(cfg.manifest)
    column = cfg.uri_column if cfg.manifest is not None else "uri"
    if kind == "parquet":
        ds = ray.data.read_parquet(path, filesystem=filesystem, file_extensions=["parquet"])
    elif kind == "csv":
        assert schema is not None
        options = csv_convert_options(schema, column)
        ds = ray.data.read_csv(path, filesystem=filesystem, convert_options=options)
    else:
        ds = ray.data.read_text(path, filesystem=filesystem)
    # Arrow batches: the manifest's columns keep their types until they are packed.
    prepare = partial(
        prepare_manifest_batch, uri_column=column, extras=extras_schema(schema, column)
    )
    ds = ds.map_batches(prepare, batch_format="pyarrow")
    return ds.map_batches(with_image_ids, batch_format="pyarrow")


def _shuffle_partitions() -> int:
    """Partitions of the hash shuffles on ``image_id`` (resume's anti-join, the distinct)."""
    return int(min(64, max(4, ray.cluster_resources().get("CPU", 4))))


def _use_parquet_v1() -> None:
    """Ray Data's Parquet reader V2 (its default) reads the footers of the files it lists on
    a pool of up to 32 actors, one process each, for every read_parquet: the listing's few
    shards, resume's committed files, a Parquet manifest. On a small node their start cost
    more CPU than the job's first minute of work (the first image out of the model came
    ~11 s later). V1 reads a few footers on the driver and many in tasks."""
    DataContext.get_current().use_datasource_v2 = False


def _done_ids(cfg: RunConfig, done_files: list[str], earlier_files: list[str]) -> Dataset | None:
    """The ``image_id`` of each image not to segment again: every image in this run's
    committed files (``done_files``) and the ``ok`` images in earlier runs' files
    (``earlier_files``), both relative to the output; None if there are none. The input is
    anti-joined against it on ``image_id``, hash-partitioned across the cluster, so nothing
    gathers either side's rows on the driver."""
    filesystem, root = arrow_filesystem(cfg.output)
    parts = []
    if done_files:
        files = [f"{root}/{rel}" for rel in done_files]
        parts.append(ray.data.read_parquet(files, filesystem=filesystem, columns=["image_id"]))
    if earlier_files:
        files = [f"{root}/{rel}" for rel in earlier_files]
        earlier = ray.data.read_parquet(
            files, filesystem=filesystem, columns=["image_id", "status"]
        )
        parts.append(earlier.map_batches(ok_image_ids, batch_format="pyarrow"))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else parts[0].union(parts[1])


def _count_skipped(cfg: RunConfig, earlier_files: list[str], done_files: list[str]) -> int:
    """``--skip-done``: how many input rows have an ``ok`` row in the earlier runs' files and
    none in this run's: the rows :func:`_build`'s anti-join will drop for the earlier runs,
    counted before the plan by a semi-join of its own (one more pass over the input's ids,
    no pixels), so that the run can still account for every listed image."""
    if not earlier_files:
        return 0
    _use_parquet_v1()
    schema = manifest_schema(cfg.manifest) if cfg.manifest else None
    ds = _read_uris(cfg, schema).select_columns(["image_id"])
    partitions = _shuffle_partitions()
    ok = _done_ids(cfg, [], earlier_files)
    assert ok is not None
    ds = ds.join(ok, join_type="left_semi", num_partitions=partitions, on=("image_id",))
    mine = _done_ids(cfg, done_files, [])
    if mine is not None:
        ds = ds.join(mine, join_type="left_anti", num_partitions=partitions, on=("image_id",))
    return ds.count()


_HASH_SHUFFLES = (ShuffleStrategy.HASH_SHUFFLE, ShuffleStrategy.SHUFFLE_V2)


def _distinct(ds: Dataset) -> Dataset:
    """One row per image (a manifest may repeat a URI, --input prefixes may overlap), before
    anything is fetched. The rows (``uri``, ``image_id``, packed extras: no pixels) are
    hash-partitioned on ``image_id`` across the cluster, so that all rows of an image meet in
    one block, and :func:`distinct_images` keeps one of them with its copy count (summed into
    ``WriteCounts.duplicates`` at the write). This is how Ray Data's own ``map_groups`` puts
    a group in one batch: a keyed repartition emits each partition as one block, and
    ``batch_size=None`` hands each block over whole. Ray's sort-based shuffle strategies
    cannot repartition on keys; under them the rows are sorted instead, as ``map_groups``
    does."""
    if ds.context.shuffle_strategy in _HASH_SHUFFLES:
        ds = ds.repartition(_shuffle_partitions(), keys=["image_id"])
    else:
        ds = ds.sort("image_id")
    return ds.map_batches(distinct_images, batch_size=None, batch_format="pyarrow")


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


# The CPU slots an embedded Ray gets at least. The plan streams only if its CPU steps (the
# read, decoding, encoding, the write) can run beside the model actor; with 2 slots on a
# 2-core machine the actor and one of them take both, the steps run in turn, and nothing is
# committed until decoding is done. Slots are scheduling tokens, not cores.
EMBEDDED_MIN_CPUS = 4


EMBEDDED_RAY_SYSTEM_CONFIG = {
    "enable_worker_prestart": False,
    "prestart_worker_first_driver": False,
}


def embedded_ray_cpus() -> int:
    """The CPU slots of an embedded Ray: this machine's cores, at least EMBEDDED_MIN_CPUS."""
    return max(os.cpu_count() or 1, EMBEDDED_MIN_CPUS)


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
        # No idle workers started ahead of need: on a small node their imports compete with
        # the model actor's (the first image out of the model came ~2 s later with them).
        ray.init(
            include_dashboard=False,
            num_cpus=embedded_ray_cpus(),
            _system_config=EMBEDDED_RAY_SYSTEM_CONFIG,
        )
    return True


class _TablesSink(Datasink[WriteCounts]):
    """Writes each bundle of per-image rows as an ``images`` and an ``instances`` file."""

    def __init__(
        self,
        output: str,
        partition_by: Iterable[str],
        images_per_file: int,
        max_file_bytes: int = MAX_FILE_BYTES,
        attempt: str | None = None,
    ) -> None:
        self.output = output
        self.partition_by = tuple(partition_by)
        self.images_per_file = images_per_file
        self.max_file_bytes = max_file_bytes
        self.attempt = attempt  # the lease holder's: each commit checks it still holds it
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
        return write_rows(
            rows,
            self.output,
            partition_by=self.partition_by,
            max_file_bytes=self.max_file_bytes,
            attempt=self.attempt,
        )

    def on_write_complete(self, write_result: WriteResult[WriteCounts]) -> None:
        for counts in write_result.write_returns:
            self.totals = self.totals + counts
