"""The job at scale (``jobs/scale_check.py``): many small images through the real job.

One check, on one machine:

1. **generate and upload**: ``distinct`` small shapes images (``width`` x ``height`` JPEGs)
   are encoded once and PUT under ``images`` different keys into a bucket of the loopback S3
   server (moto's, :mod:`segpipe.tools.s3local`), from ``upload_threads`` threads on
   keep-alive connections; the rate is what that server takes.
2. **the run**: ``segpipe.job.pipeline.run`` in a child process (the driver, with its
   embedded Ray), the shipped tiny model (``weights="shapes"``) at a small input size, so
   that the pipeline, not the model, is what is measured. From outside the child, background
   threads here sample every ``sample_s`` seconds the RSS and CPU time of the driver and of
   every process under it (Ray's own processes, the task workers, the model actor) and the
   object store's use, and poll the run's commit markers every ``poll_s`` seconds: the
   images committed over time give the rate per tenth of the run, and at each tenth the
   peaks of memory so far are kept. The child's log, read line by line as it comes, gives
   the start-up timeline (listing done, Ray up) next to what the samplers saw (the first
   decode task, the first commit).
3. **kill and resume** (``kill_at`` > 0): the same job on a second output, SIGKILLed with
   every process under it once ``kill_at`` of the images are committed (``kill_by="model"``:
   once they have left the model, by Ray Data's progress log), then run again with
   ``resume``: how long the resumed attempt takes to skip the committed images and start on
   the rest, and in all, against the time the first part took.
4. **stage costs on one core**: the job's own stage functions in this process on a sample
   (``stage_images``) of the uploaded images: read (one GET each), decode, the model (the
   ``Segment`` step, excluded from the pipeline's cost), encode (RLE), write (the unit's
   Parquet files, staged) and commit (marker and publish), as CPU and wall milliseconds per
   image, compared with the run's whole CPU time per image (steady state, the S3 server
   apart): what is left over is Ray's own overhead.

Nothing here imports ray (the layering allows only ``segpipe.job.pipeline`` to): the object
store's use comes from a ``store_probe`` callable the caller passes, given the address of the
child's Ray (``jobs/scale_check.py`` asks Ray's GCS).
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import fsspec
import psutil

from segpipe import layout
from segpipe.config import DecodeConfig, ModelConfig, RunConfig, TileConfig
from segpipe.io import fs_root

log = logging.getLogger(__name__)

SUMMARY_PREFIX = "SCALE-CHECK-SUMMARY "
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # as `segpipe run` logs
IN_BUCKET, OUT_BUCKET = "scale-in", "scale-out"  # two buckets: moto lists a whole bucket
SHAPES_SEED = 7  # a held-out seed of the shapes dataset
MiB = 2**20

# Log lines of the child that mark its start-up (the first match of each is kept).
LOG_EVENTS = {
    "listing_done": r"listed \d+ images|resuming with the listing",
    "resume_skip_known": r"resuming run .* are skipped",
    "ray_start": r"starting an embedded local Ray|joining the Ray cluster",
    "ray_up": r"model actors:",
    "plan_start": r"Starting execution of Dataset|Executing DAG",
}
# Ray names a worker process after what it runs (``ray::<task or actor.method>``): the
# first time each of these titles is seen marks a step of the start-up.
TITLE_EVENTS = {
    "list_task": r"^ray::ListFiles",
    "listing_read": r"^ray::ReadFiles",
    "shuffle": r"^ray::(HashShuffle|JoinShuffle)",
    "model_load": r"^ray::MapWorker\(MapBatches\(Segment\)\)\.__init__",
    "first_decode_task": r"^ray::MapBatches\(load_batch\)",
    "first_model_call": r"^ray::MapWorker\(MapBatches\(Segment\)\)\.submit",
    "first_encode_task": r"^ray::MapBatches\(encode_rows\)",
    "first_write_task": r"^ray::Write",
}
MODEL_ACTOR = r"^ray::MapWorker\(MapBatches\(Segment\)\)"
# Ray Data's progress log (every 10 s when its output is not a terminal): rows out of the model.
MODEL_PROGRESS = re.compile(r"MapBatches\(Segment\): (\d+)/")


@dataclass(frozen=True)
class ScaleConfig:
    images: int = 100_000
    images_per_file: int = 5000
    distinct: int = 256  # distinct encodings, reused under different keys
    # The shapes model (trained at 256/448) at 48/64 on 64x48 images: ~14 ms of one core an
    # image, ~0.9 instances each; at 64/96 on 96x64: ~24 ms, ~2.3 instances.
    width: int = 64
    height: int = 48
    min_size: int = 48
    max_size: int = 64
    batch_size: int = 4
    load_batch_size: int = 16
    upload_threads: int = 4
    poll_s: float = 1.0  # commit markers
    sample_s: float = 0.5  # process memory and CPU
    store_every_s: float = 2.0  # object store
    kill_at: float = 0.5  # kill the second run once this fraction is committed; 0: no resume
    kill_by: str = "committed"  # or "model": once kill_at of the images left the model
    stage_images: int = 256

    def __post_init__(self) -> None:
        if self.images < 1 or self.images_per_file < 1 or self.distinct < 1:
            raise ValueError("images, images_per_file and distinct must be >= 1")
        if not 0.0 <= self.kill_at < 1.0:
            raise ValueError(f"kill_at must be in [0, 1), got {self.kill_at}")
        if self.kill_by not in ("committed", "model"):
            raise ValueError(f"kill_by must be committed or model, got {self.kill_by!r}")

    def model(self) -> ModelConfig:
        return ModelConfig(
            weights="shapes", device="cpu", min_size=self.min_size, max_size=self.max_size
        )

    def run_config(self, output: str, run_id: str, resume: bool = False) -> RunConfig:
        return RunConfig(
            inputs=(f"s3://{IN_BUCKET}/images/",),
            output=output,
            run_id=run_id,
            model=self.model(),
            batch_size=self.batch_size,
            load_batch_size=self.load_batch_size,
            images_per_file=self.images_per_file,
            resume=resume,
        )


# ----------------------------------------------------------------------------- inputs


def encodings(cfg: ScaleConfig) -> list[bytes]:
    """``distinct`` JPEGs: shapes images scaled to ``width`` x ``height``."""
    from PIL import Image

    from segpipe.tools.shapes import generate_image

    out = []
    for i in range(cfg.distinct):
        image = Image.fromarray(generate_image(SHAPES_SEED, i).pixels)
        buf = io.BytesIO()
        image.resize((cfg.width, cfg.height), Image.Resampling.BILINEAR).save(
            buf, format="JPEG", quality=90
        )
        out.append(buf.getvalue())
    return out


def image_key(i: int) -> str:
    return f"images/img-{i:08d}.jpg"


@dataclass
class UploadFigures:
    objects: int
    bytes: int
    seconds: float
    objects_per_s: float
    threads: int
    server_cpu_ms_per_put: float
    server_rss_mib: float  # the S3 server's RSS once every object is in


def upload(
    endpoint: str, count: int, blobs: Sequence[bytes], threads: int, server: psutil.Process
) -> UploadFigures:
    """PUT ``count`` objects (``blobs`` in turn) into the input bucket: plain HTTP PUTs on
    one keep-alive connection per thread (the loopback server takes unsigned requests; the
    signing of an SDK would cost this machine's cores more than the server's work)."""
    host = urlparse(endpoint)
    failures: list[BaseException] = []
    total = [0] * threads

    def work(t: int) -> None:
        conn = http.client.HTTPConnection(host.hostname or "127.0.0.1", host.port)
        try:
            for i in range(t, count, threads):
                body = blobs[i % len(blobs)]
                for attempt in range(5):
                    try:
                        conn.request("PUT", f"/{IN_BUCKET}/{image_key(i)}", body=body)
                        response = conn.getresponse()
                        response.read()
                        if response.status != 200:
                            raise OSError(f"PUT {image_key(i)}: HTTP {response.status}")
                        break
                    except (OSError, http.client.HTTPException):
                        conn.close()  # reconnects on the next request
                        if attempt == 4:
                            raise
                        time.sleep(0.2 * (attempt + 1))
                total[t] += len(body)
        except BaseException as exc:
            failures.append(exc)
        finally:
            conn.close()

    cpu0 = _cpu(server)
    started = time.perf_counter()
    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seconds = time.perf_counter() - started
    if failures:
        raise failures[0]
    return UploadFigures(
        objects=count,
        bytes=sum(total),
        seconds=round(seconds, 2),
        objects_per_s=round(count / seconds, 1),
        threads=threads,
        server_cpu_ms_per_put=round(1000 * (_cpu(server) - cpu0) / count, 3),
        server_rss_mib=round(server.memory_info().rss / MiB, 1),
    )


def _cpu(proc: psutil.Process) -> float:
    try:
        t = proc.cpu_times()
    except psutil.Error:
        return 0.0
    return float(t.user + t.system)


# ----------------------------------------------------------------------------- sampling

StoreProbe = Callable[[str], dict[str, float]]  # Ray's GCS address -> object store bytes


# Ray Data's own helper actors and Ray's per-node agents, by their process titles.
HELPER_ACTORS = ("_StatsActor", "ActorLocationTracker", "AutoscalingCoordinator")
RAY_AGENTS = ("DashboardAgent", "RuntimeEnvAgent")


def process_kind(cmdline: str, pid: int, root: int) -> str:
    """driver, model_actor, task_worker, helper_actor (Ray Data's) or ray_system (raylet,
    GCS, agents, monitors), from a process's command line (Ray names its workers
    ``ray::<what they run>``)."""
    if pid == root:
        return "driver"
    if cmdline.startswith("ray::") or "default_worker.py" in cmdline:
        if re.search(MODEL_ACTOR, cmdline):
            return "model_actor"
        if any(name in cmdline for name in HELPER_ACTORS):
            return "helper_actor"
        if any(name in cmdline for name in RAY_AGENTS):
            return "ray_system"
        return "task_worker"
    return "ray_system"


SERIES_S = 5.0  # how often the RSS kept in RunFigures.rss_series
KINDS = ("driver", "model_actor", "task_worker", "helper_actor", "ray_system")
WORKER_KINDS = ("model_actor", "task_worker", "helper_actor")


@dataclass
class MemoryMark:
    """The peaks so far (MiB) when a fraction of the run was committed."""

    fraction: float
    images: int
    seconds: float  # since the child started
    driver_peak_mib: float
    workers_total_peak_mib: float  # every Ray worker process (tasks and actors) together
    largest_worker_peak_mib: float
    ray_system_peak_mib: float
    object_store_peak_mib: float
    driver_now_mib: float
    workers_total_now_mib: float
    # The largest process of each role: which kind of worker grows, if any.
    largest_model_actor_peak_mib: float = 0.0
    largest_task_worker_peak_mib: float = 0.0


def private_rss(proc: psutil.Process) -> int:
    """``proc``'s resident bytes without its shared-memory pages (``RssShmem``). Every Ray
    process that reads or writes objects maps the object store (``/dev/shm/plasma...``), and
    the pages of it that the process has touched count in its RSS: over a long run they grow
    until they cover the part of the store in use, in every worker at once, and looked like
    a leak of ~2 KiB an image in the model actor (BENCHMARKS.md). Those pages are the
    object store's, measured apart; what is left is the process's own (anonymous and file
    pages). Where ``/proc`` has no ``RssShmem``, the whole RSS."""
    rss = int(proc.memory_info().rss)
    try:
        with open(f"/proc/{proc.pid}/status") as status:
            for line in status:
                if line.startswith("RssShmem:"):
                    return rss - int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return rss


class ProcessSampler:
    """Samples, every ``interval`` seconds from a thread, the RSS (:func:`private_rss`) and
    CPU time of ``root``
    (the driver) and every process under it, and the object store through ``probe``; the
    S3 server's CPU time too (``server``)."""

    def __init__(
        self,
        root: int,
        interval: float,
        server: psutil.Process,
        probe: StoreProbe | None,
        store_every_s: float,
    ) -> None:
        self.root = psutil.Process(root)
        self.interval = interval
        self.server = server
        self.server_cpu0 = _cpu(server)
        self.probe = probe
        self.store_every_s = store_every_s
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self.cpu: dict[int, tuple[str, float]] = {}  # pid -> (kind, CPU seconds), last seen
        self.peak = {"driver": 0.0, "workers_total": 0.0, "largest_worker": 0.0}
        self.peak.update(ray_system=0.0, object_store=0.0, all_total=0.0)
        self.peak.update(largest_model_actor=0.0, largest_task_worker=0.0)
        self.now = {"driver": 0.0, "workers_total": 0.0}
        self.store: dict[str, float] = {}
        self.titles: dict[str, float] = {}  # first time each process title was seen
        self.events: dict[str, float] = {}
        self.event_cpu: dict[str, dict[str, float]] = {}  # CPU seconds by kind at each event
        self.store_samples = 0
        # Every SERIES_S seconds: (seconds, driver, all workers, Ray's own processes) RSS MiB.
        self.series: list[tuple[float, float, float, float]] = []
        self.gcs_address: str | None = None
        self.store_error: str | None = None
        self._procs: dict[int, psutil.Process] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        # The object store apart: a call to Ray may hang while its cluster starts or stops.
        self._store_thread = threading.Thread(target=self._store_loop, daemon=True)

    def start(self) -> None:
        self._thread.start()
        if self.probe is not None:
            self._store_thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        if self._store_thread.is_alive():
            self._store_thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def _store_loop(self) -> None:
        while not self._stop.wait(self.store_every_s):
            if self.gcs_address is not None:
                self._sample_store()

    def sample(self) -> None:
        t = time.monotonic() - self.started
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        rss = dict.fromkeys(KINDS, 0.0)
        largest_of = dict.fromkeys(WORKER_KINDS, 0.0)  # the largest process of each kind
        with self.lock:
            for proc in procs:
                proc = self._procs.setdefault(proc.pid, proc)
                try:
                    cmdline = " ".join(proc.cmdline())
                    mem = private_rss(proc) / MiB
                    times = proc.cpu_times()
                except psutil.Error:
                    continue
                kind = process_kind(cmdline, proc.pid, self.root.pid)
                self.cpu[proc.pid] = (kind, float(times.user + times.system))
                rss[kind] += mem
                if kind in largest_of:
                    largest_of[kind] = max(largest_of[kind], mem)
                self._note_title(cmdline, t)
            workers = sum(rss[k] for k in WORKER_KINDS)
            self.now = {"driver": rss["driver"], "workers_total": workers}
            if not self.series or t - self.series[-1][0] >= SERIES_S:
                self.series.append(
                    (round(t, 1), round(rss["driver"]), round(workers), round(rss["ray_system"]))
                )
            for key, value in (
                ("driver", rss["driver"]),
                ("workers_total", workers),
                ("largest_worker", max(largest_of.values())),
                ("largest_model_actor", largest_of["model_actor"]),
                ("largest_task_worker", largest_of["task_worker"]),
                ("ray_system", rss["ray_system"]),
                ("all_total", sum(rss.values())),
            ):
                self.peak[key] = max(self.peak[key], value)

    def _note_title(self, cmdline: str, t: float) -> None:
        title = cmdline.strip()[:120]
        if title.startswith("ray::"):
            if title not in self.titles and len(self.titles) < 200:
                self.titles[title] = round(t, 2)
            for name, pattern in TITLE_EVENTS.items():
                if name not in self.events and re.search(pattern, title):
                    self.events[name] = round(t, 2)
                    self.event_cpu[name] = self._cpu_totals()
        if self.gcs_address is None:
            found = re.search(r"--gcs-address=(\S+)", cmdline)
            if found:
                self.gcs_address = found.group(1)

    def _sample_store(self) -> None:
        assert self.probe is not None and self.gcs_address is not None
        try:
            stats = self.probe(self.gcs_address)
        except Exception as exc:  # the cluster is starting or gone
            self.store_error = f"{type(exc).__name__}: {str(exc)[:200]}"
            return
        with self.lock:
            self.store = stats
            self.store_samples += 1
            self.store_error = None
            used = stats.get("object_store_bytes_used", 0.0) / MiB
            self.peak["object_store"] = max(self.peak["object_store"], used)

    def cpu_by_kind(self) -> dict[str, float]:
        """CPU seconds so far of each kind of process, and of the S3 server."""
        with self.lock:
            return self._cpu_totals()

    def _cpu_totals(self) -> dict[str, float]:
        out = dict.fromkeys(KINDS, 0.0)
        for kind, seconds in self.cpu.values():
            out[kind] += seconds
        out["s3_server"] = _cpu(self.server) - self.server_cpu0
        return out

    def mark(self, fraction: float, images: int) -> MemoryMark:
        with self.lock:
            p = dict(self.peak)
            now = dict(self.now)
        return MemoryMark(
            fraction=fraction,
            images=images,
            seconds=round(time.monotonic() - self.started, 2),
            driver_peak_mib=round(p["driver"], 1),
            workers_total_peak_mib=round(p["workers_total"], 1),
            largest_worker_peak_mib=round(p["largest_worker"], 1),
            ray_system_peak_mib=round(p["ray_system"], 1),
            object_store_peak_mib=round(p["object_store"], 1),
            driver_now_mib=round(now["driver"], 1),
            workers_total_now_mib=round(now["workers_total"], 1),
            largest_model_actor_peak_mib=round(p["largest_model_actor"], 1),
            largest_task_worker_peak_mib=round(p["largest_task_worker"], 1),
        )


