"""Races the store decides: conditional writes, the run's lease, and commit markers.

Each test runs on a local disk and on the S3 API on loopback, and the S3 races once more
through the fault proxy, which also drops the answers of requests that reached the server
(so that a retried conditional write meets its own first try).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import fsspec
import psutil
import pytest

import segpipe.job.commit as commit
from segpipe import layout
from segpipe.analytics.query import connect
from segpipe.config import ModelConfig, RunConfig
from segpipe.io import fs_root
from segpipe.job import runs
from segpipe.job.commit import recover, units
from segpipe.job.conditional import create_only, replace_if, store_time, version_of
from segpipe.job.lease import LeaseError, LeaseLostError, RunLease, check_holder
from segpipe.job.record import write_record
from segpipe.job.runs import OutputError
from segpipe.job.writer import write_rows
from segpipe.tools.samples import sample_image
from tests.faultproxy import FaultPlan, fault_proxy
from tests.test_reliability import table_files, unit_rows

BUCKET = "segpipe-races"
THREADS = 6


@pytest.fixture(params=["local", "s3", "s3-faults"])
def output(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """An output URI on a local disk, on S3, or on S3 through the fault proxy."""
    if request.param == "local":
        yield str(tmp_path / "out")
        return
    endpoint = request.getfixturevalue("s3_endpoint")
    fsspec.filesystem("s3").clear_instance_cache()
    fsspec.filesystem("s3").makedirs(BUCKET, exist_ok=True)
    uri = f"s3://{BUCKET}/{uuid.uuid4().hex}"
    if request.param == "s3":
        yield uri
        return
    plan = FaultPlan(reset_every=11, slowdown_every=7, internal_every=13, lose_answer_every=5)
    with fault_proxy(endpoint, plan) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        fsspec.filesystem("s3").clear_instance_cache()
        _FAULTY.add(uri)
        yield uri
        assert proxy.counts["lose_answer"] > 0 and proxy.counts["reset"] > 0
    fsspec.filesystem("s3").clear_instance_cache()


_FAULTY: set[str] = set()


def faulty(output: str) -> bool:
    """Whether ``output`` is reached through the fault proxy."""
    return output in _FAULTY


def at_once(fn: Callable[[int], object], n: int = THREADS) -> list[object]:
    """``fn(i)`` in ``n`` threads released together; each result, or the exception raised."""
    barrier = threading.Barrier(n)
    results: list[object] = [None] * n

    def call(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def winner(results: list[object], content: str, exact: bool) -> None:
    """One writer's text is there, and no other writer was told it won. Where answers are
    lost, the winner itself may have been told it lost (its retried request found its own
    object): callers that need to know read the object (the lease, the markers do)."""
    assert all(r in (True, False) for r in results), results
    won = [i for i, r in enumerate(results) if r is True]
    assert won == [int(content.split()[1])] or (not exact and won == []), (results, content)


def test_conditional_writes_let_exactly_one_writer_win(output: str) -> None:
    fs, root = fs_root(output)
    exact = not faulty(output)
    path = f"{root}/_runs/object.json"
    created = at_once(lambda i: create_only(fs, path, f"writer {i}"))
    winner(created, fs.cat_file(path).decode(), exact)

    before = version_of(fs, path)
    assert before is not None
    replaced = at_once(lambda i: replace_if(fs, path, f"replacer {i}", before.version))
    winner(replaced, fs.cat_file(path).decode(), exact)
    assert fs.cat_file(path).decode().startswith("replacer ")
    # The version read before is no longer current: a replace with it changes nothing.
    assert not replace_if(fs, path, "late", before.version)
    assert version_of(fs, f"{root}/_runs/absent.json") is None
    assert not replace_if(fs, f"{root}/_runs/absent.json", "x", before.version)
    # The store's clock, read from an object written for the purpose.
    assert abs(store_time(fs, f"{root}/_runs/clock") - time.time()) < 5


def test_of_drivers_starting_together_exactly_one_takes_the_lease(output: str) -> None:
    leases = [RunLease(output, "race") for _ in range(THREADS)]
    results = at_once(lambda i: leases[i].__enter__())
    won = [i for i, r in enumerate(results) if isinstance(r, RunLease)]
    assert len(won) == 1, results
    assert all(isinstance(r, LeaseError) for i, r in enumerate(results) if i not in won)
    (winner,) = won
    check_holder(output, "race", leases[winner].attempt)
    with pytest.raises(LeaseLostError):
        check_holder(output, "race", leases[(winner + 1) % THREADS].attempt)
    leases[winner].__exit__(None, None, None)
    fs, root = fs_root(output)
    assert not fs.exists(layout.lease(root, "race"))  # released


def test_a_paused_driver_loses_its_lease_and_commits_nothing(output: str) -> None:
    """Driver A stops renewing (as if SIGSTOPped) past the TTL; B takes the run over. When A
    goes on, it finds the lease lost (its main thread is interrupted), and its writes fail
    before their commit markers; B's lease is left alone."""
    # Through the fault proxy a renewal may take seconds of retries: a longer lease there.
    ttl, beat = (8.0, 1.0) if faulty(output) else (3.0, 0.5)
    a = RunLease(output, "paused", ttl_s=ttl, heartbeat_s=beat)
    resume = threading.Event()
    renew = a._renew

    def frozen() -> bool:
        resume.wait()
        return renew()

    with pytest.raises(KeyboardInterrupt), a:
        time.sleep(2 * beat)  # A renews while it runs
        a._renew = frozen  # type: ignore[method-assign]
        with pytest.raises(LeaseError, match="being written by another driver"):
            RunLease(output, "paused", ttl_s=ttl).__enter__()
        time.sleep(ttl + 2 * beat)
        b = RunLease(output, "paused", ttl_s=ttl, heartbeat_s=beat).__enter__()
        resume.set()
        for _ in range(100):  # A's heartbeat wakes, finds the lease lost, interrupts
            time.sleep(0.1)
    assert a.lost is not None
    with pytest.raises(LeaseLostError):
        a.check()
    with pytest.raises(LeaseLostError):
        write_rows(unit_rows("paused", 2), output, partition_by=["run_id"], attempt=a.attempt)  # type: ignore[arg-type]
    assert list(units(output, "paused")) == []
    counts = write_rows(
        unit_rows("paused", 2),  # type: ignore[arg-type]
        output,
        partition_by=["run_id"],
        attempt=b.attempt,
    )
    assert counts.images == 2 and [u.counts.images for u in units(output, "paused")] == [2]
    b.__exit__(None, None, None)


