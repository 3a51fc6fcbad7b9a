"""Nothing lost, nothing duplicated, no crash on bad input, no secret leaked.

The main scenario (module fixture ``resumed``) runs ``segpipe run`` as a child process with
its own embedded Ray, reading awkward and good images from S3 and writing the tables to S3,
all through a fault-injecting proxy (throttling, server errors, dropped connections, a denied
object, an object that vanishes after listing). The first run is killed with SIGKILL part
way, together with every process it started; a second run with ``--resume`` finishes it.
The tests then read the output back with DuckDB and count.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import duckdb
import fsspec
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from segpipe import layout
from segpipe.analytics.query import connect
from segpipe.cli import main
from segpipe.config import ModelConfig, RunConfig
from segpipe.io import atomic_write
from segpipe.job import runs
from segpipe.job.commit import Unit, recover, units
from segpipe.job.pipeline import run
from segpipe.job.record import read_record, write_record
from segpipe.job.runs import OutputError
from segpipe.job.stages import image_rows
from segpipe.job.writer import write_rows
from segpipe.layout import STAGING_DIR
from segpipe.schema import image_id
from segpipe.tools.samples import sample_image
from tests.corpus import awkward_files, good_files
from tests.faultproxy import FaultPlan, FaultProxy, fault_proxy
from tests.masks import detections_from_full_masks

REPO = Path(__file__).resolve().parents[1]
SECRET = f"segpipe-secret-{uuid.uuid4().hex}"
BUCKET = "segpipe-reliability"
RUN = "rel"
GOOD = 16


@dataclass
class Scenario:
    inputs: dict[str, object]  # URI -> expected (None: decodes; else (code, words))
    proxy: FaultProxy
    committed_at_kill: int
    logs: list[str]
    command_lines: list[str] = field(default_factory=list)
    ray_logs: list[Path] = field(default_factory=list)
    output: str = f"s3://{BUCKET}/out"


def child_env(endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(
        AWS_ACCESS_KEY_ID="segpipe-reliability-key",
        AWS_SECRET_ACCESS_KEY=SECRET,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
        PYTHONUNBUFFERED="1",
        RAY_AUTH_MODE="disabled",
    )
    return env


def committed_images(output: str) -> int:
    return sum(u.counts.images for u in units(output, RUN))


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the driver first, then every process it started (its embedded Ray)."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for child in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(family, timeout=30)


@pytest.fixture(scope="module")
def resumed(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(BUCKET)
    inputs: dict[str, object] = {}
    for name, data, expected in awkward_files():
        fs.pipe_file(f"{BUCKET}/in/{name}", data)
        inputs[f"s3://{BUCKET}/in/{name}"] = expected
    for name, data in good_files(GOOD):
        fs.pipe_file(f"{BUCKET}/in/{name}", data)
        inputs[f"s3://{BUCKET}/in/{name}"] = None
    logs_dir = tmp_path_factory.mktemp("logs")
    plan = FaultPlan(reset_every=47, slowdown_every=23, internal_every=37)
    command = [
        sys.executable, "-m", "segpipe.cli", "run",
        "--input", f"s3://{BUCKET}/in/", "--output", f"s3://{BUCKET}/out", "--run-id", RUN,
        "--weights", "shapes", "--device", "cpu",
        "--batch-size", "1", "--load-batch-size", "2", "--images-per-file", "3",
        # On the first attempt --resume just starts the run: one command, safe to repeat.
        "--resume",
    ]  # fmt: skip
    started = time.time()
    with fault_proxy(s3_endpoint, plan) as proxy:
        env = child_env(proxy.endpoint)
        scenario = Scenario(inputs, proxy, 0, [])
        first_log = logs_dir / "first.log"
        with first_log.open("wb") as log:
            first = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline and first.poll() is None:
                    scenario.command_lines += command_lines(first.pid)
                    if len(list(units(scenario.output, RUN))) >= 2:
                        break
                    time.sleep(0.5)
                assert first.poll() is None, "the first run ended before it could be killed"
                assert time.monotonic() < deadline, "the first run committed nothing in 300 s"
            finally:
                kill_tree(first)
        killed_at = time.time()
        scenario.committed_at_kill = committed_images(scenario.output)
        second_log = logs_dir / "second.log"
        with second_log.open("wb") as log:
            second = subprocess.run(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=400
            )
        scenario.logs = [first_log.read_text(), second_log.read_text()]
        assert second.returncode == 0, scenario.logs[1][-3000:]
        scenario.ray_logs = [
            p
            for p in Path("/tmp/ray").glob("session_*/logs/**/*")
            if p.is_file() and p.stat().st_mtime >= started
        ]
        print(
            f"\nreliability: {len(inputs)} inputs ({GOOD} good), faults injected "
            f"{dict(proxy.counts)}, {scenario.committed_at_kill} images committed at the kill "
            f"({killed_at - started:.0f} s), resumed in {time.time() - killed_at:.0f} s"
        )
        yield scenario


def command_lines(pid: int) -> list[str]:
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    lines = []
    for p in procs:
        try:
            lines.append(" ".join(p.cmdline()))
        except psutil.Error:
            continue
    return lines


def instance_counts(con: duckdb.DuckDBPyConnection) -> tuple[int, int, int]:
    """Instance rows, distinct instance keys, and the instances the images rows claim."""
    found = con.execute(
        "SELECT (SELECT count(*) FROM instances), "
        "(SELECT count(DISTINCT (image_id, instance_id)) FROM instances), "
        "(SELECT sum(num_instances) FROM images)"
    ).fetchone()
    assert found is not None
    return found[0], found[1], found[2]


def test_killed_run_resumes_to_exactly_one_row_per_input(resumed: Scenario) -> None:
    con = connect(resumed.output)
    total, distinct = con.execute("SELECT count(*), count(DISTINCT uri) FROM images").fetchone()
    assert (total, distinct) == (len(resumed.inputs), len(resumed.inputs))
    uris = {r[0] for r in con.execute("SELECT uri FROM images").fetchall()}
    assert uris == set(resumed.inputs)
    rows, keys, claimed = instance_counts(con)
    assert rows == keys == claimed > 0
    orphans = con.execute(
        "SELECT count(*) FROM instances n ANTI JOIN images i USING (image_id)"
    ).fetchone()
    assert orphans == (0,)
    # The kill really was part way: some images were committed, not all.
    assert 0 < resumed.committed_at_kill < len(resumed.inputs)
    record = json.loads(fsspec.open(f"{resumed.output}/_runs/{RUN}.json").open().read())
    assert record["status"] == "succeeded" and record["attempts"] == 2
    assert record["counts"]["images"] == len(resumed.inputs)
    assert record["resumed_from"]["images"] == resumed.committed_at_kill
    assert f"{resumed.committed_at_kill} of them from earlier attempts" in resumed.logs[1]
    fs, root = fsspec.core.url_to_fs(resumed.output)
    assert not fs.exists(f"{root}/{STAGING_DIR}/{RUN}") or not fs.ls(f"{root}/{STAGING_DIR}/{RUN}")


def test_bad_inputs_become_error_rows_that_name_the_cause(resumed: Scenario) -> None:
    con = connect(resumed.output)
    rows = con.execute(
        "SELECT uri, status, error_code, error, num_instances FROM images"
    ).fetchall()
    by_uri = {uri: (status, code, error, n) for uri, status, code, error, n in rows}
    for uri, expected in resumed.inputs.items():
        status, code, error, n = by_uri[uri]
        if expected is None:
            assert (status, code, error) == ("ok", None, None), uri
            if "/good-" in uri:
                assert n > 0, f"{uri}: the shapes model found nothing"
        else:
            want_code, words = expected  # type: ignore[misc]
            assert (status, code) == ("error", want_code), (uri, code, error)
            for word in words:
                assert word.lower() in error.lower(), (uri, error)


def test_store_faults_were_injected_and_cost_no_image(resumed: Scenario) -> None:
    counts = resumed.proxy.counts
    assert counts["reset"] > 0 and counts["slowdown"] > 0 and counts["internal"] > 0
    assert counts["forbidden"] > 0 and counts["vanished"] == 1
    con = connect(resumed.output)
    transient = con.execute(
        "SELECT count(*) FROM images WHERE error_code IN ('read_error')"
    ).fetchone()
    assert transient == (0,)


def test_the_secret_appears_nowhere(resumed: Scenario) -> None:
    assert resumed.command_lines, "no process was sampled"
    for line in resumed.command_lines:
        assert SECRET not in line
    for text in resumed.logs:
        assert SECRET not in text
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    objects = fs.find(f"{BUCKET}/out")
    assert any(p.endswith(f"{RUN}.json") for p in objects)
    for path in objects:
        assert SECRET.encode() not in fs.cat_file(path), path
    assert resumed.ray_logs, "the runs left no Ray logs to check"
    for path in resumed.ray_logs:
        assert SECRET.encode() not in path.read_bytes(), path


# --- A model actor killed mid-run; overwrite and refusal (in-process, local files) ---


SMALL = dict(min_size=96, max_size=160, max_detections=6)


def segment_actor_pids() -> set[int]:
    found = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        line = " ".join(p.info["cmdline"] or [])
        if "MapBatches(Segment)" in line:
            found.add(p.info["pid"])
    return found


def test_a_killed_model_actor_costs_nothing(
    ray_local: None, tmp_path: Path, random_checkpoint: Path
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(24):
        sample_image(i, (160, 120)).save(inputs / f"img{i:02d}.png")
    output = tmp_path / "out"
    model = ModelConfig(weights=str(random_checkpoint), device="cpu", **SMALL)  # type: ignore[arg-type]
    cfg = RunConfig(
        output=str(output), inputs=(str(inputs),), run_id="k", model=model,
        batch_size=1, images_per_file=2,
    )  # fmt: skip
    result: dict[str, object] = {}

    def target() -> None:
        try:
            result["summary"] = run(cfg)
        except BaseException as exc:
            result["error"] = exc

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    # The actor's process carries its class in its title only while it runs a batch: kill it
    # the first time it is seen so, with a batch in flight.
    killed: set[int] = set()
    deadline = time.monotonic() + 240
    while worker.is_alive() and time.monotonic() < deadline and not killed:
        for pid in segment_actor_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
        time.sleep(0.02)
    worker.join(timeout=300)
    assert "error" not in result, result["error"]
    assert killed, "no model actor was seen running a batch"
    summary = result["summary"]
    assert summary.images == 24 and summary.images_ok == 24  # type: ignore[attr-defined]
    assert all(not psutil.pid_exists(pid) for pid in killed)
    con = connect(str(output))
    assert con.execute("SELECT count(*), count(DISTINCT uri) FROM images").fetchone() == (24, 24)
    rows, keys, claimed = instance_counts(con)
    assert rows == keys == claimed

    # The same run again: refused without a flag, replaced with --overwrite.
    with pytest.raises(OutputError, match="--resume to finish it, --overwrite to replace it"):
        run(cfg)
    replaced_at = time.time()
    again = run(replace(cfg, overwrite=True, images_per_file=8))
    assert again.images == 24
    con = connect(str(output))
    assert con.execute("SELECT count(*), count(DISTINCT uri) FROM images").fetchone() == (24, 24)
    assert con.execute("SELECT count(*) FROM instances").fetchone() == (rows,)
    tables = [p for t in ("images", "instances") for p in (output / t).rglob("*.parquet")]
    assert all(p.stat().st_mtime >= replaced_at for p in tables)  # nothing left of the first
    assert len(list(units(str(output), "k"))) <= 3  # 24 images, >= 8 a unit


def test_a_run_short_of_its_listing_fails_and_resume_finishes_it(
    ray_local: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Listed 5, wrote 3: the run ends failed (exit 1, the record says so, the 3 rows stay
    committed); once the cause is gone a --resume, here without --run-id, writes the rest."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(5):
        sample_image(i, (64, 48)).save(inputs / f"img{i}.png")
    output = tmp_path / "out"
    model = ModelConfig(weights="shapes", device="cpu")
    cfg = RunConfig(output=str(output), inputs=(str(inputs),), run_id="short", model=model)
    # A driver that listed the inputs and stopped before the plan ran: its record says
    # running and its listing says 5 images. Then a listing shard loses two rows (the real
    # cause could be a shard the job could not read, or one damaged after the listing).
    attempt = runs.prepare(cfg)
    runs.begin(attempt)
    assert attempt.listed == 5
    (shard,) = (output / layout.listing("", "short")).glob("*.parquet")
    whole = shard.read_bytes()
    pq.write_table(pq.read_table(shard).slice(0, 3), shard)

    flags = [
        "--input", str(inputs), "--output", str(output), "--resume", "--weights", "shapes",
        "--device", "cpu", "--batch-size", "2", "--images-per-file", "2",
    ]  # fmt: skip
    code, err = run_cli(capsys, *flags)
    assert code == 1, err
    assert "run short failed: listed 5 images, wrote 3 images rows and dropped 0 " in err
    assert "2 missing" in err and "--resume --run-id short" in err
    assert "run short: 3 images (3 ok, 0 error)" in err  # the summary, on stderr
    assert "Traceback" not in err
    record = read_record(str(output), "short")
    assert record["status"] == "failed" and record["attempts"] == 2
    assert "listed 5 images, wrote 3 images rows" in record["error"]
    assert record["counts"]["images"] == 3 and record["finished_at"]
    con = connect(str(output))
    assert con.execute("SELECT count(*), count(DISTINCT uri) FROM images").fetchone() == (3, 3)

    # The shard whole again: the failed run is the output's only unfinished one, and a
    # --resume without --run-id finishes it, writing only the two missing images.
    shard.write_bytes(whole)
    code, err = run_cli(capsys, *flags)
    assert code == 0, err
    record = read_record(str(output), "short")
    assert record["status"] == "succeeded" and record["attempts"] == 3
    assert record["counts"]["images"] == 5 and record["resumed_from"]["images"] == 3
    assert "error" not in record
    con = connect(str(output))
    assert con.execute("SELECT count(*), count(DISTINCT uri) FROM images").fetchone() == (5, 5)


# --- The commit protocol, step by step (no Ray) ---


def unit_rows(run_id: str, n: int, labels: tuple[str, ...] = ("background", "thing")) -> object:
    masks = np.zeros((1, 8, 8), dtype=bool)
    masks[0, 2:5, 2:5] = True
    det = detections_from_full_masks(
        boxes=np.array([[2, 2, 5, 5]], dtype=np.float32),
        labels=np.array([1]),
        scores=np.array([0.9], dtype=np.float32),
        masks=masks,
    )
    uris = [f"file:///img{i}.png" for i in range(n)]
    batch = {
        "uri": np.array(uris, dtype=object),
        "image_id": np.array([image_id(u) for u in uris], dtype=object),
        "width": np.full(n, 8, dtype=np.int32),
        "height": np.full(n, 8, dtype=np.int32),
        "error_code": np.full(n, "", dtype=object),
        "error": np.full(n, "", dtype=object),
    }
    return image_rows(batch, run_id, dict.fromkeys(range(n), det), labels)


def table_files(output: Path) -> list[str]:
    return sorted(
        str(p.relative_to(output))
        for t in ("images", "instances")
        for p in output.glob(f"{t}/**/*.parquet")
    )


def test_commit_protocol_recovers_every_crash_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import segpipe.job.writer as writer

    output = tmp_path / "out"
    rows = unit_rows("c", 3)
    counts = write_rows(rows, str(output), partition_by=["run_id"])  # type: ignore[arg-type]
    assert counts.images == 3 and counts.instances == 3 and counts.files == 2
    published = table_files(output)
    (unit,) = list(units(str(output), "c"))
    assert sorted(unit.files["images"] + unit.files["instances"]) == published
    assert not (output / STAGING_DIR / "c").exists() or not any(
        (output / STAGING_DIR / "c").iterdir()
    )

    # A retried write of the same unit replaces its own files: no copies.
    write_rows(rows, str(output), partition_by=["run_id"])  # type: ignore[arg-type]
    assert table_files(output) == published

    # Crash after staging, before the marker: nothing visible; recovery discards the unit.
    def staged_only(run_id: str) -> Unit:
        """Write a unit, stopping (as a killed task would) before its commit marker."""
        seen: list[Unit] = []

        def keep(output: str, unit: Unit, attempt: str | None = None) -> Unit:
            seen.append(unit)
            return unit

        with monkeypatch.context() as patch:
            patch.setattr(writer, "commit_unit", keep)
            write_rows(unit_rows(run_id, 2), str(output), partition_by=["run_id"])  # type: ignore[arg-type]
        return seen[0]

    lost = staged_only("d")
    assert not (output / "images" / "run_id=d").exists()
    assert recover(str(output), "d") == (0, 1)
    assert not (output / STAGING_DIR / "d" / lost.stem).exists()

    # Crash after the marker, before (or half way through) publishing: recovery finishes it,
    # images file first.
    pending = staged_only("e")
    fs, root = fsspec.core.url_to_fs(str(output))
    atomic_write(fs, layout.marker(root, "e", pending.stem), pending.to_json())
    (images_file,) = pending.files["images"]
    (output / images_file).parent.mkdir(parents=True)
    fs.mv(f"{layout.staged_unit(root, 'e', pending.stem)}/{images_file}", f"{root}/{images_file}")
    assert (output / images_file).exists() and not (output / pending.files["instances"][0]).exists()
    assert recover(str(output), "e") == (1, 0)
    assert (output / pending.files["instances"][0]).exists()
    assert recover(str(output), "e") == (0, 0)
    con = connect(str(output))
    assert con.execute("SELECT run_id, count(*) FROM images GROUP BY 1 ORDER BY 1").fetchall() == [
        ("c", 3),
        ("e", 2),
    ]


def test_partition_values_cannot_escape_the_output(tmp_path: Path) -> None:
    output = tmp_path / "deep" / "out"
    rows = unit_rows("p", 2, labels=("background", "../../escape"))
    write_rows(rows, str(output), partition_by=["run_id", "label"])  # type: ignore[arg-type]
    written = [p for p in tmp_path.rglob("*.parquet")]
    assert written and all(output in p.parents for p in written)
    con = connect(str(output))
    assert con.execute("SELECT DISTINCT label FROM instances").fetchall() == [("../../escape",)]


# --- Bad configuration: one line, before any cluster work ---


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["run", *args])
    err = capsys.readouterr().err.strip()
    return code, err


def test_bad_configuration_fails_fast(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], random_checkpoint: Path, s3_env: str
) -> None:
    images = tmp_path / "in"
    images.mkdir()
    sample_image(0, (64, 64)).save(images / "a.png")
    base = ["--input", str(images), "--weights", str(random_checkpoint)]
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where the output folder should go")
    cases = [
        ([*base, "--output", str(blocker / "out")], "cannot write to output"),
        ([*base, "--output", "s3://no-such-bucket-here/out"], "cannot write to output"),
        (
            [*base, "--output", str(tmp_path / "o1"), "--arch", "maskrcnn_resnet50_fpn_v2"],
            "does not fit maskrcnn_resnet50_fpn_v2",
        ),
        ([*base, "--output", str(tmp_path / "o2"), "--resume"], "no unfinished run"),
        ([*base, "--output", "s3://k:s3cr3t@bucket/out"], "must not hold credentials"),
    ]
    manifest = tmp_path / "bad.parquet"
    manifest.write_bytes(b"PAR1 this is not really parquet")
    cases.append(
        (["--manifest", str(manifest), "--output", str(tmp_path / "o3")], "cannot read parquet")
    )
    # A manifest column may not steer the layout: a partition column's name is refused.
    steering = tmp_path / "steer.csv"
    steering.write_text(f"uri,label\n{images / 'a.png'},../../../etc\n")
    cases.append(
        (["--manifest", str(steering), "--output", str(tmp_path / "o4")], "['label'] clash")
    )
    for args, message in cases:
        started = time.monotonic()
        code, err = run_cli(capsys, *args)
        assert code == 2, (args, err)
        assert message in err and len(err.splitlines()) == 1, (args, err)
        assert "s3cr3t" not in err
        assert time.monotonic() - started < 20
    for name in ("o1", "o2", "o3", "o4"):
        assert not (tmp_path / name / "images").exists()


def test_a_retried_unit_keeps_its_first_commit(tmp_path: Path) -> None:
    """A task retried after its unit was committed may decode or detect differently (a read
    that failed now succeeds); the first commit wins, nothing of the retry is added."""
    output = tmp_path / "out"
    first = unit_rows("u", 2)
    write_rows(first, str(output), partition_by=["run_id", "status"])  # type: ignore[arg-type]
    files = table_files(output)
    retried = first.set_column(  # type: ignore[attr-defined]
        first.schema.get_field_index("status"), "status", pa.array(["error", "ok"])
    )
    counts = write_rows(retried, str(output), partition_by=["run_id", "status"])
    assert counts.images == 2 and table_files(output) == files
    con = connect(str(output))
    assert con.execute("SELECT count(*), count(DISTINCT uri) FROM images").fetchone() == (2, 2)


def test_commit_refuses_a_unit_whose_staging_was_discarded(tmp_path: Path) -> None:
    """A writer from an earlier attempt that outlived a recovery must not commit a unit whose
    staged files the recovery deleted (its marker would name files that never appear)."""
    import segpipe.job.commit as commit

    output = tmp_path / "out"
    unit = Unit("z", "part-zombie", {"images": ["images/run_id=z/part-zombie-0.parquet"]})
    with pytest.raises(RuntimeError, match="is gone"):
        commit.commit_unit(str(output), unit)
    assert not list(units(str(output), "z"))
    fs, root = fsspec.core.url_to_fs(str(output))
    with pytest.raises(RuntimeError, match="neither staged nor published"):
        commit.publish(fs, root, unit)


def test_overwrite_and_resume_guard_the_old_run(tmp_path: Path, random_checkpoint: Path) -> None:
    from segpipe.core.weights import fingerprint_weights
    from segpipe.job.record import public_config

    inputs = tmp_path / "in"
    inputs.mkdir()
    sample_image(0, (64, 64)).save(inputs / "a.png")
    output = tmp_path / "out"
    model = ModelConfig(weights=str(random_checkpoint), device="cpu", **SMALL)  # type: ignore[arg-type]
    cfg = RunConfig(output=str(output), inputs=(str(inputs),), run_id="g", model=model)
    write_rows(unit_rows("g", 2), str(output), partition_by=["run_id"])  # type: ignore[arg-type]
    record = {"run_id": "g", "status": "failed", "attempts": 1, "config": public_config(cfg)}
    write_record(str(output), "g", {**record, "weights": fingerprint_weights(model)})
    files = table_files(output)

    # --resume without a run id takes the output's only unfinished run: g, failed. A run that
    # ended and the metrics file beside a run's record are no candidates.
    ended = {"run_id": "done", "status": "succeeded", "started_at": "2024-01-01T00:00:00+00:00"}
    write_record(str(output), "done", ended)
    (output / layout.metrics("", "g")).write_text(json.dumps({"run_id": "g"}))
    unnamed = replace(cfg, run_id=None, resume=True)
    assert runs.prepare(unnamed).run_id == "g"

    # A wrong input under --overwrite fails before anything of the old run is deleted.
    with pytest.raises(ValueError, match="input not found"):
        run(replace(cfg, inputs=(str(tmp_path / "typo"),), overwrite=True))
    assert table_files(output) == files and list(units(str(output), "g"))

    # --resume with other settings is refused, naming what changed.
    with pytest.raises(OutputError, match=r"model\.score_threshold: 0\.05 -> 0\.3"):
        run(replace(cfg, model=replace(model, score_threshold=0.3), resume=True))
    with pytest.raises(OutputError, match="partition_by"):
        run(replace(cfg, partition_by=("run_id", "label"), resume=True))

    # An --overwrite that stopped half way: --resume is refused, --overwrite must finish.
    write_record(str(output), "g", {**read_record(str(output), "g"), "status": "deleting"})
    with pytest.raises(OutputError, match="pass --overwrite again"):
        run(replace(cfg, resume=True))

    # No unfinished run left (g is being replaced), then two: the error says so, lists the
    # candidates and asks for --run-id.
    with pytest.raises(OutputError, match=r"no unfinished run .* among its 2 run records"):
        runs.prepare(unnamed)
    write_record(str(output), "g", {**record, "started_at": "2024-02-01T10:00:00+00:00"})
    write_record(str(output), "h", {**record, "run_id": "h", "status": "running"})
    with pytest.raises(OutputError, match="pass --run-id NAME") as refused:
        runs.prepare(unnamed)
    assert "2 unfinished runs: g (failed, started 2024-02-01T10:00:00+00:00); " in str(
        refused.value
    )
    assert "h (running, started ?)" in str(refused.value)


def test_transient_faults_are_told_from_answers() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError

    from segpipe.io import is_transient, redact

    def client_error(code: str, status: int) -> ClientError:
        error = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {}}
        error["ResponseMetadata"]["HTTPStatusCode"] = status  # type: ignore[index]
        return ClientError(error, "GetObject")  # type: ignore[arg-type]

    for exc in (
        client_error("SlowDown", 503),
        client_error("InternalError", 500),
        OSError("Too Many Requests"),
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
        ConnectionResetError(104, "Connection reset by peer"),
    ):
        assert is_transient(exc), exc
    wrapped = OSError("read failed")
    wrapped.__cause__ = client_error("SlowDown", 503)
    assert is_transient(wrapped)
    for exc in (
        FileNotFoundError("s3://b/k"),
        PermissionError("Forbidden"),
        client_error("NoSuchKey", 404),
        ValueError("Connection reset"),  # not from a storage library: a bug, not a fault
    ):
        assert not is_transient(exc), exc
    assert redact("simplecache::s3://key:secret@bucket/m.pt?sig=1") == (
        "simplecache::s3://***@bucket/m.pt"
    )


def test_one_driver_per_run(tmp_path: Path) -> None:
    """A second driver for a run is refused while the first holds its lease; a lease left by
    a process that no longer exists on this host is taken over at once."""
    from segpipe.job.lease import LeaseError, RunLease

    output = str(tmp_path / "out")
    path = Path(layout.lease(output, "l"))
    with RunLease(output, "l"), pytest.raises(LeaseError, match="written by another driver"):
        RunLease(output, "l").__enter__()
    assert not path.exists()  # released on exit
    code = "import os; print(os.getpid())"
    dead = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    stale = {"attempt": "x", "host": os.uname().nodename, "pid": int(dead.stdout)}
    path.write_text(json.dumps({**stale, "heartbeat": time.time()}))
    with RunLease(output, "l") as lease:
        assert json.loads(path.read_text())["attempt"] == lease.me["attempt"]