@dataclass
class CommitEvent:
    seconds: float  # since the child started, when the poll first saw the marker
    images: int  # committed in all (this attempt's and earlier ones')
    unit_images: int
    cpu: dict[str, float]  # CPU seconds by kind of process, at that poll


class CommitWatcher:
    """Polls a run's commit markers (one listing, then the new markers' bodies) and keeps
    the images committed over time; at each tenth of ``total`` a :class:`MemoryMark`, and
    ``kill`` set once ``kill_at`` of ``total`` are committed."""

    def __init__(
        self,
        output: str,
        run_id: str,
        total: int,
        interval: float,
        sampler: ProcessSampler,
        kill_at: float = 0.0,
    ) -> None:
        from segpipe.job.commit import Unit, discarded

        self.unit_type, self.discarded = Unit, discarded
        self.fs, root = fs_root(output)
        self.folder = layout.commits(root, run_id)
        self.total, self.interval, self.sampler = total, interval, sampler
        self.kill_at = kill_at
        self.kill = threading.Event()
        self.seen: set[str] = set()
        self.prior = 0  # images committed before this attempt
        self.committed = 0
        self.events: list[CommitEvent] = []
        self.marks: list[MemoryMark] = []
        self._next_tenth = 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.prior = self.committed = self._poll(record=False)
        while self._next_tenth <= 10 and self.committed >= self._next_tenth * total / 10:
            self._next_tenth += 1

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()  # the last units

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._poll()
            except Exception as exc:
                log.warning("polling the commit markers failed: %s", exc)

    def _poll(self, record: bool = True) -> int:
        self.fs.invalidate_cache(self.folder)
        try:
            paths = [p for p in self.fs.ls(self.folder, detail=False) if p.endswith(".json")]
        except FileNotFoundError:
            paths = []
        new = sorted(set(paths) - self.seen)
        if not new:
            return self.committed
        bodies = self.fs.cat(new)
        t = round(time.monotonic() - self.sampler.started, 2)
        cpu = self.sampler.cpu_by_kind() if record else {}
        for path in new:
            self.seen.add(path)
            text = bodies[path].decode()
            if self.discarded(text):  # a recovery's claim on a unit it discarded
                continue
            images = self.unit_type.from_json(text).counts.images
            self.committed += images
            if record:
                self.events.append(CommitEvent(t, self.committed, images, cpu))
        if record:
            while self._next_tenth <= 10 and self.committed >= self._next_tenth * self.total / 10:
                self.marks.append(self.sampler.mark(self._next_tenth / 10, self.committed))
                self._next_tenth += 1
            if self.kill_at and self.committed >= self.kill_at * self.total:
                self.kill.set()
        return self.committed