def test_a_recovery_between_a_writers_check_and_its_marker_wins(
    output: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer has checked its staged files (and its lease); before it writes its marker, a
    newer attempt's recovery claims the unit and deletes the staging. The writer's marker is
    refused, nothing of the unit becomes visible, and nothing is left to name missing files."""
    create = commit.create_only
    raced: list[tuple[int, int]] = []
    started: list[bool] = []

    def recovery_first(fs: fsspec.AbstractFileSystem, path: str, text: str) -> bool:
        if not started:  # the writer's marker: recovery runs first (its claims pass here too)
            started.append(True)
            raced.append(recover(output, "late"))
        return create(fs, path, text)

    monkeypatch.setattr(commit, "create_only", recovery_first)
    with pytest.raises(LeaseLostError, match="discarded by a newer attempt's recovery"):
        write_rows(unit_rows("late", 3), output, partition_by=["run_id"])  # type: ignore[arg-type]
    assert raced == [(0, 1)]
    assert list(units(output, "late")) == []
    fs, root = fs_root(output)
    assert not [p for p in fs.find(root) if "/images/" in p or "/instances/" in p]
    if not output.startswith("s3://"):
        assert table_files(Path(output)) == []
    # The claim stays: a later recovery finds nothing to do, and a new attempt's units (their
    # names carry the attempt) commit as usual.
    monkeypatch.setattr(commit, "create_only", create)
    assert recover(output, "late") == (0, 0)
    with RunLease(output, "late") as lease:
        rows = unit_rows("late", 3)
        counts = write_rows(rows, output, partition_by=["run_id"], attempt=lease.attempt)  # type: ignore[arg-type]
    assert counts.images == 3 and [u.counts.images for u in units(output, "late")] == [3]


def signal_tree(pid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to a process and every process under it (its embedded Ray), looking
    again until no new one appears (a process may start while the others are stopped)."""
    seen: set[int] = set()
    for _ in range(5):
        try:
            family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        new = [p for p in family if p.pid not in seen]
        if not new:
            return
        for p in new:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(sig)
            seen.add(p.pid)
        time.sleep(0.2)


def test_a_driver_frozen_past_its_lease_stops_and_the_run_holds_each_image_once(
    s3_endpoint: str, tmp_path: Path
) -> None:
    """The real job, on S3: driver A is frozen with SIGSTOP (with its whole embedded Ray)
    once it has committed a unit; past its lease's TTL, driver B resumes the run and
    finishes it; then A is woken with SIGCONT. A exits 1 without committing anything more
    or touching B's record, and every image has exactly one ``images`` row."""
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    bucket = f"{BUCKET}-frozen"
    fs.makedirs(bucket, exist_ok=True)
    n = 64
    for i in range(n):
        buffer = io.BytesIO()
        sample_image(i, (160, 120)).save(buffer, format="PNG")
        fs.pipe_file(f"{bucket}/in/{i:03d}.png", buffer.getvalue())
    output, ttl = f"s3://{bucket}/out", 10
    command = [
        sys.executable, "-m", "segpipe.cli", "run",
        "--input", f"s3://{bucket}/in/", "--output", output, "--run-id", "frozen",
        "--weights", "shapes", "--device", "cpu", "--batch-size", "1",
        "--images-per-file", "4", "--lease-ttl", str(ttl), "--resume",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONUNBUFFERED"] = "1"
    first_log = (tmp_path / "a.log").open("wb")
    a = subprocess.Popen(command, env=env, stdout=first_log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not list(units(output, "frozen")) and a.poll() is None:
            assert time.monotonic() < deadline, "driver A committed nothing in 240 s"
            time.sleep(0.2)
        assert a.poll() is None, "driver A ended before it could be frozen"
        signal_tree(a.pid, signal.SIGSTOP)
        frozen_at = sum(u.counts.images for u in units(output, "frozen"))
        assert frozen_at < n
        time.sleep(ttl + 2)  # A's lease goes stale by the store's clock
        b = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
        assert b.returncode == 0, b.stdout[-2000:] + b.stderr[-3000:]
        signal_tree(a.pid, signal.SIGCONT)
        assert a.wait(timeout=120) == 1
    finally:
        signal_tree(a.pid, signal.SIGCONT)
        if a.poll() is None:
            a.kill()
        first_log.close()
    log = (tmp_path / "a.log").read_text()
    assert "segpipe: error:" in log and "lease" in log, log[-3000:]
    record = json.loads(fs.cat_file(f"{bucket}/out/_runs/frozen.json"))
    assert record["status"] == "succeeded" and record["counts"]["images"] == n
    con = connect(output)
    assert con.execute("SELECT count(*), count(DISTINCT uri) FROM images").fetchone() == (n, n)
    rows, keys = con.execute(
        "SELECT count(*), count(DISTINCT (image_id, instance_id)) FROM instances"
    ).fetchone()
    assert rows == keys
    assert sum(u.counts.images for u in units(output, "frozen")) == n


def test_a_run_changed_before_the_lease_was_taken_is_refused(tmp_path: Path) -> None:
    """The output's checks read the run's state before the lease; under the lease, a state
    that another driver changed in between is refused, not acted on."""
    images = tmp_path / "in"
    images.mkdir()
    sample_image(0, (32, 32)).save(images / "a.png")
    cfg = RunConfig(
        inputs=(str(images),),
        output=str(tmp_path / "out"),
        run_id="moved",
        model=ModelConfig(weights="shapes"),
    )
    attempt = runs.prepare(cfg)  # a new run: nothing of it there yet
    write_record(cfg.output, "moved", {"run_id": "moved", "status": "running"})
    with pytest.raises(OutputError, match="changed while this driver started"):
        runs.begin(attempt)
    # A run that exists, finished by another driver between this one's checks and its lease.
    runs.begin(runs.prepare(replace(cfg, run_id="held")))  # its record: status running
    resumed = runs.prepare(replace(cfg, run_id="held", resume=True))
    assert resumed.previous is not None
    write_record(cfg.output, "held", {**resumed.previous, "status": "succeeded"})
    with pytest.raises(OutputError, match="changed while this driver started"):
        runs.begin(resumed)