# ----------------------------------------------------------------------------- one run


@dataclass
class RunFigures:
    run_id: str
    output: str
    resume: bool
    exit_code: int | None
    killed_at_s: float | None  # since the child started
    seconds: float  # child start -> exit (or kill)
    prior_images: int  # committed by earlier attempts
    committed_images: int  # in all, when it ended
    events: dict[str, float]  # start-up timeline, seconds since the child started
    commits: list[CommitEvent]
    marks: list[MemoryMark]  # at each tenth committed
    model_marks: list[MemoryMark]  # at each tenth out of the model (Ray Data's log)
    peaks_mib: dict[str, float]
    cpu_s: dict[str, float]  # by kind of process, over the whole attempt
    object_store: dict[str, float]  # the last sample
    store_samples: int
    store_error: str | None  # the last error, if no sample came after it
    titles: dict[str, float]
    event_cpu: dict[str, dict[str, float]]  # CPU seconds by kind when each title event came
    model_progress: list[tuple[float, int]]  # (seconds, rows out of the model), Ray Data's log
    rss_series: list[tuple[float, float, float, float]]  # (s, driver, workers, Ray's own) MiB
    summary: dict[str, Any] | None  # the child's RunSummary
    record: dict[str, Any] | None  # the run record
    files: dict[str, int] = field(default_factory=dict)
    log_path: str = ""


def child_spec(cfg: RunConfig) -> str:
    """The run config as JSON for :func:`child_main`."""
    data = asdict(cfg)
    return json.dumps(data)


def run_from_spec(text: str) -> RunConfig:
    data = json.loads(text)
    nested: dict[str, Any] = {
        "model": ModelConfig(**data.pop("model")),
        "decode": DecodeConfig(**data.pop("decode")),
        "tiles": TileConfig(**data.pop("tiles")),
    }
    tuples = {k: tuple(v) for k, v in data.items() if isinstance(v, list)}
    return RunConfig(**{**data, **tuples}, **nested)


def child_main(argv: Sequence[str]) -> int:
    """The child process: one ``pipeline.run`` from a JSON run config; the summary printed
    as one JSON line after :data:`SUMMARY_PREFIX`."""
    _die_with_parent()
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    cfg = run_from_spec(argv[0])
    from segpipe.job.pipeline import run

    summary = run(cfg)
    print(SUMMARY_PREFIX + json.dumps(asdict(summary)), flush=True)
    return 0


def _die_with_parent() -> None:
    """Be killed when the process that started this one ends, however it ends (Ray's
    processes follow: Ray ties them to the process that started it). Set here rather than
    between fork and exec, where the parent's gRPC threads (the object store probe) can
    abort the child."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent ended before that
            os._exit(1)


def run_child(
    cfg: ScaleConfig,
    run_cfg: RunConfig,
    log_dir: Path,
    server: psutil.Process,
    probe: StoreProbe | None,
    kill_at: float = 0.0,
) -> RunFigures:
    """One attempt of the job in a child process, watched from here; SIGKILLed with every
    process under it once ``kill_at`` of the images are committed (0: never)."""
    assert run_cfg.run_id is not None
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONUNBUFFERED"] = "1"
    suffix = "-resume" if run_cfg.resume else ""
    log_path = log_dir / f"{run_cfg.run_id}{suffix}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "segpipe.tools.scale", child_spec(run_cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    sampler = ProcessSampler(proc.pid, cfg.sample_s, server, probe, cfg.store_every_s)
    by_model = cfg.kill_by == "model"
    watcher = CommitWatcher(
        run_cfg.output, run_cfg.run_id, cfg.images, cfg.poll_s, sampler, 0 if by_model else kill_at
    )
    assert proc.stdout is not None
    reader = _LogReader(
        proc.stdout, log_path, sampler, cfg.images, watcher.kill, kill_at if by_model else 0
    )
    sampler.start()
    watcher.start()
    killed_at = None
    try:
        while proc.poll() is None:
            if watcher.kill.wait(0.2):
                killed_at = round(time.monotonic() - sampler.started, 2)
                kill_tree(proc.pid)
                break
        proc.wait()
    except BaseException:
        kill_tree(proc.pid)
        raise
    finally:
        seconds = round(time.monotonic() - sampler.started, 2)
        sampler.stop()
        reader.join()
        watcher.stop()
    if killed_at is None and proc.returncode != 0:
        raise RuntimeError(f"the run failed (exit {proc.returncode}); see {log_path}")
    events = {**reader.events, **sampler.events}
    if watcher.events:
        events["first_commit"] = watcher.events[0].seconds
        events["last_commit"] = watcher.events[-1].seconds
    return RunFigures(
        run_id=run_cfg.run_id,
        output=run_cfg.output,
        resume=run_cfg.resume,
        exit_code=proc.returncode,
        killed_at_s=killed_at,
        seconds=seconds,
        prior_images=watcher.prior,
        committed_images=watcher.committed,
        events=dict(sorted(events.items(), key=lambda kv: kv[1])),
        commits=watcher.events,
        marks=watcher.marks,
        model_marks=reader.marks,
        peaks_mib={k: round(v, 1) for k, v in sampler.peak.items()},
        cpu_s={k: round(v, 2) for k, v in sampler.cpu_by_kind().items()},
        object_store=sampler.store,
        store_samples=sampler.store_samples,
        store_error=sampler.store_error,
        titles=sampler.titles,
        event_cpu=sampler.event_cpu,
        model_progress=reader.model_progress,
        rss_series=sampler.series,
        summary=reader.summary,
        record=read_record(run_cfg.output, run_cfg.run_id),
        files=count_files(run_cfg.output),
        log_path=str(log_path),
    )


class _LogReader:
    """Copies the child's output to a log file, each line prefixed with the seconds since
    the child started, and notes the first line of each of :data:`LOG_EVENTS`."""

    def __init__(
        self,
        stream: IO[bytes],
        path: Path,
        sampler: ProcessSampler,
        total: int,
        kill: threading.Event,
        kill_at: float = 0.0,
    ) -> None:
        self.stream, self.path, self.started = stream, path, sampler.started
        self.sampler, self.total = sampler, total
        self.kill, self.kill_at = kill, kill_at  # set kill once kill_at left the model
        self.marks: list[MemoryMark] = []  # at each tenth of the images out of the model
        self.events: dict[str, float] = {}
        self.summary: dict[str, Any] | None = None
        self.model_progress: list[tuple[float, int]] = []
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        with open(self.path, "w") as out:
            for raw in self.stream:
                t = round(time.monotonic() - self.started, 2)
                line = raw.decode(errors="replace").rstrip("\n")
                out.write(f"[{t:9.2f}] {line}\n")
                if line.startswith(SUMMARY_PREFIX):
                    self.summary = json.loads(line[len(SUMMARY_PREFIX) :])
                for name, pattern in LOG_EVENTS.items():
                    if name not in self.events and re.search(pattern, line):
                        self.events[name] = t
                progress = MODEL_PROGRESS.search(line)
                if progress:
                    rows = int(progress.group(1))
                    if not self.model_progress or rows > self.model_progress[-1][1]:
                        self.model_progress.append((t, rows))
                    if self.kill_at and rows >= self.kill_at * self.total:
                        self.kill.set()
                    while (len(self.marks) + 1) * self.total / 10 <= rows:
                        self.marks.append(self.sampler.mark((len(self.marks) + 1) / 10, rows))

    def join(self) -> None:
        self._thread.join(timeout=30)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every process under it (found before the first signal)."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return
    for proc in tree:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(tree, timeout=30)


def read_record(output: str, run_id: str) -> dict[str, Any] | None:
    fs, root = fs_root(output)
    fs.invalidate_cache()
    try:
        record: dict[str, Any] = json.loads(fs.cat_file(layout.record(root, run_id)))
    except FileNotFoundError:
        return None
    return record


def count_files(output: str) -> dict[str, int]:
    """Parquet files per table under an output."""
    fs, root = fs_root(output)
    fs.invalidate_cache()
    out = {}
    for table in layout.TABLES:
        try:
            out[table] = sum(
                1 for p in fs.find(layout.table(root, table)) if p.endswith(".parquet")
            )
        except FileNotFoundError:
            out[table] = 0
    return out


def distinct_images(output: str) -> tuple[int, int]:
    """(rows, distinct image ids) of an output's images table (one column read)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pds
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, root = fs_root(output)
    ds = pds.dataset(
        layout.table(root, layout.IMAGES_DIR),
        filesystem=PyFileSystem(FSSpecHandler(fs)),
        format="parquet",
        partitioning="hive",
    )
    ids = ds.to_table(columns=["image_id"]).column("image_id")
    return len(ids), int(pc.count_distinct(ids).as_py())


# ----------------------------------------------------------------------------- stages


@dataclass
class StageFigures:
    """The job's stage functions in one process, one core: milliseconds per image."""

    images: int
    cpu_ms: dict[str, float]  # read, decode, model, encode, write, commit (at images_per_file)
    wall_ms: dict[str, float]
    s3_server_cpu_ms_per_get: float
    commit_ms_per_unit: float  # CPU, for the sample's one unit
    model_load_s: float
    instances_per_image: float


class _Clock:
    """CPU (this process, all threads) and wall seconds, added up over ``with`` blocks."""

    def __init__(self) -> None:
        self.cpu = self.wall = 0.0

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        c, w = time.process_time(), time.perf_counter()
        try:
            yield
        finally:
            self.cpu += time.process_time() - c
            self.wall += time.perf_counter() - w


def stage_costs(cfg: ScaleConfig, output: str, server: psutil.Process) -> StageFigures:
    """Run the job's stage functions here on ``stage_images`` of the uploaded images, as a
    run does (decode and encode 16 at a time, the model ``batch_size`` at a time, the rows
    written as one unit), with torch on one thread; time each."""
    import numpy as np
    import pyarrow as pa

    from segpipe.core.decode import decode_image
    from segpipe.job import stages, writer

    n = min(cfg.stage_images, cfg.images)
    decode, model = DecodeConfig(), cfg.model()
    fit = (cfg.min_size, cfg.max_size)
    clocks = {k: _Clock() for k in ("read", "decode", "model", "encode", "write", "commit")}
    uris = [f"s3://{IN_BUCKET}/{image_key(i)}" for i in range(n)]
    fetched = []
    cpu0 = _cpu(server)
    with clocks["read"].timing():
        for uri in uris:
            fetched.append(stages.fetch(uri))
    server_ms = 1000 * (_cpu(server) - cpu0) / n
    with clocks["decode"].timing():
        for data in fetched:
            assert isinstance(data, bytes)
            decode_image(data, max_pixels=decode.max_pixels, fit=fit)
    load = cfg.load_batch_size
    batches = [
        stages.load_batch({"uri": np.array(uris[i : i + load], dtype=object)}, decode, fit)
        for i in range(0, n, load)
    ]
    started = time.perf_counter()
    segment = stages.Segment(model=model, run_id="stages", torch_threads=1)
    model_load_s = time.perf_counter() - started
    encoded = []
    for batch in batches:
        step = cfg.batch_size
        with clocks["model"].timing():
            parts = [
                segment({k: v[i : i + step] for k, v in batch.items()})
                for i in range(0, len(batch["uri"]), step)
            ]
        with clocks["encode"].timing():
            encoded.append(stages.encode_rows(pa.concat_tables(parts)))
    rows = pa.concat_tables(encoded, promote_options="default")
    instances = sum(len(x) for x in rows.column("instances").to_pylist())
    commit_unit = writer.commit_unit

    def timed_commit(*args: Any, **kwargs: Any) -> Any:
        with clocks["commit"].timing():
            return commit_unit(*args, **kwargs)

    writer.commit_unit = timed_commit
    try:
        with clocks["write"].timing():
            writer.write_rows(rows, output, partition_by=("run_id",))
    finally:
        writer.commit_unit = commit_unit
    for attr in ("cpu", "wall"):  # write_rows' time includes its commit's
        setattr(
            clocks["write"], attr, getattr(clocks["write"], attr) - getattr(clocks["commit"], attr)
        )
    per_unit = clocks["commit"].cpu
    per_image = {k: 1000 * c.cpu / n for k, c in clocks.items()}
    per_image["commit"] = 1000 * per_unit / cfg.images_per_file  # one unit per images_per_file
    wall = {k: 1000 * c.wall / n for k, c in clocks.items()}
    wall["commit"] = 1000 * clocks["commit"].wall / cfg.images_per_file
    return StageFigures(
        images=n,
        cpu_ms={k: round(v, 3) for k, v in per_image.items()},
        wall_ms={k: round(v, 3) for k, v in wall.items()},
        s3_server_cpu_ms_per_get=round(server_ms, 3),
        commit_ms_per_unit=round(1000 * per_unit, 1),
        model_load_s=round(model_load_s, 2),
        instances_per_image=round(instances / n, 2),
    )


# ----------------------------------------------------------------------------- the check


@dataclass
class ScaleResult:
    config: dict[str, Any]
    machine: dict[str, Any]
    upload: UploadFigures
    run: RunFigures
    killed: RunFigures | None
    resumed: RunFigures | None
    stages: StageFigures | None
    rows: dict[str, int]  # images rows and distinct image ids of each output
    seconds: float  # the whole check
    errors: list[str] = field(default_factory=list)  # parts that failed

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["report"] = report(self)
        return data


def load_result(data: dict[str, Any]) -> ScaleResult:
    """A :class:`ScaleResult` from its JSON (:meth:`ScaleResult.as_json`), to report again."""

    def run(d: dict[str, Any] | None) -> RunFigures | None:
        if d is None:
            return None
        return RunFigures(
            **{
                **d,
                "commits": [CommitEvent(**e) for e in d["commits"]],
                "marks": [MemoryMark(**m) for m in d["marks"]],
                "model_marks": [MemoryMark(**m) for m in d.get("model_marks", [])],
                "model_progress": [(float(t), int(n)) for t, n in d.get("model_progress", [])],
                "rss_series": [tuple(x) for x in d.get("rss_series", [])],
            }
        )

    main = run(data["run"])
    assert main is not None
    return ScaleResult(
        config=data["config"],
        machine=data["machine"],
        upload=UploadFigures(**data["upload"]),
        run=main,
        killed=run(data.get("killed")),
        resumed=run(data.get("resumed")),
        stages=StageFigures(**data["stages"]) if data.get("stages") else None,
        rows=data["rows"],
        seconds=data["seconds"],
        errors=data.get("errors", []),
    )


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def run_check(
    cfg: ScaleConfig, log_dir: Path, probe: StoreProbe | None = None, stages_too: bool = True
) -> ScaleResult:
    """The whole check (see the module docstring); logs of the runs go to ``log_dir``."""
    from segpipe.tools.s3local import loopback_s3_env

    started = time.monotonic()
    at_start = machine()
    blobs = encodings(cfg)
    log_dir.mkdir(parents=True, exist_ok=True)
    with loopback_s3_env():
        server = _s3_server()
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir(IN_BUCKET)
        fs.mkdir(OUT_BUCKET)
        print(f"scale check: uploading {cfg.images} images ...", flush=True)
        uploaded = upload(
            str(os.environ["AWS_ENDPOINT_URL"]), cfg.images, blobs, cfg.upload_threads, server
        )
        print(f"scale check: {_describe_upload(uploaded)}; the run ...", flush=True)
        main = run_child(
            cfg, cfg.run_config(f"s3://{OUT_BUCKET}/main", "scale"), log_dir, server, probe
        )
        rows = {"main": distinct_images(main.output)}
        errors: list[str] = []
        killed = resumed = None
        if cfg.kill_at > 0:
            print(
                f"scale check: the run in {main.seconds:.0f} s; kill at {cfg.kill_at:.0%} "
                "and resume ...",
                flush=True,
            )
            second = cfg.run_config(f"s3://{OUT_BUCKET}/resume", "scale-resume")
            try:
                killed = run_child(cfg, second, log_dir, server, probe, kill_at=cfg.kill_at)
                resumed = run_child(cfg, replace(second, resume=True), log_dir, server, probe)
                rows["resume"] = distinct_images(second.output)
            except RuntimeError as exc:  # the other figures still count
                errors.append(f"kill and resume: {exc}")
                print(f"scale check: {errors[-1]}", flush=True)
        stage = None
        if stages_too:
            print("scale check: the stages on one core ...", flush=True)
            stage = stage_costs(cfg, f"s3://{OUT_BUCKET}/stages", server)
    return ScaleResult(
        config=asdict(cfg),
        machine={**at_start, "load_average_end": machine()["load_average"]},
        upload=uploaded,
        run=main,
        killed=killed,
        resumed=resumed,
        stages=stage,
        rows={
            f"{k}_{w}": v for k, (r, d) in rows.items() for w, v in (("rows", r), ("distinct", d))
        },
        seconds=round(time.monotonic() - started, 1),
        errors=errors,
    )


# ----------------------------------------------------------------------------- figures


def tenths(points: Sequence[tuple[float, int]], total: int, start: int = 0) -> list[dict[str, Any]]:
    """Images/s over each tenth of ``total``, from ``points`` (seconds since the child
    started, images so far), the first tenth from the child's start (start-up included);
    ``start``: images done before. Tenths first seen at one time are one entry (a burst of
    commits): ``tenth`` is then "k-m"."""
    out: list[dict[str, Any]] = []
    t0, c0, first = 0.0, start, 1
    for k in range(1, 11):
        reached = [(t, c) for t, c in points if c >= k * total / 10]
        if not reached:
            break
        t, c = reached[0]
        if out and t <= t0:  # the same poll as the tenth before: merge them
            out.pop()
            t0, c0 = out[-1]["seconds"] if out else 0.0, out[-1]["images"] if out else start
        else:
            first = k
        out.append(
            {
                "tenth": str(k) if first == k else f"{first}-{k}",
                "images": c,
                "seconds": t,
                "images_per_s": round((c - c0) / max(t - t0, 1e-9), 2),
            }
        )
        t0, c0 = t, c
    return out


def commit_points(run: RunFigures) -> list[tuple[float, int]]:
    return [(e.seconds, e.images) for e in run.commits]


def steady_rate(run: RunFigures) -> float | None:
    """Images/s of this attempt from its first decode task to its last commit: the rate
    apart from start-up."""
    begun = run.events.get("first_decode_task")
    if begun is None or not run.commits:
        return None
    done = run.committed_images - run.prior_images
    return done / max(run.commits[-1].seconds - begun, 1e-9)


def cpu_per_image(run: RunFigures) -> tuple[dict[str, float], str]:
    """CPU milliseconds per image by kind of process, from the first decode task to the last
    commit (start-up apart), else over the whole attempt."""
    images = run.committed_images - run.prior_images
    begun = run.event_cpu.get("first_decode_task")
    if begun is not None and run.commits:
        end = run.commits[-1].cpu
        spent = {k: end[k] - begun.get(k, 0.0) for k in end}
        window = "first decode task to last commit"
    else:
        spent, window = dict(run.cpu_s), "whole attempt"
    return {k: round(1000 * v / max(images, 1), 3) for k, v in spent.items()}, window


PEAKS = {  # MemoryMark field -> ProcessSampler.peak key
    "driver_peak_mib": "driver",
    "workers_total_peak_mib": "workers_total",
    "largest_worker_peak_mib": "largest_worker",
    "largest_model_actor_peak_mib": "largest_model_actor",
    "largest_task_worker_peak_mib": "largest_task_worker",
    "ray_system_peak_mib": "ray_system",
    "object_store_peak_mib": "object_store",
}


def memory(run: RunFigures) -> dict[str, Any]:
    """Each peak (MiB) when the first tenth of the images had left the model (else: had
    been committed) against the peak over the whole attempt: flat when within 10 %."""
    marks = run.model_marks or run.marks
    if not marks:
        return {}
    out: dict[str, Any] = {
        "first_tenth_by": "model output" if run.model_marks else "commits",
        "first_tenth_images": marks[0].images,
        "first_tenth_s": marks[0].seconds,
    }
    last = run.commits[-1].seconds if run.commits else run.seconds
    during = [x for x in run.rss_series if x[0] <= last]
    if during:  # the driver's finish (after the last commit) apart
        out["driver_until_last_commit"] = max(x[1] for x in during)
        out["workers_total_until_last_commit"] = max(x[2] for x in during)
    for field_name, key in PEAKS.items():
        first, end = getattr(marks[0], field_name), run.peaks_mib.get(key, 0.0)
        if not first and not end:  # not sampled (a report saved before it was)
            continue
        ratio = end / first if first else math.inf
        out[key] = {
            "first_tenth": first,
            "end": end,
            "ratio": round(ratio, 3),
            "flat_within_10pct": ratio <= 1.10,
        }
    return out


def report(r: ScaleResult) -> dict[str, Any]:
    """The derived figures: rates per tenth, memory, files, cost per image, resume, start-up."""
    cfg, run = r.config, r.run
    n, per_file = int(cfg["images"]), int(cfg["images_per_file"])
    ten = tenths(commit_points(run), n)
    steady = steady_rate(run)
    out: dict[str, Any] = {"tenths": ten, "steady_images_per_s": _round(steady)}
    out["model_tenths"] = tenths(run.model_progress, n)
    out["end_to_end_images_per_s"] = round(n / run.seconds, 2)
    for name, series in (("committed", ten), ("model", out["model_tenths"])):
        if len(series) >= 3:
            second, last = series[1]["images_per_s"], series[-1]["images_per_s"]
            out[f"last_vs_second_tenth_{name}"] = round(last / second, 3)
    out["memory"] = memory(run)
    out["files"] = {**run.files, "bound": math.ceil(n / per_file)}
    out["cost_per_image"] = _costs(r, steady)
    out["startup_s"] = run.events
    out["record_timeline"] = (run.record or {}).get("timeline")  # the driver's own marks
    if r.killed is not None and r.resumed is not None:
        out["resume"] = _resume(r.killed, r.resumed, n)
    if n < 100_000:
        out["estimate_100k"] = _estimate(r, steady)
    return out


def _costs(r: ScaleResult, steady: float | None) -> dict[str, Any]:
    run_ms, window = cpu_per_image(r.run)
    ours = sum(v for k, v in run_ms.items() if k != "s3_server")
    out: dict[str, Any] = {"run_cpu_ms": run_ms, "run_window": window, "run_total_ms": ours}
    if r.stages is not None:
        st = r.stages.cpu_ms
        parts = ("read", "decode", "encode", "write", "commit")
        non_model = ours - st["model"]
        out.update(
            stages_cpu_ms=st,
            stages_sum_ms=round(sum(st[k] for k in parts), 3),
            model_ms=st["model"],
            non_model_ms=round(non_model, 3),
            ray_overhead_ms=round(non_model - sum(st[k] for k in parts), 3),
            non_model_images_per_s_per_core=_round(1000 / non_model if non_model > 0 else None),
        )
    if steady:
        out["cores_busy"] = round(steady * ours / 1000, 2)
    return out


def _resume(killed: RunFigures, resumed: RunFigures, n: int) -> dict[str, Any]:
    first_decode = killed.events.get("first_decode_task")
    again = resumed.events.get("first_decode_task")
    remaining = n - resumed.prior_images
    out: dict[str, Any] = {
        "killed_after_s": killed.killed_at_s,
        "committed_when_killed": resumed.prior_images,
        "remaining": remaining,
        "resume_total_s": resumed.seconds,
        "resume_to_skip_known_s": resumed.events.get("resume_skip_known"),
        "resume_to_first_decode_s": again,
        "resume_to_first_commit_s": resumed.events.get("first_commit"),
        "fresh_to_first_decode_s": first_decode,
        "first_part_images_per_s": round(resumed.prior_images / (killed.killed_at_s or 1), 2),
        "resume_images_per_s": round(remaining / resumed.seconds, 2),
    }
    if first_decode is not None and again is not None:
        out["resume_extra_startup_s"] = round(again - first_decode, 2)
    if killed.killed_at_s:
        out["resume_vs_first_part"] = round(resumed.seconds / killed.killed_at_s, 3)
    if killed.killed_at_s and resumed.prior_images:
        # Per image, so that a kill a unit late does not skew it.
        out["resume_vs_first_part_per_image"] = round(
            (resumed.seconds / max(remaining, 1))
            / (killed.killed_at_s / max(resumed.prior_images, 1)),
            3,
        )
    out["model_out_when_killed"] = killed.model_progress[-1][1] if killed.model_progress else None
    status = (resumed.record or {}).get("status")
    counts = (resumed.record or {}).get("counts") or {}
    out.update(status=status, images_rows=counts.get("images"))
    return out


def _estimate(r: ScaleResult, steady: float | None) -> dict[str, Any]:
    """Seconds the same check would take at 100,000 images on this machine, linear in the
    images from the measured rates and fixed start-up."""
    n = int(r.config["images"])
    big = 100_000
    up = big / r.upload.objects_per_s
    rate = steady or n / r.run.seconds
    startup = r.run.events.get("first_decode_task", 0.0)
    run_s = startup + big / rate
    resume_s = 0.0
    if r.killed is not None and r.resumed is not None:
        # The killed part to kill_at, then what the resume had left (all of it, if nothing
        # was committed), each with its start-up; the resume's extra start-up as measured.
        s = _resume(r.killed, r.resumed, n)
        work = float(r.config["kill_at"]) + s["remaining"] / n
        resume_s = 2 * startup + (s.get("resume_extra_startup_s") or 0.0) + work * big / rate
    stages = 60.0 if r.stages is not None else 0.0
    return {
        "upload_s": round(up),
        "run_s": round(run_s),
        "kill_and_resume_s": round(resume_s),
        "total_s": round(up + run_s + resume_s + stages),
        "assumes": f"{rate:.1f} images/s steady, {startup:.0f} s start-up per attempt",
    }


def _order(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else math.inf


def _round(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(x, digits)


def describe(r: ScaleResult) -> str:
    """The figures as a few readable lines."""
    rep = report(r)
    n = r.config["images"]
    lines = [
        f"scale check: {n} images of {r.config['width']}x{r.config['height']}, "
        f"{r.config['images_per_file']} images per file, shapes model at "
        f"{r.config['min_size']}/{r.config['max_size']}; {r.machine['cpus']} CPUs, load "
        f"{r.machine['load_average'][0]:.1f} -> {r.machine['load_average_end'][0]:.1f}; "
        f"{r.seconds:.0f} s in all",
        "upload: " + _describe_upload(r.upload),
        f"run: {r.run.seconds:.1f} s, {rep['end_to_end_images_per_s']} images/s end to end, "
        f"{rep['steady_images_per_s']} apart from start-up (first decode to last commit); rows "
        f"{r.rows.get('main_rows')} ({r.rows.get('main_distinct')} distinct)",
        "  images/s per tenth, committed: "
        + ", ".join(f"{t['tenth']}: {t['images_per_s']:.1f}" for t in rep["tenths"])
        + (
            f"; last/second {rep['last_vs_second_tenth_committed']:.2f}"
            if "last_vs_second_tenth_committed" in rep
            else ""
        ),
        "  images/s per tenth, out of the model (Ray Data's log): "
        + ", ".join(f"{t['tenth']}: {t['images_per_s']:.1f}" for t in rep["model_tenths"])
        + (
            f"; last/second {rep['last_vs_second_tenth_model']:.2f}"
            if "last_vs_second_tenth_model" in rep
            else ""
        ),
        "  start-up (s since the driver started): "
        + ", ".join(f"{k} {v:.1f}" for k, v in rep["startup_s"].items()),
    ]
    if isinstance(rep["record_timeline"], dict):
        marks = rep["record_timeline"].get("marks", rep["record_timeline"])
        lines.append(
            "  the run record's timeline: "
            + ", ".join(
                f"{k} {v:.1f}" if isinstance(v, int | float) else f"{k} {v}"
                for k, v in sorted(marks.items(), key=lambda kv: _order(kv[1]))
            )
        )
    mem = rep["memory"]
    if mem:
        lines.append(
            "  peak RSS (MiB, the object store's shared pages apart) when the first tenth "
            f"({mem['first_tenth_images']} images) had "
            f"{'left the model' if mem['first_tenth_by'] == 'model output' else 'been committed'} "
            f"({mem['first_tenth_s']:.0f} s) -> over the whole run: "
            + "; ".join(
                f"{key} {mem[key]['first_tenth']:.0f} -> {mem[key]['end']:.0f}"
                f"{'' if mem[key]['flat_within_10pct'] else ' (NOT flat)'}"
                for key in PEAKS.values()
                if key in mem
            )
        )
        if "driver_until_last_commit" in mem:
            lines.append(
                "  until the last commit (5 s samples): driver "
                f"{mem['driver_until_last_commit']:.0f} MiB, all workers "
                f"{mem['workers_total_until_last_commit']:.0f} MiB"
            )
    lines.append(
        f"  files per table {rep['files']['images']} images / {rep['files']['instances']} "
        f"instances, bound {rep['files']['bound']}"
    )
    c = rep["cost_per_image"]
    lines.append(
        "  CPU ms per image in the run ("
        + c["run_window"]
        + "): "
        + ", ".join(f"{k} {v:.2f}" for k, v in c["run_cpu_ms"].items())
        + f"; ours {c['run_total_ms']:.2f}"
    )
    if "stages_cpu_ms" in c:
        lines.append(
            "stages on one core (CPU ms per image): "
            + ", ".join(f"{k} {v:.2f}" for k, v in c["stages_cpu_ms"].items())
            + f" -> non-model cost in the run {c['non_model_ms']:.2f} ms = stages "
            f"{c['stages_sum_ms']:.2f} + Ray overhead {c['ray_overhead_ms']:.2f} "
            f"({c['non_model_images_per_s_per_core']} images/s per core)"
        )
    if "resume" in rep:
        s = rep["resume"]
        lines.append(
            f"resume: killed after {s['killed_after_s']} s with {s['committed_when_killed']} "
            f"committed ({s['model_out_when_killed']} out of the model); --resume took "
            f"{s['resume_total_s']} s for the other {s['remaining']} "
            f"(skip known at {s['resume_to_skip_known_s']} s, first decode at "
            f"{s['resume_to_first_decode_s']} s vs {s['fresh_to_first_decode_s']} s fresh, "
            f"first commit at {s['resume_to_first_commit_s']} s); x{s.get('resume_vs_first_part')} "
            f"the first part's time (per image x{s.get('resume_vs_first_part_per_image')}); "
            f"{s['status']}, "
            f"{s['images_rows']} images rows ({r.rows.get('resume_distinct')} distinct)"
        )
    lines += [f"FAILED: {e}" for e in r.errors]
    if "estimate_100k" in rep:
        e = rep["estimate_100k"]
        lines.append(
            f"estimate at 100,000 images here: upload {e['upload_s']} s, run {e['run_s']} s, "
            f"kill + resume {e['kill_and_resume_s']} s, about {e['total_s'] / 60:.0f} min in "
            f"all ({e['assumes']})"
        )
    return "\n".join(lines)


def _s3_server() -> psutil.Process:
    """The moto server process that :func:`loopback_s3_env` started under this one."""
    for proc in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if "moto.server" in " ".join(proc.cmdline()):
                return proc
    raise RuntimeError("no moto server under this process")


def _describe_upload(u: UploadFigures) -> str:
    return (
        f"uploaded {u.objects} objects ({u.bytes / MiB:.1f} MiB) in {u.seconds:.1f} s: "
        f"{u.objects_per_s:.0f} PUT/s from {u.threads} threads; the S3 server spent "
        f"{u.server_cpu_ms_per_put:.2f} ms CPU a PUT and holds {u.server_rss_mib:.0f} MiB"
    )


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
